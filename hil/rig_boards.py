"""A rig's emulated boards on command: SDM630s on Modbus RTU and boards the checks drive.

Each meter is an `hil.emulated_meter.EmulatedSdm630` behind a `NullModem`
(a pair of pseudo-terminals, so the board speaks real Modbus RTU with CRCs),
driven by an hourly power table. Each board is
`meterchain.board.emulated.EmulatedBoard` running the real firmware `App`
(sample, sign, spool, publish over MQTT until PUBACK) with one change: its
real-time clock reads the rig's virtual clock, and the conformance checks
(`hil.scenarios`) say when it samples and publishes. (A site's lab, where
boards run on their own, is `hil.lab`.)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOUR = 3600


class VirtualClock:
    """Simulated Unix time that only the rig advances (thread-safe)."""

    def __init__(self, start: float) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def set(self, t: float) -> None:
        with self._lock:
            if t < self._now:
                raise ValueError(f"virtual time cannot run backwards ({t} < {self._now})")
            self._now = float(t)


@dataclass
class HourlyPower:
    """A `hil.profiles.PowerProfile`: constant power per simulated hour, W (+ import, - export)."""

    watts: dict[int, int] = field(default_factory=dict)
    default_w: int = 0  # hours not in `watts`
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, hour: int, power_w: int) -> None:
        with self.lock:
            self.watts[hour] = power_w

    def power_w(self, t: float) -> float:
        with self.lock:
            return float(self.watts.get(int(t // HOUR), self.default_w))


@dataclass(frozen=True)
class MeterSpec:
    meter_id: str
    owner: str
    source: str  # "pv" / "wind" (export), "load" (import), "bidir" (point of common coupling)


class MeterLink:
    """One emulated SDM630 on its own thread, reachable over RTU at `port` (the board's end).

    Its power follows `profile` (a `hil.profiles.PowerProfile`, by default an
    `HourlyPower` table to fill) at the time `wall()` reads (the rig's or the
    site's clock).
    """

    def __init__(self, wall: Callable[[], float], seed: int, profile: Any = None) -> None:
        from hil.emulated_meter import MeterThread, NullModem

        self.profile = profile if profile is not None else HourlyPower()
        self.modem = NullModem()
        self.thread = MeterThread(
            profile=self.profile,
            serial_port=self.modem.port_b,
            baudrate=19200,
            start_time=wall(),
            speed=1.0,
            wall=wall,
            seed=seed,
            import_kwh=1000.0 + seed,
            export_kwh=500.0 + seed,
        )
        self.thread.start()

    @property
    def port(self) -> str:
        return self.modem.port_a

    def close(self) -> None:
        self.thread.stop()
        self.modem.close()


def _board_class() -> type:
    from meterchain.board.emulated import EmulatedBoard

    class DemoBoard(EmulatedBoard):  # type: ignore[misc, valid-type]
        """The emulated board with its RTC on the rig's virtual clock."""

        virtual: Callable[[], float] = time.time

        def time(self) -> int:
            return int(self.virtual())

    return DemoBoard


def write_board_config(
    folder: Path,
    spec: MeterSpec,
    market: str,
    broker_host: str,
    broker_port: int,
    meter_port: str,
    *,
    username: str = "",
    password: str = "",
    tls: bool = False,
    ca_pem: bytes | None = None,
) -> None:
    """The board's config.json/secrets.json/emulator.json, as `board provision` would write."""
    folder.mkdir(parents=True, exist_ok=True)
    broker: dict[str, Any] = {
        "host": broker_host,
        "port": broker_port,
        "tls": tls,
        "keepalive_s": 60,
        "backoff_min_ms": 50,
        "backoff_max_ms": 1000,
    }
    if username:
        broker["username"] = username
    if ca_pem is not None:
        (folder / "ca.pem").write_bytes(ca_pem)
    config = {
        "meter_id": spec.meter_id,
        "market": market,
        "source": spec.source,
        "wdt_s": 0,
        "console_readings": False,
        "meter": {"type": "sdm630", "baud": 19200, "unit": 1, "timeout_ms": 500},
        "broker": broker,
        "spool": {"batch": 1, "flush_s": 1},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "secrets.json").write_text(json.dumps({"broker": {"password": password}}))
    settings = {"meter": f"serial:{meter_port}", "ntp": True, "wifi": True, "console": False}
    (folder / "emulator.json").write_text(json.dumps(settings))


class Board:
    """One emulated board running the firmware App, sampled when the rig says so."""

    def __init__(self, folder: Path, clock: VirtualClock) -> None:
        from meterchain.board.emulated import load_settings

        board_cls = _board_class()
        self.folder = folder
        self.hal = board_cls(folder, settings=load_settings(folder))
        self.hal.virtual = clock.now
        from mc import app as firmware_app
        from mc import config, keystore, p256

        self.cfg = config.load(self.hal.flash)
        # The key is generated on the device at first boot and never leaves it.
        secret = keystore.ensure(self.hal.flash, self.hal.urandom)
        self.public_point = bytes(p256.public_key(secret))
        self.app = firmware_app.App(self.hal, self.cfg, secret)
        self.app.clock.service()  # NTP (virtual): readings are marked synced

    @property
    def meter_id(self) -> str:
        return str(self.cfg["meter_id"])

    def sample(self) -> int:
        """One reading: read the meter over RTU, sign, spool (durably); returns its seq."""
        seq = self.app.sample()
        self.app.commit()
        return seq

    def publish(self, timeout_s: float = 10.0) -> bool:
        """Publish until the broker PUBACKed every spooled reading; False on timeout.

        The spool itself empties only when an edge agent acknowledges end to end.
        """
        deadline = time.monotonic() + timeout_s
        self.app.uplink.service(0)
        while not self.app.uplink.caught_up() and time.monotonic() < deadline:
            self.app.uplink.service(20)
        self.app.housekeeping()
        return self.app.uplink.caught_up()

    @property
    def readings(self) -> int:
        return int(self.app.readings)

    @property
    def acked(self) -> int:
        return int(self.app.uplink.acked)

    @property
    def pending(self) -> int:
        return len(self.app.spool)

    def close(self) -> None:
        try:
            self.app.shutdown()
        finally:
            self.hal.close()
