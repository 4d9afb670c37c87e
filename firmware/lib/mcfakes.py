"""Test doubles for the board's hardware, runnable under MicroPython and CPython alike.

Not part of the board image (it sits outside the `mc` package and its manifest): tests
and the emulated board use it to run the real firmware without an ESP32.

- `FakeBoard`: the HAL with virtual time (sleeping advances a counter, so hours of
  sampling run in milliseconds), a folder as flash, entropy from the host.
- `SimulatedSdm` + `SdmUart`: an SDM630/SDM120 answering Modbus RTU byte by byte, so
  the real driver (CRC, framing, timeouts) runs against it; faults on demand.
- `FakeBroker` + `FakeLink`: an in-memory MQTT 3.1.1 broker (CONNECT with a will,
  PUBLISH QoS 1, PUBACK, SUBSCRIBE, retained messages, PINGREQ) with a stand-in edge
  agent that acknowledges readings end to end; it can go down, refuse credentials,
  swallow PUBACKs or hold acknowledgements back.
- `CutFlash`: a flash that loses power after a given number of bytes written;
  `FullFlash`: one that refuses writes with OSError while `full` is set.
- `FakeAtm90e32Spi`, `FakePin`, `FakeWatchdog`.
"""

import struct

from mc.flash import Flash
from mc.meters.s0 import EdgeCounter
from mc.porterrors import EAI_NONAME, ECONNRESET, ENOMEM, ETIMEDOUT


def host_random(n: int) -> bytes:
    """Entropy from the host: the runner's `_host` module under WebAssembly, else os.urandom."""
    try:
        import _host  # type: ignore[import-not-found]

        return bytes.fromhex(_host.urandom_hex(n))
    except ImportError:
        import os

        return os.urandom(n)


# (call, exception) as the ESP32 port raises them: one instance per kind listed in
# mc.porterrors.RAISES (tests check that every one is in that table and survived).
PORT_ERROR_EXAMPLES = (
    ("wifi_connect", OSError("Wifi Internal Error")),
    ("getaddrinfo", OSError(EAI_NONAME)),
    ("getaddrinfo", MemoryError()),
    ("connect", OSError(ETIMEDOUT)),
    ("connect", OSError(ECONNRESET)),  # refused
    ("tls_handshake", ValueError("The certificate validity starts in the future\n")),
    ("tls_handshake", ValueError("The certificate validity has expired\n")),
    ("tls_handshake", ValueError("The certificate Common Name (CN) does not match with the expected CN\n")),
    ("tls_handshake", ValueError("The certificate is not correctly signed by the trusted CA\n")),
    ("tls_handshake", ValueError("invalid cert")),
    ("tls_handshake", OSError(ENOMEM)),  # mbedtls could not allocate
    ("tls_handshake", OSError(-29312, "MBEDTLS_ERR_SSL_CONN_EOF")),
    ("tls_handshake", MemoryError()),
    ("link_io", OSError(ETIMEDOUT)),
    ("link_io", OSError(-30592, "MBEDTLS_ERR_SSL_FATAL_ALERT_MESSAGE")),
    ("pin", ValueError("invalid pin")),
    ("uart", ValueError("invalid pin")),
    ("spi", ValueError("SPI(2) doesn't exist")),
    ("flash_write", OSError(28)),  # ENOSPC
    ("ntp", OSError(ETIMEDOUT)),
    ("ntp", ValueError("buffer too small")),  # struct.unpack of a short answer
)


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


class FullFlash(Flash):
    """A Flash that refuses every write, rename and removal with OSError(ENOSPC) while
    `full` is set (the LittleFS error a worn or full flash gives), and works otherwise."""

    def __init__(self, root: str = "") -> None:
        super().__init__(root)
        self.full = False
        self.refused = 0

    def _refuse(self) -> None:
        if self.full:
            self.refused += 1
            raise OSError(28)

    def open(self, name: str, mode: str):
        if "r" not in mode or "+" in mode:
            self._refuse()
        return super().open(name, mode)

    def replace(self, src: str, dst: str) -> None:
        self._refuse()
        super().replace(src, dst)

    def remove(self, name: str) -> None:
        self._refuse()
        super().remove(name)


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
    """A UART wired to a SimulatedSdm at `baud`, as unkind as the wire, with injectable faults.

    Bytes take their wire time: the request goes out at 11 bits per character, the meter
    answers `latency_ms` after its last byte, and each reply byte becomes readable only
    when it has arrived.  A request sent less than 3.5 characters after the end of the
    previous frame runs into it, and the meter ignores it (`merged` counts them).
    `echo=True` is a transceiver whose receiver is always on: our own request comes back
    first.  `corrupt_next(n)` flips a byte in the next n replies, `drop_next(n)` makes the
    meter stay silent n times, `unplug()` / `plug()` cut the wire.  A read with nothing
    arriving within the UART timeout costs that timeout in virtual (or real) time.
    """

    def __init__(self, meter: SimulatedSdm, board, timeout_ms: int = 20, baud: int = 9600,
                 echo: bool = False, latency_ms: int = 5) -> None:
        self.meter = meter
        self._board = board
        self._timeout_ms = timeout_ms
        self._char_us = 11000000 // baud
        self._latency_us = latency_ms * 1000
        self.echo = echo
        self._segments = []  # [first byte's arrival (us), bytearray], in arrival order
        self._quiet_us = -(10**9)  # when the last frame on the wire ended
        self._corrupt = 0
        self._drop = 0
        self.merged = 0
        self.plugged = True

    def corrupt_next(self, n: int = 1) -> None:
        self._corrupt += n

    def drop_next(self, n: int = 1) -> None:
        self._drop += n

    def unplug(self) -> None:
        self.plugged = False

    def plug(self) -> None:
        self.plugged = True

    def _now_us(self) -> int:
        return self._board.ticks_ms() * 1000

    def write(self, buf) -> int:
        now = self._now_us()
        char = self._char_us
        sent = now + len(buf) * char
        if now < self._quiet_us + 35 * char // 10:
            self.merged += 1  # no 3.5-character gap: one long garbled frame to the meter
            reply = b""
        else:
            reply = self.meter.respond(bytes(buf)) if self.plugged else b""
        if reply and self._drop:
            self._drop -= 1
            reply = b""
        if reply and self._corrupt:
            self._corrupt -= 1
            reply = bytearray(reply)
            reply[len(reply) // 2] ^= 0x5A
        if self.echo:
            self._segments.append([now + char, bytearray(buf)])
        end = sent
        if reply:
            first = sent + self._latency_us + char
            self._segments.append([first, bytearray(reply)])
            end = first + (len(reply) - 1) * char
        self._quiet_us = end
        return len(buf)

    def _arrived(self, now: int) -> int:
        n = 0
        for first, data in self._segments:
            if now < first:
                break
            k = (now - first) // self._char_us + 1
            if k < len(data):
                return n + k
            n += len(data)
        return n

    def _take(self, n: int) -> bytes:
        out = bytearray()
        while n:
            seg = self._segments[0]
            k = min(n, len(seg[1]))
            out += seg[1][:k]
            seg[1] = seg[1][k:]
            seg[0] += k * self._char_us
            if not seg[1]:
                self._segments.pop(0)
            n -= k
        return bytes(out)

    def any(self) -> int:
        return self._arrived(self._now_us())

    def read(self):
        n = self.any()
        return self._take(n) if n else None

    def readinto(self, buf):
        now = self._now_us()
        n = self._arrived(now)
        if not n:
            if self._segments and self._segments[0][0] <= now + self._timeout_ms * 1000:
                # Wait for the first byte (rounded up to whole ms of the virtual clock).
                self._board.sleep_ms((self._segments[0][0] - now + 999) // 1000)
                n = self._arrived(self._now_us())
            else:
                self._board.sleep_ms(self._timeout_ms)
                return None
        n = min(len(buf), n)
        buf[:n] = self._take(n)
        return n


# -- ATM90E32 -------------------------------------------------------------------


class FakeAtm90e32Spi:
    """The ATM90E32's SPI register protocol with read-clear energy counters.

    Configuration and calibration registers (below 0x7F) take a write only while
    CfgRegAccEn (0x7F) holds 0x55AA; `power_cycle()` returns every register to its reset
    value (the chip keeps its calibration in registers, not in non-volatile memory).
    """

    def __init__(self) -> None:
        self.regs = {}
        self.ignored_writes = 0
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

    def power_cycle(self) -> None:
        self.regs = {}

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
            if self._address < 0x7F and self.regs.get(0x7F) != 0x55AA:
                self.ignored_writes += 1  # locked: configuration needs CfgRegAccEn first
                return
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
    """An in-memory MQTT 3.1.1 broker for the board: QoS 1 publishes, subscriptions,
    retained messages and last wills, plus a stand-in edge agent.

    `messages` lists (topic, payload) of readings in arrival order, `others` everything
    else (online states, wills).  `users`
    maps usernames to passwords (None accepts anyone); `acl` maps usernames to the topics
    each may publish to (a denied publish is acknowledged and dropped, as Mosquitto does
    with MQTT 3.1.1); `read_acl` maps usernames to the topics each may subscribe to (a
    denied subscription gets SUBACK 0x80).  `up = False` refuses connects and breaks open
    links; `swallow_acks = n` drops the next n PUBACKs; `silent` stops all answers.

    The agent: with `agent = True`, every reading (a COSE_Sign1 on mc/<m>/r/<id>) is taken
    as durably committed at once and the retained acknowledgement {1: id, 2: highest
    sequence seen} is published on mc/<m>/ack/<id>, as the edge agent does after its
    commit.  `agent = False` holds acknowledgements back; `publish(topic, payload,
    retain)` injects anything (a late, forged or malformed acknowledgement).
    """

    def __init__(self, users=None, acl=None, keep: bool = True, agent: bool = True, read_acl=None) -> None:
        self.users = users
        self.acl = acl
        self.read_acl = read_acl
        self.keep = keep  # False: count messages without keeping them (heap measurements)
        self.agent = agent
        self.committed = {}  # meter id -> the agent's watermark
        self.retained = {}  # topic -> payload
        self.received = 0
        self.messages = []
        self.others = []
        self.up = True
        self.silent = False  # accepts and reads everything, answers nothing
        self.swallow_acks = 0
        self.connects = 0
        self.refused = 0
        self.denied = 0
        self.links = []

    def open(self, clock):
        if not self.up:
            raise OSError(ECONNRESET)  # the port's error for a refused TCP connect
        link = FakeLink(self, clock)
        self.links.append(link)
        return link

    def stop(self) -> None:
        self.up = False
        for link in self.links:
            link.broken = True
            link.lost()
        self.links = []

    def start(self) -> None:
        self.up = True

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Deliver `payload` to every subscriber of `topic` (and keep it if `retain`)."""
        if retain:
            self.retained[topic] = payload
        for link in self.links:
            if topic in link.subscriptions:
                link.deliver(topic, payload, retain=False)

    def _agent_commit(self, topic: str, payload) -> None:
        from mc import cbor

        parts = topic.split("/")
        if len(parts) != 4 or parts[2] != "r":
            return
        try:
            seq = cbor.decode(cbor.decode(payload).value[2])[2]  # type: ignore[attr-defined]
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            return
        meter = parts[3]
        if seq > self.committed.get(meter, 0):
            self.committed[meter] = seq
            ack = cbor.encode({1: meter, 2: seq})
            self.publish("mc/%s/ack/%s" % (parts[1], meter), ack)


def _mqtt_str(data, pos: int):
    n = (data[pos] << 8) | data[pos + 1]
    return bytes(data[pos + 2 : pos + 2 + n]), pos + 2 + n


def _allowed(table, user, topic: str) -> bool:
    if table is None:
        return True
    allowed = table.get(user)
    if allowed is None:
        return False
    return topic == allowed if isinstance(allowed, str) else topic in allowed


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
        self.client_id = None
        self.will = None  # (topic, payload, retain) published if the link dies unannounced
        self.subscriptions = []
        self._pid = 0

    def write(self, data) -> None:
        if self.broken or self.closed:
            raise OSError(ECONNRESET)
        self._in += bytes(data)
        self._parse()

    def recv_into(self, buf, timeout_ms: int) -> int:
        if self.broken or self.closed:
            raise OSError(ECONNRESET)
        if not self._out:
            self._clock.sleep_ms(timeout_ms)
            if self.broken:
                raise OSError(ECONNRESET)
            return 0
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.lost()

    def lost(self) -> None:
        """The connection ended without DISCONNECT: the broker publishes the will."""
        will = self.will
        self.will = None
        if will is not None:
            if self in self._broker.links:
                self._broker.links.remove(self)
            self._broker.publish(will[0], will[1], will[2])
            if self._broker.keep:
                self._broker.others.append((will[0], will[1]))

    def deliver(self, topic: str, payload, retain: bool) -> None:
        """A QoS 1 PUBLISH from the broker to this client."""
        self._pid = self._pid % 0xFFFF + 1
        t = topic.encode()
        body = bytes([len(t) >> 8, len(t) & 0xFF]) + t + bytes([self._pid >> 8, self._pid & 0xFF]) + bytes(payload)
        head = bytearray([0x32 | (1 if retain else 0)])
        n = len(body)
        while True:
            byte = n & 0x7F
            n >>= 7
            head.append(byte | 0x80 if n else byte)
            if not n:
                break
        self._out += head + body

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

    def _connect(self, body: bytes) -> None:
        broker = self._broker
        flags = body[7]
        client, pos = _mqtt_str(body, 10)
        will = None
        if flags & 0x04:
            will_topic, pos = _mqtt_str(body, pos)
            will_payload, pos = _mqtt_str(body, pos)
            will = (will_topic.decode(), will_payload, bool(flags & 0x20))
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
            self.client_id = client.decode()
            self.will = will
            broker.connects += 1
            self._out += b"\x20\x02\x00\x00"
        else:
            broker.refused += 1
            self._out += b"\x20\x02\x00\x05"

    def _publish(self, head: int, body: bytes) -> None:
        broker = self._broker
        topic, pos = _mqtt_str(body, 0)
        pid = (body[pos] << 8) | body[pos + 1]
        payload = body[pos + 2 :]
        name = topic.decode()
        if _allowed(broker.acl, self.user, name):
            if "/r/" in name:
                broker.received += 1
                if broker.keep:
                    broker.messages.append((name, payload))
            elif broker.keep:
                broker.others.append((name, payload))
            broker.publish(name, payload, bool(head & 1))
            if broker.agent:
                broker._agent_commit(name, payload)
        else:
            broker.denied += 1
        if broker.swallow_acks:
            broker.swallow_acks -= 1
        else:
            self._out += bytes([0x40, 2, pid >> 8, pid & 0xFF])

    def _subscribe(self, body: bytes) -> None:
        broker = self._broker
        pid = (body[0] << 8) | body[1]
        topic, pos = _mqtt_str(body, 2)
        name = topic.decode()
        granted = 1 if _allowed(broker.read_acl, self.user, name) else 0x80
        self._out += bytes([0x90, 3, pid >> 8, pid & 0xFF, granted])
        if granted == 1:
            self.subscriptions.append(name)
            if name in broker.retained:
                self.deliver(name, broker.retained[name], retain=True)

    def _handle(self, head: int, body: bytes) -> None:
        kind = head & 0xF0
        if self._broker.silent:
            return
        if kind == 0x10:
            self._connect(body)
        elif kind == 0x30:
            self._publish(head, body)
        elif kind == 0x80:
            self._subscribe(body)
        elif kind == 0xC0:
            self._out += b"\xd0\x00"
        elif kind == 0xE0:
            self.will = None  # a clean DISCONNECT discards the will
            self.closed = True
            if self in self._broker.links:
                self._broker.links.remove(self)


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
                 unix_start: int = 1767225600, rtc_start=None) -> None:
        self.flash = flash if flash is not None else Flash("")
        self.clock = clock if clock is not None else VirtualClock(unix_start)
        self.broker = broker
        self.ntp_ok = ntp_ok
        # The RTC: true time (unix_start + elapsed) unless `rtc_start` says what it reads
        # after power-up (946684800 = 2000-01-01, an ESP32 without a backup battery);
        # a successful NTP sync sets it to true time.
        self._rtc_skew = 0 if rtc_start is None else rtc_start - self.clock.unix_start
        # The broker's certificate validity (TLS connects check it against the RTC, as
        # mbedtls on the port does) and an error every connect raises (None: none).
        self.cert_valid = (1704067200, 2082758400)  # 2024-01-01 .. 2036-01-01
        self.connect_error = None
        self.connect_ms = 100  # what a failing connect costs in time
        self.peripheral_error = None  # raised by uart/spi/pulse_counter/pin_in (a wrong pin)
        self.wifi_up = True
        self.wifi_resets = 0
        self.key_draws = 0
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
        return self.clock.unix_start + self.clock.now_ms // 1000 + self._rtc_skew

    def ntp_sync(self, host: str) -> bool:
        if self.ntp_ok and self.wifi_up:
            self._rtc_skew = 0
            return True
        return False

    # misc
    def urandom(self, n: int) -> bytes:
        return host_random(n)

    def key_entropy(self, n: int) -> bytes:
        self.key_draws += 1  # the hardware's "RF on" draw: only keys come from here
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
        if not self.wifi_up:
            self.sleep_ms(timeout_ms)  # the port polls isconnected() until its timeout
        return self.wifi_up

    def wifi_reset(self) -> None:
        self.wifi_resets += 1

    def connect(self, host: str, port: int, tls: bool, ca, timeout_ms: int):
        """What the port's getaddrinfo + connect + TLS handshake raise (mc.porterrors)."""
        if self.connect_error is not None:
            self.sleep_ms(self.connect_ms)
            raise self.connect_error
        if self.broker is None or not self.wifi_up:
            self.sleep_ms(self.connect_ms)
            raise OSError(EAI_NONAME)  # getaddrinfo: no DNS answer
        if tls:
            if not ca:
                raise OSError("TLS without a CA certificate: refusing an unverified broker")
            now = self.time()
            if now < self.cert_valid[0]:
                raise ValueError("The certificate validity starts in the future\n")
            if now > self.cert_valid[1]:
                raise ValueError("The certificate validity has expired\n")
        return self.broker.open(self)

    # meter hardware
    def _sdm_uart(self, unit: int, baud: int = 9600):
        if self.meter_uart is None:
            self.meter = SimulatedSdm(self, unit=unit, power_w=self._meter_power_w,
                                      import_wh=self._meter_import_wh)
            self.meter_uart = SdmUart(self.meter, self, baud=baud)
        return self.meter_uart

    def _peripheral(self) -> None:
        if self.peripheral_error is not None:
            raise self.peripheral_error

    def uart(self, uart_id: int, baud: int, tx: int, rx: int, de: int):
        self._peripheral()
        return self._sdm_uart(1, baud)

    def sim_meter_uart(self, cfg: dict):
        return self._sdm_uart(cfg["meter.unit"], cfg.get("meter.baud", 9600))

    def pulse_counter(self, pin: int, filter_us: int):
        self._peripheral()
        self.s0 = EdgeCounter()
        return self.s0

    def spi(self, bus: int, sck: int, mosi: int, miso: int, cs: int):
        self._peripheral()
        return self.atm, self.atm.cs

    def pin_in(self, pin: int):
        self._peripheral()
        if pin not in self.pins:
            self.pins[pin] = FakePin(0)
        return self.pins[pin]


def write_config(flash, cfg: dict, secrets=None) -> None:
    """Write config.json (and secrets.json) into a flash, as provisioning does."""
    import json

    flash.write_atomic("config.json", json.dumps(cfg).encode())
    if secrets is not None:
        flash.write_atomic("secrets.json", json.dumps(secrets).encode())
