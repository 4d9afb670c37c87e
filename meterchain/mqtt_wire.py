"""MQTT 3.1.1 packet framing for the hot paths that write and cut packets themselves.

paho-mqtt keeps every session (connect, reconnect, keepalive, subscribe);
where one message per reading makes its per-packet Python the bottleneck,
the agent's ingest link and the bench's meter fleets encode and cut packets
here, many per socket read or write (MQTT 3.1.1 section 2.2: a fixed header
byte, a remaining length of 1-4 bytes of 7 bits each, the body).
"""

from __future__ import annotations

import struct

PUBLISH = 0x30
PUBACK = 0x40
MAX_LENGTH_BYTES = 4  # the remaining length takes at most 4 bytes (268,435,455)


class FramingError(ValueError):
    """Bytes that are not an MQTT packet (a remaining length over 4 bytes)."""


def mqtt_str(data: bytes) -> bytes:
    """A length-prefixed MQTT string or binary field."""
    return struct.pack("!H", len(data)) + data


def packet(head: int, body: bytes) -> bytes:
    """One whole packet: fixed header byte, remaining length, body."""
    n, length = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([head]) + bytes(length) + body


def publish_qos0(topic: bytes, payload: bytes, *, retain: bool = False) -> bytes:
    """A QoS 0 PUBLISH (no packet id)."""
    return packet(PUBLISH | (1 if retain else 0), mqtt_str(topic) + payload)


def pubacks(mids: list[int]) -> bytes:
    """The PUBACKs of `mids`, back to back (each 0x40 0x02 then the packet id)."""
    return struct.pack(f"!{len(mids)}I", *[0x4002_0000 | mid for mid in mids])


def next_packet(buf: bytes | bytearray, pos: int = 0) -> tuple[int, int, int] | None:
    """(fixed header byte, body start, body end) of the packet at buf[pos:], or None if partial.

    Raises FramingError for a remaining length longer than 4 bytes.
    """
    end = len(buf)
    n = shift = 0
    i = pos + 1
    while i < end:
        byte = buf[i]
        n |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return (buf[pos], i, i + n) if i + n <= end else None
        shift += 7
        if shift >= 7 * MAX_LENGTH_BYTES:
            raise FramingError("remaining length longer than 4 bytes")
    return None
