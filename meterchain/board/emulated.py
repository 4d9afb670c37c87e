"""An emulated meter board: the real firmware under CPython, a folder as its flash.

`EmulatedBoard(folder)` implements the firmware's HAL (see firmware/lib/mc/hal.py)
with host resources: wall-clock ticks, `os.urandom`, a real TCP/TLS socket to the
broker (CPython's ssl, verifying the broker against the board's `ca.pem`), the meter
UART either simulated in-process (`mcfakes.SimulatedSdm`, Modbus RTU byte by byte)
or a real serial port / pseudo-terminal through pyserial (for instance to the
pymodbus-emulated SDM630 of `hil.emulated_meter` behind a `NullModem`).

Settings that only make sense for an emulation live in `emulator.json` in the folder:

    {"meter": "sim" | "serial:/dev/pts/7" | "none",
     "sim_power_w": 1500,          simulated meter power (W; negative: export); default
                                   1500 W imported, or 1500 W exported by a board
                                   whose source generates (pv, wind)
     "interval_ms": 200,           sampling interval override (tests, benchmarks)
     "ntp": true, "wifi": true,    whether NTP / WiFi "work"
     "clock": {"start": ..., "speed": ..., "anchor" or "anchor_file": ...},
                                   the real-time clock reads this market clock
                                   (meterchain.site.clock; a lab's accelerated day)
     "console": true}              also echo the console to stdout

The console goes to `console.log` in the folder, as the serial console would.

`run_board(folder, ...)` boots the firmware in-process (the repository's firmware,
or the folder's own `lib/` when run as `python -m meterchain.board.emulated run DIR`
in a process of its own, which is how `board deploy` and the HIL rig use it).
Stopping a board (`stop()`, SIGTERM or SIGKILL of the process) is a power cut: RAM
is lost, flash keeps what was written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_LIB = REPO_ROOT / "firmware" / "lib"
EMULATOR_FILE = "emulator.json"
CONSOLE_FILE = "console.log"
SIM_POWER_W = 1500  # the simulated meter's power when emulator.json sets none
GENERATING_SOURCES = ("pv", "wind")
DEFAULT_SETTINGS: dict[str, Any] = {
    "meter": "sim",
    "sim_power_w": None,
    "interval_ms": None,
    "ntp": True,
    "wifi": True,
    "clock": None,
    "console": False,
}


def _mbedtls_verify_text(exc: ssl.SSLCertVerificationError) -> str:
    """The text mbedtls_x509_crt_verify_info gives the port's ValueError for this failure."""
    why = str(exc.verify_message or exc)
    if "not yet valid" in why:
        return "The certificate validity starts in the future\n"
    if "expired" in why:
        return "The certificate validity has expired\n"
    if "mismatch" in why or "match" in why:
        return "The certificate Common Name (CN) does not match with the expected CN\n"
    return "The certificate is not correctly signed by the trusted CA\n"


class BoardStopped(BaseException):
    """The emulated board lost power (stop() was called): unwinds the firmware at once."""


class WatchdogReset(BaseException):
    """The firmware left its watchdog unfed for longer than the timeout."""


def ensure_firmware_importable(lib: Path | None = None) -> Path:
    """Make the firmware package `mc` (and `mcfakes`) importable; returns where `mc` lives.

    An already imported `mc` wins (one CPython process runs one firmware); `lib` is
    put first on sys.path otherwise, and the repository's firmware/lib is appended
    for `mcfakes`, which is never deployed to a board.
    """
    if lib is not None and "mc" not in sys.modules and str(lib) not in sys.path:
        sys.path.insert(0, str(lib))
    if str(FIRMWARE_LIB) not in sys.path:
        sys.path.append(str(FIRMWARE_LIB))
    import mc

    return Path(mc.__file__).resolve().parent


def load_settings(folder: Path) -> dict[str, Any]:
    settings = dict(DEFAULT_SETTINGS)
    path = folder / EMULATOR_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        unknown = set(data) - set(DEFAULT_SETTINGS)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        settings.update(data)
    return settings


class SocketLink:
    """A connected socket (TLS or plain) with the firmware's Link interface."""

    def __init__(self, sock: socket.socket, alive: Any = None) -> None:
        self._sock = sock
        self._alive = alive  # raises when the board lost power or its watchdog fired

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._alive is not None:
            self._alive()
        self._sock.settimeout(10.0)
        self._sock.sendall(data)

    def recv_into(self, buf: memoryview | bytearray, timeout_ms: int) -> int:
        # Wait in short slices so a power cut (stop) interrupts a long wait promptly.
        deadline = time.monotonic() + max(timeout_ms, 0) / 1000
        while True:
            if self._alive is not None:
                self._alive()
            left = deadline - time.monotonic()
            self._sock.settimeout(min(max(left, 0.0), 0.1))
            try:
                n = self._sock.recv_into(buf)
            except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
                if left <= 0.1:
                    return 0
                continue
            if n == 0:
                raise OSError("connection closed by the broker")
            return n

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


class SerialUart:
    """A pyserial port (or URL) with the subset of machine.UART the Modbus driver uses."""

    def __init__(self, port: str, baud: int, timeout_ms: int = 20) -> None:
        import serial

        self._serial = serial.serial_for_url(port, baudrate=baud, timeout=timeout_ms / 1000)

    def write(self, buf: bytes | bytearray | memoryview) -> int:
        n = self._serial.write(bytes(buf)) or 0
        self._serial.flush()
        return n

    def any(self) -> int:
        return int(self._serial.in_waiting)

    def read(self) -> bytes | None:
        n = self._serial.in_waiting
        return self._serial.read(n) if n else None

    def readinto(self, buf: memoryview | bytearray) -> int | None:
        data = self._serial.read(len(buf))
        if not data:
            return None
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._serial.close()


class EmulatedWatchdog:
    """machine.WDT semantics, checked whenever the firmware sleeps."""

    def __init__(self, board: EmulatedBoard, timeout_ms: int) -> None:
        self._board = board
        self.timeout_ms = timeout_ms
        self.last = time.monotonic()

    def feed(self) -> None:
        self.last = time.monotonic()

    def check(self) -> None:
        if (time.monotonic() - self.last) * 1000 > self.timeout_ms:
            raise WatchdogReset(f"watchdog not fed for {self.timeout_ms} ms")


class EmulatedBoard:
    """The firmware HAL on a host; see the module docstring."""

    def __init__(
        self,
        folder: str | Path,
        *,
        settings: dict[str, Any] | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        ensure_firmware_importable()
        from mc.flash import Flash

        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = load_settings(self.folder) if settings is None else settings
        self.flash = Flash(str(self.folder))
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self._t0 = time.monotonic()
        self._market_clock: Any = None
        clock = self.settings.get("clock")
        if clock:
            from meterchain.site.clock import MarketClock

            anchor_file = clock.get("anchor_file")
            self._market_clock = MarketClock(
                int(clock["start"]), float(clock["speed"]), float(clock.get("anchor", 0.0)),
                Path(anchor_file) if anchor_file else None,
            )  # fmt: skip
        self._console_lock = threading.Lock()
        self._console: TextIO = open(self.folder / CONSOLE_FILE, "a", buffering=1)  # noqa: SIM115
        self._wdt: EmulatedWatchdog | None = None
        self._uart: Any = None
        self.meter: Any = None  # the SimulatedSdm when the meter is simulated
        self.s0: Any = None
        self.atm: Any = None
        self.links: list[SocketLink] = []
        self.wifi_resets = 0

    # -- time ------------------------------------------------------------------

    def ticks_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000)

    def ticks_diff(self, a: int, b: int) -> int:
        return a - b

    def ticks_add(self, a: int, delta: int) -> int:
        return a + delta

    def _alive(self) -> None:
        if self.stop_event.is_set():
            raise BoardStopped()
        if self._wdt is not None:
            self._wdt.check()

    def sleep_ms(self, ms: int) -> None:
        self._alive()
        if ms > 0 and self.stop_event.wait(ms / 1000):
            raise BoardStopped()

    def time(self) -> int:
        if self._market_clock is not None:
            return int(self._market_clock.now())
        return int(time.time())

    def ntp_sync(self, host: str) -> bool:
        return bool(self.settings["ntp"]) and bool(self.settings["wifi"])

    # -- misc ------------------------------------------------------------------

    def urandom(self, n: int) -> bytes:
        return os.urandom(n)

    def key_entropy(self, n: int) -> bytes:
        return os.urandom(n)  # the host's CSPRNG (a board switches its RF on for this)

    def console(self, line: str) -> None:
        with self._console_lock:
            self._console.write(line + "\n")
        if self.settings.get("console"):
            print(line, flush=True)

    def reset_cause(self) -> str:
        return "power-on"

    def reset(self) -> None:
        raise BoardStopped()

    def watchdog(self, timeout_ms: int) -> EmulatedWatchdog:
        self._wdt = EmulatedWatchdog(self, timeout_ms)
        return self._wdt

    def close(self) -> None:
        for link in self.links:
            link.close()
        if self._uart is not None and hasattr(self._uart, "close"):
            self._uart.close()
        with self._console_lock:
            self._console.close()

    # -- network ---------------------------------------------------------------

    def wifi_ok(self) -> bool:
        return bool(self.settings["wifi"])

    def wifi_connect(self, ssid: str, password: str, timeout_ms: int) -> bool:
        return bool(self.settings["wifi"])

    def wifi_reset(self) -> None:
        self.wifi_resets += 1

    def connect(
        self, host: str, port: int, tls: bool, ca: bytes | None, timeout_ms: int
    ) -> SocketLink:
        """TCP (and TLS) to the broker, raising what the ESP32 port raises (mc.porterrors).

        A certificate the handshake refuses is a ValueError carrying mbedtls' verify
        text; DNS, TCP and other TLS failures are OSError; the real port never raises
        CPython's ssl exception types, so neither does this.
        """
        self._alive()
        if not self.settings["wifi"]:
            raise OSError(-202)  # the port's getaddrinfo error without a network
        try:
            sock = socket.create_connection((host, port), timeout=timeout_ms / 1000)
        except OSError as exc:
            raise OSError(exc.errno or 116, f"connect to {host}:{port}: {exc}") from None
        try:
            if tls:
                if not ca:
                    raise OSError("TLS without a CA certificate: refusing an unverified broker")
                sock = self._tls(sock, host, ca)
        except BaseException:
            sock.close()
            raise
        link = SocketLink(sock, self._alive)
        self.links = [link]
        return link

    def _tls(self, sock: socket.socket, host: str, ca: bytes) -> socket.socket:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_verify_locations(cadata=ca.decode())
        except (ssl.SSLError, ValueError, UnicodeDecodeError):
            raise ValueError("invalid cert") from None  # load_verify_locations on the port
        try:
            return ctx.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise ValueError(_mbedtls_verify_text(exc)) from None
        except OSError as exc:
            raise OSError(exc.errno or -29312, f"TLS handshake with {host}: {exc}") from None

    # -- meter hardware ----------------------------------------------------------

    def _sim_uart(self, unit: int, source: str | None = None, baud: int = 9600) -> Any:
        from mcfakes import SdmUart, SimulatedSdm

        power = self.settings["sim_power_w"]
        if power is None:  # a generating board's simulated meter exports
            power = -SIM_POWER_W if source in GENERATING_SOURCES else SIM_POWER_W
        self.meter = SimulatedSdm(self, unit=unit, power_w=int(power))
        return SdmUart(self.meter, self, baud=baud)

    def uart(self, uart_id: int, baud: int, tx: int, rx: int, de: int) -> Any:
        meter = str(self.settings["meter"])
        if meter.startswith("serial:"):
            self._uart = SerialUart(meter[len("serial:") :], baud)
        elif meter == "sim":
            self._uart = self._sim_uart(1, baud=baud)
        else:
            self._uart = SerialUart("loop://", baud)  # nothing answers: every read times out
        return self._uart

    def sim_meter_uart(self, cfg: dict[str, Any]) -> Any:
        unit, baud = int(cfg["meter.unit"]), int(cfg.get("meter.baud", 9600))
        self._uart = self._sim_uart(unit, cfg.get("source"), baud)
        return self._uart

    def pulse_counter(self, pin: int, filter_us: int) -> Any:
        from mc.meters.s0 import EdgeCounter

        self.s0 = EdgeCounter()
        return self.s0

    def spi(self, bus: int, sck: int, mosi: int, miso: int, cs: int) -> tuple[Any, Any]:
        from mcfakes import FakeAtm90e32Spi

        self.atm = FakeAtm90e32Spi()
        return self.atm, self.atm.cs

    def pin_in(self, pin: int) -> Any:
        from mcfakes import FakePin

        return FakePin(0)


def run_board(
    folder: str | Path,
    *,
    cycles: int | None = None,
    duration_s: float | None = None,
    stop_event: threading.Event | None = None,
    settings: dict[str, Any] | None = None,
    on_app: Any = None,
) -> int:
    """Boot the firmware on an emulated board until it stops; returns an exit status.

    0: a finite run (`cycles`) completed; 2: safe mode; 3: stopped (power cut, the
    normal end of `duration_s` or `stop_event`); 4: watchdog reset.
    `on_app(app)` is called with the running App (tests and benchmarks inspect it).
    """
    stop = stop_event if stop_event is not None else threading.Event()
    board = EmulatedBoard(folder, settings=settings, stop_event=stop)
    timer = None
    if duration_s is not None:
        timer = threading.Timer(duration_s, stop.set)
        timer.daemon = True
        timer.start()
    from mc import app as firmware_app
    from mc import config, keystore
    from mc.config import ConfigError

    try:
        try:
            cfg = config.load(board.flash)
            secret = keystore.load(board.flash)
            application = firmware_app.App(
                board, cfg, secret, interval_ms=board.settings.get("interval_ms")
            )
        except ConfigError as exc:
            firmware_app.safe_mode(board, exc)
            return 2
        if on_app is not None:
            on_app(application)
        application.run(cycles)
        return 0
    except BoardStopped:
        return 3
    except WatchdogReset as exc:
        board.console(f"MC E emulated watchdog reset: {exc}")
        return 4
    finally:
        if timer is not None:
            timer.cancel()
        board.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meterchain.board.emulated",
        description="Run an emulated meter board (firmware under CPython) on a folder.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot the board in FOLDER until killed")
    run.add_argument("folder", type=Path)
    run.add_argument("--cycles", type=int, help="stop after this many readings (drained)")
    run.add_argument("--duration", type=float, help="power off after this many seconds")
    run.add_argument("--console", action="store_true",
                     help="also print the board's console on stdout (it always goes to "
                          f"{CONSOLE_FILE})")  # fmt: skip
    exec_parser = sub.add_parser("exec", help="run firmware code with `board` defined")
    exec_parser.add_argument("folder", type=Path)
    exec_parser.add_argument("code")
    ns = parser.parse_args(argv)
    # Whatever the firmware writes to its flash (key.bin, the spool) is for its eyes only.
    os.umask(0o077)
    folder = ns.folder.resolve()
    # The board's own firmware, as deployed into its flash, when there is one.
    lib = folder / "lib"
    ensure_firmware_importable(lib if (lib / "mc").is_dir() else None)
    if ns.command == "exec":
        board = EmulatedBoard(folder)
        try:
            exec(compile(ns.code, "<board exec>", "exec"), {"board": board})  # noqa: S102
        finally:
            board.close()
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = load_settings(folder)
    settings["console"] = settings["console"] or ns.console
    return run_board(
        folder, cycles=ns.cycles, duration_s=ns.duration, stop_event=stop, settings=settings
    )


if __name__ == "__main__":
    sys.exit(main())
