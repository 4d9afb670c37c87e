"""MQTT 3.1.1 client protocol for the board's jobs: QoS 1 publishes, one subscription, a will.

The board publishes its readings (QoS 1, matched to their PUBACKs) and its retained
online state, leaves a last will that says "offline", and subscribes to the one topic on
which the edge agent publishes its end-to-end acknowledgement (a retained message).
`Protocol` assumes the link is up and turns every problem (a socket error, a refused
CONNECT, a malformed packet) into one exception, MQTTError.  Reconnecting, backoff and
resending belong to `mc.uplink`, which owns the connection.

The link is any object with `write(buf)`, `recv_into(buf, timeout_ms) -> int` (0 on
timeout, OSError on a closed or broken link) and `close()`: a TLS socket on the board
(see hal.py), a real socket on the emulated board, a scripted fake in tests.
"""

import struct

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBLISH_QOS1 = const(0x32)
_RETAIN = const(0x01)
_DUP = const(0x08)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)  # the fixed header's reserved bits are 0010 (MQTT 3.1.1, 3.8.1)
_SUBACK = const(0x90)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)
# The broker sends CONNACK, PUBACK, SUBACK, PINGRESP and the acknowledgement message
# (topic of at most ~140 bytes, CBOR payload of at most ~80); anything larger is skipped.
_RX_SIZE = const(256)

# poll() results besides a PUBACK's packet id (> 0) and 0 (nothing yet):
PINGRESP = -1
SUBACK = -2  # `granted` holds the return code (0x80: refused)
MESSAGE = -3  # an application message: `topic` and `payload` hold it until the next poll

CONNACK_REASONS = (
    "accepted",
    "unacceptable protocol version",
    "client id rejected",
    "server unavailable",
    "bad user name or password",
    "not authorized",
)


class MQTTError(Exception):
    """The MQTT session is unusable; `code` is the CONNACK return code when there is one."""

    def __init__(self, message: str, code: int = -1) -> None:
        super().__init__(message)
        self.code = code


def _put_str(buf: bytearray, pos: int, data) -> int:
    struct.pack_into(">H", buf, pos, len(data))
    buf[pos + 2 : pos + 2 + len(data)] = data
    return pos + 2 + len(data)


def _put_length(buf: bytearray, pos: int, n: int) -> int:
    """MQTT variable-length 'remaining length' at buf[pos:]; returns the next position."""
    while True:
        byte = n & 0x7F
        n >>= 7
        buf[pos] = byte | 0x80 if n else byte
        pos += 1
        if not n:
            return pos


class Protocol:
    """One MQTT session over `link`; see the module docstring."""

    def __init__(self, link, client_id: str, username: str, password: str, keepalive_s: int,
                 tx_size: int = 640, will_topic=b"", will_payload=b"") -> None:
        self._link = link
        self._will_topic = will_topic
        self._will_payload = will_payload
        self.topic = b""  # of the last MESSAGE
        self.payload = b""
        self.granted = 0  # return code of the last SUBACK
        self._client_id = client_id.encode()
        self._username = username.encode()
        self._password = password.encode()
        self.keepalive_s = keepalive_s
        self._tx = bytearray(tx_size)
        self._txv = memoryview(self._tx)
        self._rx = bytearray(_RX_SIZE)
        self._rxv = memoryview(self._rx)
        self._n = 0  # bytes buffered in _rx
        self._skip = 0  # bytes of an oversized packet still to discard

    def _write(self, data) -> None:
        try:
            self._link.write(data)
        except OSError as exc:
            raise MQTTError("write failed: %s" % exc)

    def connect(self, timeout_ms: int, ticks) -> None:
        """CONNECT with a clean session and wait for CONNACK; MQTTError if refused or silent.

        `ticks` supplies ticks_ms/ticks_diff (the board), so the wait honours the deadline.
        """
        flags = 0x02  # clean session: the board's spool, not the broker, keeps state
        length = 10 + 2 + len(self._client_id)
        if self._will_topic:
            flags |= 0x2C  # will flag, will QoS 1, will retain
            length += 4 + len(self._will_topic) + len(self._will_payload)
        if self._username:
            flags |= 0x80
            length += 2 + len(self._username)
        if self._password:
            flags |= 0x40
            length += 2 + len(self._password)
        if length + 5 > len(self._tx):
            raise MQTTError("CONNECT too large")
        buf = self._tx
        buf[0] = _CONNECT
        pos = _put_length(buf, 1, length)
        pos = _put_str(buf, pos, b"MQTT")
        buf[pos] = 4  # protocol level: 3.1.1
        buf[pos + 1] = flags
        struct.pack_into(">H", buf, pos + 2, self.keepalive_s)
        pos = _put_str(buf, pos + 4, self._client_id)
        if self._will_topic:
            pos = _put_str(buf, pos, self._will_topic)
            pos = _put_str(buf, pos, self._will_payload)
        if self._username:
            pos = _put_str(buf, pos, self._username)
        if self._password:
            pos = _put_str(buf, pos, self._password)
        self._write(self._txv[:pos])
        deadline = ticks.ticks_add(ticks.ticks_ms(), timeout_ms)
        left = timeout_ms
        while True:
            kind, value = self._next(left)
            if kind == _CONNACK:
                if value:
                    reason = CONNACK_REASONS[value] if value < len(CONNACK_REASONS) else "refused"
                    raise MQTTError("broker refused the connection: %s" % reason, value)
                return
            if kind:
                raise MQTTError("expected CONNACK, got packet type 0x%02x" % kind)
            left = ticks.ticks_diff(deadline, ticks.ticks_ms())
            if left <= 0:
                raise MQTTError("no CONNACK within %d ms" % timeout_ms)

    def publish(self, topic: bytes, payload, pid: int, dup: bool = False, retain: bool = False) -> None:
        """Send one QoS 1 PUBLISH; the PUBACK comes back through poll()."""
        n = len(payload)
        length = 2 + len(topic) + 2 + n
        if 9 + len(topic) > len(self._tx):
            raise MQTTError("topic too long")
        buf = self._tx
        buf[0] = _PUBLISH_QOS1 | (_DUP if dup else 0) | (_RETAIN if retain else 0)
        pos = _put_length(buf, 1, length)
        pos = _put_str(buf, pos, topic)
        struct.pack_into(">H", buf, pos, pid)
        pos += 2
        if pos + n <= len(buf):
            # One write, so TLS sends one record.
            buf[pos : pos + n] = payload
            self._write(self._txv[: pos + n])
        else:
            self._write(self._txv[:pos])
            self._write(payload)

    def subscribe(self, topic: bytes, pid: int) -> None:
        """SUBSCRIBE to one topic at QoS 1; the SUBACK comes back through poll()."""
        buf = self._tx
        length = 2 + 2 + len(topic) + 1
        if length + 5 > len(buf):
            raise MQTTError("topic too long")
        buf[0] = _SUBSCRIBE
        pos = _put_length(buf, 1, length)
        struct.pack_into(">H", buf, pos, pid)
        pos = _put_str(buf, pos + 2, topic)
        buf[pos] = 1  # requested QoS
        self._write(self._txv[: pos + 1])

    def ping(self) -> None:
        self._write(b"\xc0\x00")

    def disconnect(self) -> None:
        try:
            self._write(b"\xe0\x00")
        except MQTTError:
            pass

    def poll(self, timeout_ms: int) -> int:
        """Wait up to `timeout_ms` for one packet: a PUBACK's packet id, PINGRESP, SUBACK,
        MESSAGE (see `topic` / `payload`), or 0."""
        kind, value = self._next(timeout_ms)
        if kind == _PUBACK:
            return value
        if kind == _PINGRESP:
            return PINGRESP
        if kind == _SUBACK:
            self.granted = value
            return SUBACK
        if kind == _PUBLISH:
            return MESSAGE
        if kind == _CONNACK:
            raise MQTTError("unexpected CONNACK")
        return 0

    def _next(self, timeout_ms: int):
        """(packet type, value) of the next complete packet, or (0, 0) on timeout."""
        kind, value = self._parse()
        if kind:
            return kind, value
        try:
            got = self._link.recv_into(self._rxv[self._n :], timeout_ms)
        except OSError as exc:
            raise MQTTError("read failed: %s" % exc)
        if not got:
            return 0, 0
        self._n += got
        return self._parse()

    def _parse(self):
        rx = self._rx
        if self._skip:
            drop = self._skip if self._skip < self._n else self._n
            self._consume(drop)
            self._skip -= drop
        if self._n < 2:
            return 0, 0
        length = 0
        shift = 0
        pos = 1
        while True:
            if pos >= self._n:
                return 0, 0
            byte = rx[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MQTTError("malformed remaining length")
        total = pos + length
        kind = rx[0] & 0xF0
        if total > _RX_SIZE:
            # Larger than anything we subscribed to: discard it whole (unacknowledged).
            self._skip = total
            return self._parse()
        if self._n < total:
            return 0, 0
        value = 0
        if kind == _CONNACK:
            if length != 2:
                raise MQTTError("malformed CONNACK")
            value = rx[pos + 1]
        elif kind == _PUBACK:
            if length != 2:
                raise MQTTError("malformed PUBACK")
            value = (rx[pos] << 8) | rx[pos + 1]
        elif kind == _PINGRESP:
            if length:
                raise MQTTError("malformed PINGRESP")
        elif kind == _SUBACK:
            if length != 3:
                raise MQTTError("malformed SUBACK")
            value = rx[pos + 2]
        elif kind == _PUBLISH:
            self._message(rx[0], pos, total)
        self._consume(total)
        if kind not in (_CONNACK, _PUBACK, _PINGRESP, _SUBACK, _PUBLISH):
            return 0, 0
        return kind, value

    def _message(self, head: int, pos: int, total: int) -> None:
        """Copy out an incoming PUBLISH at rx[pos:total]; PUBACK it when it is QoS 1."""
        qos = (head >> 1) & 3
        if qos == 3:
            raise MQTTError("malformed PUBLISH (QoS 3)")
        rx = self._rx
        if pos + 2 > total:
            raise MQTTError("malformed PUBLISH")
        n = (rx[pos] << 8) | rx[pos + 1]
        start = pos + 2 + n
        if start + (2 if qos else 0) > total:
            raise MQTTError("malformed PUBLISH")
        self.topic = bytes(rx[pos + 2 : start])
        if qos:
            pid = (rx[start] << 8) | rx[start + 1]
            start += 2
            # QoS 2 is never granted (we subscribe at QoS 1); answer QoS 1 only.
            if qos == 1:
                self._write(bytes((_PUBACK, 2, pid >> 8, pid & 0xFF)))
        self.payload = bytes(rx[start:total])

    def _consume(self, n: int) -> None:
        rest = self._n - n
        if rest:
            self._rx[:rest] = self._rx[n : self._n]
        self._n = rest
