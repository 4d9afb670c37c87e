"""Hardware faults degrade the board instead of restart-looping it: flash that refuses writes
(sequence reservation, spool append, compaction), a pin the chip lacks, flash that cannot
open the spool at boot.
"""

from __future__ import annotations

import json
from pathlib import Path

import mcfakes
from conftest import board_config, public_key_of
from mc import app as firmware_app
from mc.spool import Spool, SpoolError

from meterchain.reading import verify
from meterchain.registry import Registry


def _board(folder: Path, cfg: dict, flash=None) -> mcfakes.FakeBoard:
    flash = flash if flash is not None else mcfakes.FullFlash(str(folder))
    board = mcfakes.FakeBoard(flash=flash, broker=mcfakes.FakeBroker(), echo=False)
    mcfakes.write_config(board.flash, cfg)
    return board


def test_full_flash_mid_run_loses_samples_not_the_board(make_board_dir, tmp_path: Path) -> None:
    cfg = board_config(**{"seq_block": 4, "spool.batch": 2, "spool.max_records": 16})
    folder = make_board_dir(cfg=cfg)
    flash = mcfakes.FullFlash(str(folder))
    board = mcfakes.FakeBoard(flash=flash, broker=mcfakes.FakeBroker(), echo=False)
    app = firmware_app.boot(board)
    assert app is not None
    app.run(cycles=6)
    board.broker.stop()  # nothing leaves the spool while the flash is full
    flash.full = True
    app.run(cycles=30)  # must not raise: readings skipped or held in RAM, thinned if need be
    assert flash.refused > 0 and app.skipped > 0
    assert any("sequence reservation failed" in line for line in board.console_lines)
    assert any("spool write failed" in line for line in board.console_lines)
    flash.full = False
    board.broker.start()
    app.run(cycles=40)  # reconnect backoff is up to 5 min after the outage
    assert len(app.spool) == 0, "drained once the flash works again"
    registry = Registry()
    registry.add(cfg["meter_id"], public_key_of(folder), "mg1", cfg["source"])
    seqs = [verify(p, registry).seq for _, p in board.broker.messages]
    assert max(seqs) == app.last_seq and app.readings == 76 - app.skipped
    # No sequence number was ever given to two different readings.
    by_seq: dict[int, set[bytes]] = {}
    for _, p in board.broker.messages:
        by_seq.setdefault(verify(p, registry).seq, set()).add(bytes(p))
    assert all(len(v) == 1 for v in by_seq.values())


def test_compaction_on_a_full_flash_keeps_the_log_and_retries(tmp_path: Path) -> None:
    flash = mcfakes.FullFlash(str(tmp_path))
    spool = Spool(flash, max_records=8)
    for seq in range(1, 8):
        spool.add(seq, b"reading %d" % seq)
    spool.commit()
    flash.full = True
    spool.add(8, b"reading 8")
    spool.add(9, b"reading 9")  # at the limit: thinning wants a compaction, flash refuses
    try:
        spool.commit()
        raise AssertionError("commit must report the refused write")
    except SpoolError:
        pass
    kept = []
    seq = spool.next_unsent(0)
    while seq >= 0:
        kept.append(seq)
        seq = spool.next_unsent(seq)
    flash.full = False
    spool.commit()
    reopened = Spool(mcfakes.FullFlash(str(tmp_path)), max_records=8)
    again = []
    seq = reopened.next_unsent(0)
    while seq >= 0:
        again.append(seq)
        assert reopened.payload(seq) == b"reading %d" % seq
        seq = reopened.next_unsent(seq)
    assert again == kept and 9 in again and reopened.dropped == spool.dropped > 0


def test_a_pin_the_chip_lacks_is_safe_mode_not_a_restart_loop(tmp_path: Path) -> None:
    board = _board(tmp_path, board_config())
    from mc import keystore

    keystore.ensure(board.flash, mcfakes.host_random)
    board.peripheral_error = ValueError("invalid pin")
    assert firmware_app.main(board, cycles=1) == 2
    assert any("SAFE MODE: ValueError: invalid pin" in line for line in board.console_lines)


def test_flash_that_cannot_open_the_spool_is_safe_mode(tmp_path: Path) -> None:
    board = _board(tmp_path, board_config())
    from mc import keystore

    keystore.ensure(board.flash, mcfakes.host_random)
    (tmp_path / "spool.log").mkdir()  # opening it for reading raises OSError, as bad flash does
    assert firmware_app.main(board, cycles=1) == 2
    assert any("SAFE MODE: " in line and "Error" in line for line in board.console_lines)


def test_wrong_pin_is_safe_mode_under_micropython(mpy, make_board_dir) -> None:
    folder = make_board_dir(cfg=board_config())
    code = """
import json, mcfakes
from mc import app
board = mcfakes.FakeBoard(broker=mcfakes.FakeBroker(), echo=False)
board.peripheral_error = ValueError("invalid pin")
print(json.dumps({"status": app.main(board, cycles=1), "console": board.console_lines}))
"""
    out = json.loads(mpy(code, fs_dir=folder).check().stdout.strip().splitlines()[-1])
    assert out["status"] == 2
    assert any("SAFE MODE: ValueError: invalid pin" in line for line in out["console"])


def test_slow_reconnects_never_starve_the_watchdog_and_sampling_goes_on(make_board_dir) -> None:
    cfg = board_config(**{"wdt_s": 60, "wifi.ssid": "site", "broker.backoff_max_ms": 30000})
    folder = make_board_dir(cfg=cfg)
    (folder / "secrets.json").write_text(json.dumps({"wifi": {"password": "pw"}}))
    board = mcfakes.FakeBoard(flash=mcfakes.FullFlash(str(folder)), broker=mcfakes.FakeBroker(),
                              echo=False)
    board.wifi_up = False  # the access point is gone: every join waits its full 20 s
    app = firmware_app.boot(board)
    assert app is not None
    app.run(cycles=40)
    assert app.readings == 40 and board.wdt is not None
    board.wifi_up = True
    board.connect_ms = 25_000  # DNS + TCP + a TLS handshake that times out at the end
    board.connect_error = OSError(116)
    app.run(cycles=40)
    assert app.readings == 80
    assert board.wdt.longest_ms <= 30_000, "fed between the blocking steps of a connect"
    assert app.uplink.wifi_resets >= 1


def test_nothing_passing_for_the_bound_reboots_cleanly_with_the_spool_kept(make_board_dir) -> None:
    cfg = board_config(**{"broker.reboot_after_s": 600, "spool.batch": 64, "spool.flush_s": 3600})
    folder = make_board_dir(cfg=cfg)
    board = mcfakes.FakeBoard(flash=mcfakes.FullFlash(str(folder)), broker=mcfakes.FakeBroker(),
                              echo=False)
    board.connect_error = OSError(116)  # nothing gets through, ever
    app = firmware_app.boot(board)
    assert app is not None
    try:
        app.run(cycles=100)
        raise AssertionError("the board should have rebooted")
    except mcfakes.PowerCut:
        pass
    assert board.resets == 1 and 600_000 <= board.ticks_ms() <= 602_000, "within a loop slice"
    assert any("rebooting: nothing passed the uplink" in line for line in board.console_lines)
    # Committed before the reset: every reading taken is in the spool after the reboot.
    assert len(Spool(mcfakes.FullFlash(str(folder)))) == app.readings > 30
