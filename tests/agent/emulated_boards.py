"""Real firmware on emulated boards (meterchain.board.emulated) publishing to the agent's broker.

`make_board(site, meter_id)` writes a board's flash folder (config, its own key
made by the firmware's keystore, the broker's CA and its password), gives it a
broker account and registers its public key with the agent; `RunningBoard`
boots it on a thread of the test process.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from agent_site import MARKET, Site, wait_until

from meterchain.board.emulated import ensure_firmware_importable, run_board
from meterchain.sequence import window_seqs

ACK_TIMEOUT_S = 5  # the firmware's lower bound


def make_board(site: Site, meter_id: str) -> Path:
    """A board folder for `meter_id`; call before the site's broker and registry are written."""
    ensure_firmware_importable()
    from mc import keystore, p256
    from mc.flash import Flash
    from mcfakes import host_random, write_config

    account = site.add_board(meter_id, registered=False)
    folder = site.root / "boards" / meter_id
    folder.mkdir(parents=True, exist_ok=True)
    flash = Flash(str(folder))
    write_config(
        flash,
        {
            "meter_id": meter_id,
            "market": MARKET,
            "source": "load",
            "interval_s": 15,
            "meter": {"type": "sim"},
            "broker": {
                "host": "127.0.0.1",
                "port": 1,  # set by `connect_board` once the broker has its port
                "tls": True,
                "username": meter_id,
                "backoff_min_ms": 100,
                "backoff_max_ms": 400,
                "ack_timeout_s": ACK_TIMEOUT_S,
            },
            "wdt_s": 0,
        },
    )
    keystore.ensure(flash, host_random)
    site.external[meter_id] = p256.public_key(keystore.load(flash))
    (folder / "secrets.json").write_text(json.dumps({"broker": {"password": account.password}}))
    return folder


def connect_board(folder: Path, site: Site) -> None:
    """Point the board at the site's started broker (port and CA)."""
    from mc.flash import Flash
    from mcfakes import write_config

    config = json.loads((folder / "config.json").read_text())
    config["broker"]["port"] = site.broker.port
    write_config(Flash(str(folder)), config)
    (folder / "ca.pem").write_bytes(site.broker.ca_file.read_bytes())


class RunningBoard:
    """An emulated board on a thread of this process, with its App exposed."""

    def __init__(self, folder: Path, interval_ms: int = 100) -> None:
        self.stop = threading.Event()
        self.apps: list[Any] = []
        settings = {
            "meter": "sim",
            "sim_power_w": 1200,
            "interval_ms": interval_ms,
            "ntp": True,
            "wifi": True,
        }
        self.thread = threading.Thread(
            target=run_board,
            args=(folder,),
            kwargs={"stop_event": self.stop, "settings": settings, "on_app": self.apps.append},
            daemon=True,
        )
        self.thread.start()

    @property
    def app(self) -> Any:
        deadline = time.monotonic() + 10
        while not self.apps and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.apps[0]

    def halt(self) -> None:
        """A power cut (flash keeps what was written)."""
        self.stop.set()
        self.thread.join(10)


def committed_seqs(site: Site, meter_id: str) -> list[int]:
    """Sequence numbers of `meter_id` the agent has durably accepted (its guard's record)."""
    with sqlite3.connect(f"file:{site.database}?mode=ro", uri=True) as db:
        return window_seqs(db, meter_id=meter_id).get(meter_id, [])


def acknowledged_past(boards: list[RunningBoard], margin: int, timeout: float) -> None:
    """Wait until each board's watermark passes what it had produced by now, plus `margin`."""
    targets = [b.app.last_seq + margin for b in boards]
    wait_until(
        lambda: all(b.app.uplink.watermark >= t for b, t in zip(boards, targets, strict=True)),
        timeout,
        f"acknowledgements past {targets}",
    )
