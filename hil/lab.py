"""A site's physical side in one process: emulated SDM630 meters on RTU and the boards reading them.

`python -m hil.lab LAB.toml` (what `meterchain site up` starts for an
`--emulated` site) runs, for each `[[meter]]` of the file, an
`hil.emulated_meter.EmulatedSdm630` behind a `NullModem` (a pair of
pseudo-terminals, so the board speaks real Modbus RTU with CRCs) whose power
follows the meter's hourly table on the market clock, and an emulated board
(`meterchain.board.emulated`) running the real firmware on the board's own
folder (its flash: key, config, spool): sample, sign ES256, spool, publish over
MQTT until PUBACK. The boards' real-time clocks read the same market clock as
the services, so readings carry market time.

Until SIGTERM; then every board is powered off (what is spooled stays on its
flash) and `status` (JSON) gets, per board, the readings it signed, the
distinct readings it sent to the broker (`published`, which a site test
compares with the ledger) and the edge agent's end-to-end acknowledgement. The status file is
also rewritten every few seconds while the lab runs.

    [lab]
    status = "status.json"
    interval_ms = 625                  # real milliseconds between samples
    [clock]                            # meterchain.site.clock
    start = 1718061600
    speed = 1440.0
    anchor_file = "../run/clock-anchor"
    [[meter]]
    id = "mg1-pv"
    board = "boards/mg1-pv"            # the board's folder
    power_w = [0, 0, ...]              # 24 values, W (+ import, - export) per hour of day
    seed = 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterchain import config_files
from meterchain.config_files import TableChecker
from meterchain.errors import MeterChainError
from meterchain.site.clock import MarketClock, check_clock

HOUR = 3600
STATUS_EVERY_S = 2.0


@dataclass(frozen=True)
class HourlyTable:
    """A `hil.profiles.PowerProfile`: constant power per hour of the day, W."""

    watts: tuple[int, ...]

    def power_w(self, t: float) -> float:
        return float(self.watts[int(t // HOUR) % 24])


@dataclass(frozen=True)
class LabMeter:
    id: str = ""
    board: Path = Path()
    power_w: tuple[int, ...] = ()
    seed: int = 1


@dataclass(frozen=True)
class LabSection:
    status: Path = Path()
    interval_ms: int = 15_000


@dataclass
class LabConfig:
    path: Path
    lab: LabSection
    clock: MarketClock
    meters: list[LabMeter] = field(default_factory=list)


def load(path: Path) -> LabConfig:
    """Read and check a lab file (ConfigError naming the bad key)."""
    check = TableChecker(path)
    doc = config_files.load_toml(path)
    for key in doc:
        if key not in ("lab", "clock", "meter"):
            check.fail(key, "unknown section (known: lab, clock, meter)")
    lab: LabSection = check.table(doc.get("lab", {}), LabSection, "lab")
    check.require(lab, "lab", "status")
    check.positive(lab.interval_ms, "lab.interval_ms")
    clock = check_clock(check, doc.get("clock", {}))
    meters = []
    for i, raw in enumerate(doc.get("meter", [])):
        meter: LabMeter = check.table(raw, LabMeter, f"meter[{i}]")
        check.require(meter, f"meter[{i}]", "id", "board")
        check.name(meter.id, f"meter[{i}].id", "meter id")
        if len(meter.power_w) != 24:
            check.fail(f"meter[{i}].power_w", f"must have 24 values, got {len(meter.power_w)}")
        if not (meter.board / "config.json").is_file():
            check.fail(f"meter[{i}].board", f"{meter.board} is not a provisioned board folder")
        meters.append(meter)
    return LabConfig(path, lab, clock, meters)


class LabBoard:
    """One emulated meter on its own RTU line and the board reading it, on threads."""

    def __init__(self, meter: LabMeter, clock: MarketClock, interval_ms: int) -> None:
        from hil.rig_boards import MeterLink

        self.meter = meter
        self.link = MeterLink(clock.now, meter.seed, HourlyTable(meter.power_w))
        self.settings = {
            "meter": f"serial:{self.link.port}",
            "interval_ms": interval_ms,
            "clock": {
                "start": clock.start, "speed": clock.speed, "anchor": clock.anchor,
                "anchor_file": str(clock.anchor_file) if clock.anchor_file else None,
            },  # fmt: skip
            "ntp": True,
            "wifi": True,
            "console": False,
            "sim_power_w": 0,
        }
        self.stop_event = threading.Event()
        self.app: Any = None
        self.first_seq = 1  # the sequence number of this boot's first reading
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, name=f"board-{meter.id}", daemon=True)

    def _run(self) -> None:
        from meterchain.board.emulated import run_board

        def keep(app: Any) -> None:
            self.first_seq = int(app.seq.peek())
            self.app = app

        self.exit_code = run_board(
            self.meter.board, stop_event=self.stop_event, settings=self.settings, on_app=keep
        )

    @property
    def published(self) -> int:
        """Distinct readings of this boot the board has sent to the broker (each in one
        piece: a power cut stops the board before a write, never inside one)."""
        if self.app is None:
            return 0
        highest = int(getattr(self.app.uplink, "_max_published", 0))
        return max(0, highest - self.first_seq + 1)

    @property
    def acknowledged(self) -> int:
        """The edge agent's end-to-end watermark: every sequence up to it is committed."""
        return int(self.app.uplink.watermark) if self.app is not None else 0

    @property
    def signed(self) -> int:
        return int(self.app.readings) if self.app is not None else 0

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        self.link.close()


def write_status(path: Path, boards: list[LabBoard], running: bool) -> None:
    status = {
        "running": running,
        "meters": {
            b.meter.id: {"published": b.published, "signed": b.signed,
                         "acknowledged": b.acknowledged, "exit": b.exit_code}  # fmt: skip
            for b in boards
        },
    }
    status["published"] = sum(m["published"] for m in status["meters"].values())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def run(cfg: LabConfig, stop: threading.Event) -> int:
    from meterchain.board.emulated import ensure_firmware_importable

    ensure_firmware_importable()
    boards = [LabBoard(m, cfg.clock, cfg.lab.interval_ms) for m in cfg.meters]
    for board in boards:
        board.thread.start()
    try:
        while not stop.wait(STATUS_EVERY_S):
            write_status(cfg.lab.status, boards, running=True)
    finally:
        for board in boards:
            board.stop()
        write_status(cfg.lab.status, boards, running=False)
    failed = [b.meter.id for b in boards if b.exit_code not in (None, 3)]
    if failed:
        print(f"hil.lab: boards stopped with an error: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.lab", description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path, help="the lab file (lab.toml)")
    ns = parser.parse_args(argv)
    try:
        cfg = load(ns.config)
    except MeterChainError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    started = time.monotonic()
    code = run(cfg, stop)
    took = time.monotonic() - started
    print(f"hil.lab: {len(cfg.meters)} boards ran {took:.0f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
