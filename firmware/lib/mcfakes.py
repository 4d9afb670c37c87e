"""Test doubles for the board's hardware, runnable under MicroPython and CPython alike.

Not part of the board image (it sits outside the `mc` package and its manifest): tests
and the emulated board use it to run the real firmware without an ESP32.

- `FakeBoard`: the HAL with virtual time (sleeping advances a counter, so hours of
  sampling run in milliseconds), a folder as flash, entropy from the host.
- `SimulatedSdm` + `SdmUart`: an SDM630/SDM120 answering Modbus RTU byte by byte, so
  the real driver (CRC, framing, timeouts) runs against it; faults on demand.
- `FakeBroker` + `FakeLink`: an in-memory MQTT 3.1.1 broker (CONNECT, PUBLISH QoS 1,
  PUBACK, PINGREQ) that can go down, refuse credentials or swallow PUBACKs.
- `CutFlash`: a flash that loses power after a given number of bytes written.
- `FakeAtm90e32Spi`, `FakePin`, `FakeWatchdog`.
"""

import struct

from mc.flash import Flash
from mc.meters.s0 import Debouncer


def host_random(n: int) -> bytes:
    """Entropy from the host: the runner's `_host` module under WebAssembly, else os.urandom."""
    try:
        import _host  # type: ignore[import-not-found]

        return bytes.fromhex(_host.urandom_hex(n))
    except ImportError:
        import os

        return os.urandom(n)


class PowerCut(BaseException):
    """Raised by CutFlash when its byte budget runs out: the board lost power here."""


# -- time -----------------------------------------------------------------------


class VirtualClock:
    """Milliseconds that advance only when someone sleeps or waits."""

    def __init__(self, unix_start: int = 1767225600) -> None:
        self.now_ms = 0
        self.unix_start = unix_start

    def advance(self, ms: int) -> None:
        if ms > 0:
            self.now_ms += ms


# -- flash ----------------------------------------------------------------------


class _CutFile:
    def __init__(self, flash, f) -> None:
        self._flash = flash
        self._f = f

    def write(self, data) -> int:
        return self._flash._spend(self._f, data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class CutFlash(Flash):
    """A Flash that lets `budget` events happen, then cuts the power.

    Every byte written is one event and every rename or remove is one event; the
    event that exceeds the budget does not happen (a write keeps only the bytes
    before it) and raises PowerCut, as does everything after it.  `budget=None`
    never cuts, and then `events` counts what a run does.
    """

    def __init__(self, root: str = "", budget=None) -> None:
        super().__init__(root)
        self.budget = budget
        self.events = 0
        self.cut = False

    def _check(self) -> None:
        if self.cut:
            raise PowerCut()

    def _step(self) -> None:
        self._check()
        if self.budget is not None and self.events >= self.budget:
            self.cut = True
            raise PowerCut()
        self.events += 1

    def _spend(self, f, data) -> int:
        self._check()
        n = len(data)
        if self.budget is not None and self.events + n > self.budget:
            keep = self.budget - self.events
            if keep > 0:
                f.write(bytes(data[:keep]))
                f.flush()
            self.events = self.budget
            self.cut = True
            raise PowerCut()
        self.events += n
        return f.write(data)

    def open(self, name: str, mode: str):
        self._check()
        f = super().open(name, mode)
        if "r" in mode and "+" not in mode:
            return f
        return _CutFile(self, f)

    def replace(self, src: str, dst: str) -> None:
        self._step()
        super().replace(src, dst)

    def remove(self, name: str) -> None:
        if self.exists(name):
            self._step()
        super().remove(name)

    def durable(self, f) -> None:
        self._check()
        f.flush()


# -- Modbus meter ----------------------------------------------------------------


def _crc16(data) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


class SimulatedSdm:
    """An SDM630 (or SDM120) integrating a constant-or-scheduled power over virtual time.

    Registers are float32 kWh/W as on the real meter.  `power_w` may be changed at
    any time; energy accrues at the previous power up to that moment.
    """

    def __init__(self, ticks, unit: int = 1, power_w: int = 1500, import_wh: int = 1234500,
                 export_wh: int = 56700, model: str = "sdm630") -> None:
        self._ticks = ticks  # anything with ticks_ms() and ticks_diff()
        self.unit = unit
        self.power_w = power_w
        self.import_mwh = import_wh * 1000  # milli-Wh, exact
        self.export_mwh = export_wh * 1000
        self.model = model
        self._last = ticks.ticks_ms()
        self.requests = 0

    def set_power(self, power_w: int) -> None:
        self._integrate()
        self.power_w = power_w

    def _integrate(self) -> None:
        now = self._ticks.ticks_ms()
        dt = self._ticks.ticks_diff(now, self._last)
        self._last = now
        if dt <= 0:
            return
        delta = abs(self.power_w) * dt // 3600  # W * ms / 3600 = mWh
        if self.power_w >= 0:
            self.import_mwh += delta
        else:
            self.export_mwh += delta

    def register_value(self, address: int):
        """The float value shown at a register pair, or None if unmapped."""
        self._integrate()
        if address == 0x0048:
            return self.import_mwh / 1e6
        if address == 0x004A:
            return self.export_mwh / 1e6
        if address == (0x000C if self.model == "sdm120" else 0x0034):
            return float(self.power_w)
        if address == 0x0000:
            return 230.0
        return None

    def respond(self, frame) -> bytes:
        """The RTU reply to one request frame (b"" when the meter would stay silent)."""
        if len(frame) != 8 or frame[0] != self.unit:
            return b""
        if _crc16(frame[:6]) != frame[6] | (frame[7] << 8):
            return b""  # a real slave ignores a frame with a bad CRC
        self.requests += 1
        fc = frame[1]
        address, count = struct.unpack(">HH", bytes(frame[2:6]))
        if fc != 0x04:
            body = bytes([self.unit, fc | 0x80, 1])
        elif count < 1 or count > 80 or count & 1 or address & 1:
            body = bytes([self.unit, 0x84, 3])
        else:
            data = bytearray()
            for reg in range(address, address + count, 2):
                value = self.register_value(reg)
                if value is None and reg > 0x0200:
                    data = None
                    break
                data += struct.pack(">f", value if value is not None else 0.0)
            if data is None:
                body = bytes([self.unit, 0x84, 2])
            else:
                body = bytes([self.unit, 0x04, len(data)]) + bytes(data)
        crc = _crc16(body)
        return body + bytes([crc & 0xFF, crc >> 8])


class SdmUart:
    """A UART wired to a SimulatedSdm, with injectable faults.

    `corrupt_next(n)` flips a byte in the next n replies, `drop_next(n)` makes the meter
    stay silent n times, `unplug()` / `plug()` cut the wire.  An empty read costs the
    UART timeout in virtual time (or real time on a real clock).
    """

    def __init__(self, meter: SimulatedSdm, board, timeout_ms: int = 20) -> None:
        self.meter = meter
        self._board = board
        self._timeout_ms = timeout_ms
        self._rx = bytearray()
        self._corrupt = 0
        self._drop = 0
        self.plugged = True

    def corrupt_next(self, n: int = 1) -> None:
        self._corrupt += n

    def drop_next(self, n: int = 1) -> None:
        self._drop += n

    def unplug(self) -> None:
        self.plugged = False

    def plug(self) -> None:
        self.plugged = True

    def write(self, buf) -> int:
        reply = self.meter.respond(bytes(buf)) if self.plugged else b""
        if reply and self._drop:
            self._drop -= 1
            reply = b""
        if reply and self._corrupt:
            self._corrupt -= 1
            reply = bytearray(reply)
            reply[len(reply) // 2] ^= 0x5A
        self._rx += reply
        return len(buf)

    def any(self) -> int:
        return len(self._rx)

    def read(self):
        data = bytes(self._rx)
        self._rx = bytearray()
        return data

    def readinto(self, buf):
        if not self._rx:
            self._board.sleep_ms(self._timeout_ms)
            return None
        n = min(len(buf), len(self._rx))
        buf[:n] = self._rx[:n]
        self._rx = self._rx[n:]
        return n


# -- ATM90E32 -------------------------------------------------------------------


class FakeAtm90e32Spi:
    """The ATM90E32's SPI register protocol with read-clear energy counters."""

    def __init__(self) -> None:
        self.regs = {}
        self.selected = False
        self._phase = 0
        self._address = 0
        self._read = False
        self.present = True

    def cs(self, value: int) -> None:
        self.selected = not value
        self._phase = 0

    def add_energy(self, forward: int, reverse: int = 0) -> None:
        """Accrue counts of 0.01 CF in the read-clear registers (wrapping like the chip)."""
        self.regs[0x80] = (self.regs.get(0x80, 0) + forward) & 0xFFFF
        self.regs[0x84] = (self.regs.get(0x84, 0) + reverse) & 0xFFFF

    def set_power(self, counts: int) -> None:
        raw = counts & 0xFFFFFFFF
        self.regs[0xB0] = raw >> 16
        self.regs[0xC0] = raw & 0xFFFF

    def write(self, buf) -> None:
        if not self.selected:
            return
        if self._phase == 0:
            self._read = bool(buf[0] & 0x80)
            self._address = ((buf[0] & 0x03) << 8) | buf[1]
            self._phase = 1
        elif not self._read:
            self.regs[self._address] = (buf[0] << 8) | buf[1]

    def readinto(self, buf, write_byte: int = 0) -> None:
        if not self.present:
            buf[0] = buf[1] = 0xFF
            return
        value = self.regs.get(self._address, 0)
        if self._address in (0x80, 0x84):
            self.regs[self._address] = 0  # read-clear
        buf[0] = value >> 8
        buf[1] = value & 0xFF


# -- MQTT -----------------------------------------------------------------------


class FakeBroker:
    """An in-memory MQTT 3.1.1 broker for QoS 1 publishers.

    `messages` lists (topic, payload) in arrival order.  `users` maps usernames to
    passwords (None accepts anyone); `acl` maps usernames to the one topic each may
    publish to (a denied publish is acknowledged and dropped, as Mosquitto does with
    MQTT 3.1.1).  `up = False` refuses connects and breaks open links;
    `swallow_acks = n` drops the next n PUBACKs; `silent` stops all answers.
    """

    def __init__(self, users=None, acl=None, keep: bool = True) -> None:
        self.users = users
        self.acl = acl
        self.keep = keep  # False: count messages without keeping them (heap measurements)
        self.received = 0
        self.messages = []
        self.up = True
        self.silent = False  # accepts and reads everything, answers nothing
        self.swallow_acks = 0
        self.connects = 0
        self.refused = 0
        self.denied = 0
        self.links = []

    def open(self, clock):
        if not self.up:
            raise OSError("connection refused")
        link = FakeLink(self, clock)
        self.links.append(link)
        return link

    def stop(self) -> None:
        self.up = False
        for link in self.links:
            link.broken = True
        self.links = []

    def start(self) -> None:
        self.up = True


def _mqtt_str(data, pos: int):
    n = (data[pos] << 8) | data[pos + 1]
    return bytes(data[pos + 2 : pos + 2 + n]), pos + 2 + n


class FakeLink:
    """The client end of a connection to a FakeBroker (the Link interface of the HAL)."""

    def __init__(self, broker: FakeBroker, clock) -> None:
        self._broker = broker
        self._clock = clock
        self._in = bytearray()  # client -> broker, not yet parsed
        self._out = bytearray()  # broker -> client
        self.broken = False
        self.closed = False
        self.user = None

    def write(self, data) -> None:
        if self.broken or self.closed:
            raise OSError("link down")
        self._in += bytes(data)
        self._parse()

    def recv_into(self, buf, timeout_ms: int) -> int:
        if self.broken or self.closed:
            raise OSError("link down")
        if not self._out:
            self._clock.sleep_ms(timeout_ms)
            if self.broken:
                raise OSError("link down")
            return 0
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        self.closed = True

    def _parse(self) -> None:
        data = self._in
        while len(data) >= 2:
            length = 0
            shift = 0
            pos = 1
            while True:
                if pos >= len(data):
                    return
                byte = data[pos]
                length |= (byte & 0x7F) << shift
                pos += 1
                if not byte & 0x80:
                    break
                shift += 7
            if len(data) < pos + length:
                return
            self._handle(data[0], bytes(data[pos : pos + length]))
            data = data[pos + length :]
            self._in = data

    def _handle(self, head: int, body: bytes) -> None:
        broker = self._broker
        kind = head & 0xF0
        if broker.silent:
            return
        if kind == 0x10:
            flags = body[7]
            pos = 10
            _client, pos = _mqtt_str(body, pos)
            user = password = None
            if flags & 0x80:
                user, pos = _mqtt_str(body, pos)
            if flags & 0x40:
                password, pos = _mqtt_str(body, pos)
            ok = broker.users is None or (
                user is not None and broker.users.get(user.decode()) == (password or b"").decode()
            )
            if ok:
                self.user = user.decode() if user is not None else None
                broker.connects += 1
                self._out += b"\x20\x02\x00\x00"
            else:
                broker.refused += 1
                self._out += b"\x20\x02\x00\x05"
        elif kind == 0x30:
            topic, pos = _mqtt_str(body, 0)
            pid = (body[pos] << 8) | body[pos + 1]
            payload = body[pos + 2 :]
            allowed = broker.acl is None or broker.acl.get(self.user) == topic.decode()
            if allowed:
                broker.received += 1
                if broker.keep:
                    broker.messages.append((topic.decode(), payload))
            else:
                broker.denied += 1
            if broker.swallow_acks:
                broker.swallow_acks -= 1
            else:
                self._out += bytes([0x40, 2, pid >> 8, pid & 0xFF])
        elif kind == 0xC0:
            self._out += b"\xd0\x00"
        elif kind == 0xE0:
            self.closed = True


# -- pins, watchdog -------------------------------------------------------------


class FakePin:
    def __init__(self, value: int = 0) -> None:
        self._value = value

    def value(self, *args):
        if args:
            self._value = args[0]
            return None
        return self._value

    def __call__(self, *args):
        return self.value(*args)


class FakeWatchdog:
    """Records feeds; `starved` says whether the app ever left it unfed too long."""

    def __init__(self, clock, timeout_ms: int) -> None:
        self._clock = clock
        self.timeout_ms = timeout_ms
        self.last = clock.ticks_ms()
        self.feeds = 0
        self.longest_ms = 0

    def feed(self) -> None:
        now = self._clock.ticks_ms()
        gap = self._clock.ticks_diff(now, self.last)
        if gap > self.longest_ms:
            self.longest_ms = gap
        self.last = now
        self.feeds += 1

    @property
    def starved(self) -> bool:
        return self.longest_ms > self.timeout_ms


# -- the board ------------------------------------------------------------------


class FakeBoard:
    """The HAL for tests: virtual time, a folder as flash, fake peripherals.

    `broker` is a FakeBroker (or None for "no network"); `meter` a SimulatedSdm built
    on first use; `console_lines` collects what the firmware prints when
    `echo=False`.
    """

    def __init__(self, flash=None, broker=None, clock=None, ntp_ok: bool = True,
                 echo: bool = True, meter_power_w: int = 1500, meter_import_wh: int = 1234500,
                 unix_start: int = 1767225600) -> None:
        self.flash = flash if flash is not None else Flash("")
        self.clock = clock if clock is not None else VirtualClock(unix_start)
        self.broker = broker
        self.ntp_ok = ntp_ok
        self.wifi_up = True
        self.echo = echo
        self.keep_console = True  # False: drop console lines (heap measurements)
        self.console_lines = []
        self.meter = None
        self.meter_uart = None
        self._meter_power_w = meter_power_w
        self._meter_import_wh = meter_import_wh
        self.atm = FakeAtm90e32Spi()
        self.s0 = None
        self.pins = {}
        self.wdt = None
        self.resets = 0

    # time
    def ticks_ms(self) -> int:
        return self.clock.now_ms

    def ticks_diff(self, a: int, b: int) -> int:
        return a - b

    def ticks_add(self, a: int, delta: int) -> int:
        return a + delta

    def sleep_ms(self, ms: int) -> None:
        self.clock.advance(ms)

    def time(self) -> int:
        return self.clock.unix_start + self.clock.now_ms // 1000

    def ntp_sync(self, host: str) -> bool:
        return self.ntp_ok and self.wifi_up

    # misc
    def urandom(self, n: int) -> bytes:
        return host_random(n)

    def console(self, line: str) -> None:
        if self.keep_console:
            self.console_lines.append(line)
        if self.echo:
            print(line)

    def reset_cause(self) -> str:
        return "power-on"

    def reset(self) -> None:
        self.resets += 1
        raise PowerCut()

    def watchdog(self, timeout_ms: int):
        self.wdt = FakeWatchdog(self, timeout_ms)
        return self.wdt

    # network
    def wifi_ok(self) -> bool:
        return self.wifi_up

    def wifi_connect(self, ssid: str, password: str, timeout_ms: int) -> bool:
        return self.wifi_up

    def connect(self, host: str, port: int, tls: bool, ca, timeout_ms: int):
        if self.broker is None or not self.wifi_up:
            self.sleep_ms(100)
            raise OSError("no route to %s" % host)
        return self.broker.open(self)

    # meter hardware
    def _sdm_uart(self, unit: int):
        if self.meter_uart is None:
            self.meter = SimulatedSdm(self, unit=unit, power_w=self._meter_power_w,
                                      import_wh=self._meter_import_wh)
            self.meter_uart = SdmUart(self.meter, self)
        return self.meter_uart

    def uart(self, uart_id: int, baud: int, tx: int, rx: int, de: int):
        return self._sdm_uart(1)

    def sim_meter_uart(self, cfg: dict):
        return self._sdm_uart(cfg["meter.unit"])

    def pulse_counter(self, pin: int, debounce_ms: int):
        self.s0 = Debouncer(debounce_ms, self.ticks_diff)
        return self.s0

    def spi(self, bus: int, sck: int, mosi: int, miso: int, cs: int):
        return self.atm, self.atm.cs

    def pin_in(self, pin: int):
        if pin not in self.pins:
            self.pins[pin] = FakePin(0)
        return self.pins[pin]


def write_config(flash, cfg: dict, secrets=None) -> None:
    """Write config.json (and secrets.json) into a flash, as provisioning does."""
    import json

    flash.write_atomic("config.json", json.dumps(cfg).encode())
    if secrets is not None:
        flash.write_atomic("secrets.json", json.dumps(secrets).encode())
