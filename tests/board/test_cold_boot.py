"""A cold boot on the pole under real MicroPython: RTC at 2000-01-01, TLS on, NTP not answering yet.

The board must sample, sign and spool from the first second, never touch TLS while its
clock cannot vouch for a certificate's dates, and publish everything once NTP answers;
a broker certificate the handshake refuses (expired, rotated, wrong name) is a link
failure, never a restart loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import board_config, public_key_of

from meterchain.reading import FLAG_CLOCK_NOT_SYNCED, verify
from meterchain.registry import Registry

COLD_BOOT = """
import json, mcfakes
from mc import app
broker = mcfakes.FakeBroker()
board = mcfakes.FakeBoard(broker=broker, echo=False, ntp_ok=False, rtc_start=946684800)
board.flash.write_atomic("ca.pem", b"-----BEGIN CERTIFICATE-----\\nMIIB\\n")
board.cert_valid = (%(not_before)d, %(not_after)d)
a = app.boot(board)
a.run(cycles=%(cold)d)
phase1 = {"published": len(broker.messages), "spooled": len(a.spool), "connects": a.uplink.connects,
          "error": a.uplink.last_error, "rtc": board.time()}
board.ntp_ok = True
a.run(cycles=%(warm)d)
print(json.dumps({
    "phase1": phase1,
    "published": [p.hex() for t, p in broker.messages],
    "spooled": len(a.spool),
    "freed": a.uplink.freed,
    "resets": board.resets,
    "wdt_longest_ms": board.wdt.longest_ms,
    "error": a.uplink.last_error,
}))
"""


def _cold_boot(mpy, folder: Path, cold: int, warm: int, not_before: int, not_after: int) -> Any:
    code = COLD_BOOT % {
        "cold": cold, "warm": warm, "not_before": not_before, "not_after": not_after
    }
    result = mpy(code, fs_dir=folder, heap=512 * 1024).check()
    return json.loads(result.stdout.strip().splitlines()[-1])


def _registry(folder: Path, cfg: dict[str, Any]) -> Registry:
    registry = Registry()
    registry.add(cfg["meter_id"], public_key_of(folder), "mg1", cfg["source"])
    return registry


def test_cold_boot_with_tls_signs_spools_then_publishes_once_ntp_answers(
    mpy, make_board_dir
) -> None:
    cfg = board_config(**{"broker.tls": True, "broker.port": 8883})
    folder = make_board_dir(cfg=cfg)
    out = _cold_boot(mpy, folder, cold=8, warm=30, not_before=1704067200, not_after=2082758400)
    first = out["phase1"]
    assert first["published"] == 0 and first["connects"] == 0, "no TLS before the clock is set"
    assert first["spooled"] == 8, "sampling never waited for the network"
    assert "waits for the clock" in first["error"]
    assert first["rtc"] < 946684800 + 86400, "the RTC still read 2000-01-01"
    readings = [verify(bytes.fromhex(p), _registry(folder, cfg)) for p in out["published"]]
    seqs = [r.seq for r in readings]
    assert seqs[:8] == list(range(1, 9)), "the cold-boot readings go out first, in order"
    assert sorted(set(seqs)) == list(range(1, 39)), "every reading published"
    assert all(r.flags & FLAG_CLOCK_NOT_SYNCED and r.time < 946684800 + 86400 for r in readings[:8])
    # While unsynced the board asks NTP every 60 s (and whenever the uplink's jittered
    # backoff tries TLS), so the sync comes at most 60 s after NTP answers: warm readings
    # are 15 s apart, the first at once, so at most seq 9-13 still carry the flag (13 when
    # the retry falls on its sampling tick). Once synced, never flagged again.
    flagged = sorted(r.seq for r in readings if r.flags & FLAG_CLOCK_NOT_SYNCED)
    assert flagged == list(range(1, len(flagged) + 1)), "the flag only before the first sync"
    assert len(flagged) <= 13, f"NTP answered but readings up to seq {len(flagged)} unsynced"
    assert out["spooled"] == 0 and out["freed"] == 38, "freed by the agent's acknowledgement"
    assert out["resets"] == 0 and out["wdt_longest_ms"] < 60_000


def test_refused_broker_certificate_is_a_link_failure_not_a_restart_loop(
    mpy, make_board_dir
) -> None:
    cfg = board_config(**{"broker.tls": True, "broker.backoff_max_ms": 20000})
    folder = make_board_dir(cfg=cfg)
    # The broker's certificate expired in 2025: every handshake raises ValueError on the port.
    out = _cold_boot(mpy, folder, cold=2, warm=12, not_before=1704067200, not_after=1735689600)
    assert out["published"] == [] and out["resets"] == 0
    assert "ValueError" in out["error"] and "expired" in out["error"]
    assert out["spooled"] == 14, "every reading kept for when the certificate is renewed"
