"""The hardware abstraction: the only firmware module that touches machine, network and ntptime.

`Board` is what the rest of the firmware is given: the flash, ticks and sleep, the
RTC in Unix seconds, the hardware random source, WiFi, a TLS socket to the broker,
the meter's UART / pulse input / SPI, the watchdog and the console.  The emulated
board (meterchain/board/emulated.py) and the test fakes (mcfakes.py) provide the
same methods, so every other module runs unchanged on CPython and MicroPython.

Per-board differences (ESP32, ESP32-S3, ESP32-C3) are only pin numbers, which come
from config.json; the peripherals used here exist on all three.
"""

import os
import select
import socket
import ssl
import time

import machine
import network
import ntptime

from .errors import ConfigError
from .flash import Flash
from .porterrors import NTP_ERRORS

# ESP32 ports before MicroPython 1.22-ish count from 2000-01-01; readings need Unix time.
_EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0
_UART_TIMEOUT_MS = 20  # one readinto() waits at most this long for the first byte
_PCNT_MAX = 32000  # the pulse counter wraps to 0 here (16-bit signed hardware register)
_RESET_CAUSES = {
    machine.PWRON_RESET: "power-on",
    machine.HARD_RESET: "hard reset",
    machine.WDT_RESET: "watchdog",
    machine.DEEPSLEEP_RESET: "deep sleep",
    machine.SOFT_RESET: "soft reset",
}


class Link:
    """A connected (TLS) socket in non-blocking mode, with poll-based timeouts."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def write(self, data) -> None:
        mv = memoryview(data)
        sent = 0
        while sent < len(mv):
            n = self._sock.write(mv[sent:])
            if n is None:  # would block: wait until the socket drains
                self._poll.modify(self._sock, select.POLLOUT)
                ready = self._poll.poll(10000)
                self._poll.modify(self._sock, select.POLLIN)
                if not ready:
                    raise OSError("write timed out")
                continue
            sent += n

    def recv_into(self, buf, timeout_ms: int) -> int:
        n = self._sock.readinto(buf)
        if n is None:
            if not self._poll.poll(timeout_ms):
                return 0
            n = self._sock.readinto(buf)
            if n is None:
                return 0  # readable, but not yet a whole TLS record
        if n == 0:
            raise OSError("connection closed by the broker")
        return n

    def close(self) -> None:
        self._sock.close()


class _Rs485:
    """A UART behind an RS-485 transceiver: drive DE only while transmitting."""

    def __init__(self, uart, de) -> None:
        self._uart = uart
        self._de = de

    def write(self, buf) -> None:
        self._de(1)
        self._uart.write(buf)
        self._uart.flush()  # wait until the last stop bit left the shift register
        self._de(0)

    def readinto(self, buf):
        return self._uart.readinto(buf)

    def any(self) -> int:
        return self._uart.any()

    def read(self):
        return self._uart.read()


class _Maintenance:
    """Feeds the watchdog from a timer for a while after the app was interrupted (mpremote)."""

    def __init__(self, wdt, duration_ms: int) -> None:
        self._wdt = wdt
        self._until = time.ticks_add(time.ticks_ms(), duration_ms)
        self._timer = machine.Timer(0)
        self._timer.init(mode=machine.Timer.PERIODIC, period=5000, callback=self._tick)

    def _tick(self, _timer) -> None:
        if time.ticks_diff(self._until, time.ticks_ms()) > 0:
            self._wdt.feed()
        else:
            self._timer.deinit()  # the watchdog resets the board back into the app


class Board:
    """The real ESP32 board."""

    def __init__(self) -> None:
        self.flash = Flash("")
        self._wlan = None
        self._wdt = None
        self._keep = []  # pins with IRQ handlers must stay referenced

    # -- time ------------------------------------------------------------------

    def ticks_ms(self):
        return time.ticks_ms()

    def ticks_diff(self, a, b) -> int:
        return time.ticks_diff(a, b)

    def ticks_add(self, a, delta: int):
        return time.ticks_add(a, delta)

    def sleep_ms(self, ms: int) -> None:
        if ms > 0:
            time.sleep_ms(ms)

    def time(self) -> int:
        return int(time.time()) + _EPOCH_OFFSET

    def ntp_sync(self, host: str) -> bool:
        if self._wlan is not None and not self._wlan.isconnected():
            return False  # WiFi configured but down: do not wait for a DNS timeout
        ntptime.host = host
        try:
            ntptime.settime()
            return True
        except NTP_ERRORS:
            return False

    # -- misc ------------------------------------------------------------------

    def urandom(self, n: int) -> bytes:
        # ESP32 hardware RNG (true random while the radio runs; seeded from noise at boot).
        return os.urandom(n)

    def key_entropy(self, n: int) -> bytes:
        """Random bytes for a key: with the RF on, which ESP-IDF documents as the condition
        for the hardware RNG to be a true RNG (without it, and without the bootloader's
        entropy source, its output is pseudo-random).  `mpremote` provisioning runs with
        WiFi off, so the station interface is switched on for the draw (no association is
        needed), then back off if it was off."""
        wlan = network.WLAN(network.STA_IF)
        was_active = wlan.active()
        wlan.active(True)
        try:
            time.sleep_ms(200)  # let the RF calibrate and feed the RNG
            return os.urandom(n)
        finally:
            if not was_active:
                wlan.active(False)

    def console(self, line: str) -> None:
        print(line)

    def reset_cause(self) -> str:
        return _RESET_CAUSES.get(machine.reset_cause(), "unknown")

    def reset(self) -> None:
        machine.reset()

    def watchdog(self, timeout_ms: int):
        self._wdt = machine.WDT(timeout=timeout_ms)
        return self._wdt

    def maintenance_window(self, duration_ms: int) -> None:
        """Keep an armed watchdog fed for `duration_ms` (it cannot be disarmed on ESP32)."""
        if self._wdt is not None:
            _Maintenance(self._wdt, duration_ms)

    # -- network ---------------------------------------------------------------

    def wifi_ok(self) -> bool:
        return self._wlan is not None and self._wlan.isconnected()

    def wifi_connect(self, ssid: str, password: str, timeout_ms: int) -> bool:
        if self._wlan is None:
            self._wlan = network.WLAN(network.STA_IF)
        wlan = self._wlan
        wlan.active(True)
        if wlan.isconnected():
            return True
        wlan.connect(ssid, password)
        deadline = time.ticks_add(time.ticks_ms(), timeout_ms)
        while not wlan.isconnected():
            if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                wlan.disconnect()
                return False
            time.sleep_ms(200)
        return True

    def wifi_reset(self) -> None:
        """Drop the association and the interface; the next wifi_connect starts afresh."""
        wlan = self._wlan
        if wlan is not None:
            try:
                wlan.disconnect()
            except OSError:
                pass
            wlan.active(False)

    def connect(self, host: str, port: int, tls: bool, ca, timeout_ms: int) -> Link:
        """TCP (and TLS, verifying the broker against `ca` PEM bytes) to host:port."""
        if tls and not ca:
            raise OSError("TLS without a CA certificate: refusing an unverified broker")
        addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        sock = socket.socket(addr[0], socket.SOCK_STREAM, addr[2])
        try:
            sock.settimeout(timeout_ms / 1000)
            sock.connect(addr[-1])
            if tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(cadata=ca)
                sock = ctx.wrap_socket(sock, server_hostname=host)
            sock.setblocking(False)
        except Exception:
            sock.close()
            raise
        return Link(sock)

    # -- meter hardware ----------------------------------------------------------

    def uart(self, uart_id: int, baud: int, tx: int, rx: int, de: int):
        uart = machine.UART(
            uart_id, baudrate=baud, bits=8, parity=None, stop=1, tx=tx, rx=rx,
            timeout=_UART_TIMEOUT_MS, timeout_char=5, rxbuf=256,
        )
        if de < 0:
            return uart
        return _Rs485(uart, machine.Pin(de, machine.Pin.OUT, value=0))

    def sim_meter_uart(self, cfg: dict):
        raise ConfigError("config.json", "meter.type", "sim is for emulated boards only")

    def pulse_counter(self, pin: int, filter_us: int):
        """Falling edges on `pin` (S0 pulls the line low): the hardware counter if there is one."""
        from .meters.s0 import EdgeCounter, WrapCounter

        p = machine.Pin(pin, machine.Pin.IN, machine.Pin.PULL_UP)
        self._keep.append(p)
        try:
            import esp32

            pcnt = esp32.PCNT(
                0, pin=p, falling=esp32.PCNT.INCREMENT, rising=esp32.PCNT.IGNORE,
                filter=min(filter_us * 80, 1023), min=0, max=_PCNT_MAX,
            )
            pcnt.start()
            self._keep.append(pcnt)
            return WrapCounter(pcnt.value, _PCNT_MAX)
        except (ImportError, AttributeError):
            pass  # a port before 1.27 (no esp32.PCNT): count in a scheduled handler
        counter = EdgeCounter()
        p.irq(trigger=machine.Pin.IRQ_FALLING, handler=counter.edge)
        return counter

    def spi(self, bus: int, sck: int, mosi: int, miso: int, cs: int):
        spi = machine.SPI(
            bus, baudrate=200000, polarity=1, phase=1,
            sck=machine.Pin(sck), mosi=machine.Pin(mosi), miso=machine.Pin(miso),
        )
        return spi, machine.Pin(cs, machine.Pin.OUT, value=1)

    def pin_in(self, pin: int):
        return machine.Pin(pin, machine.Pin.IN, machine.Pin.PULL_UP)
