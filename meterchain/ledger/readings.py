"""Readings as the ledger stores them: the signed COSE bytes plus the columns indexed beside them.

The signed bytes are the record; `digest`, meter id, sequence, time and the two
energy registers are kept as columns only so the store can be queried. `parse`
re-derives those columns from the bytes (without checking the signature, which
`meterchain.reading.verify` does), so verification can prove that every column
still matches what the meter signed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import cbor2

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError

HOUR = 3600
_COSE_TAGS = frozenset({codec.COSE_SIGN1_TAG})


class ReadingFormatError(MeterChainError):
    """Stored reading bytes are not a COSE_Sign1 reading."""


@dataclass(frozen=True)
class LedgerReading:
    """One verified reading: its signed bytes and the fields the store indexes."""

    digest: bytes
    meter_id: str
    seq: int
    time: int
    import_wh: int
    export_wh: int
    cose: bytes

    @property
    def hour(self) -> int:
        return self.time // HOUR

    def row(self) -> tuple[bytes, str, int, int, int, int, bytes]:
        return (
            self.digest,
            self.meter_id,
            self.seq,
            self.time,
            self.import_wh,
            self.export_wh,
            self.cose,
        )

    @classmethod
    def from_reading(cls, reading: Any, cose: bytes) -> LedgerReading:
        """From a verified `meterchain.reading.Reading` and the bytes it was verified from."""
        return cls(
            bytes(reading.digest),
            str(reading.meter_id),
            int(reading.seq),
            int(reading.time),
            int(reading.import_wh),
            int(reading.export_wh),
            bytes(cose),
        )


def payload_fields(cose: bytes) -> dict[int, Any]:
    """The payload map of a COSE_Sign1 reading (tag 18), signature not checked."""
    try:
        item = codec.decode(cose, tags=_COSE_TAGS)
        if not isinstance(item, cbor2.CBORTag) or item.tag != codec.COSE_SIGN1_TAG:
            raise ReadingFormatError("not a COSE_Sign1 (CBOR tag 18) item")
        parts = item.value
        if (
            not isinstance(parts, list | tuple)
            or len(parts) != 4
            or not isinstance(parts[2], bytes)
        ):
            raise ReadingFormatError("COSE_Sign1 is not [protected, unprotected, payload, sig]")
        payload = codec.decode(parts[2])
    except CodecError as exc:
        raise ReadingFormatError(f"malformed CBOR: {exc}") from exc
    if not isinstance(payload, dict):
        raise ReadingFormatError("reading payload is not a map")
    return payload


def parse(cose: bytes) -> LedgerReading:
    """Columns of a stored reading re-derived from its signed bytes."""
    p = payload_fields(cose)
    meter_id, seq, time, imp, exp = p.get(1), p.get(2), p.get(3), p.get(4), p.get(5)
    if not isinstance(meter_id, str):
        raise ReadingFormatError("reading payload has no meter id (key 1)")
    for key, value in ((2, seq), (3, time), (4, imp), (5, exp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ReadingFormatError(f"reading payload key {key} is not an unsigned integer")
    assert isinstance(seq, int) and isinstance(time, int)
    assert isinstance(imp, int) and isinstance(exp, int)
    return LedgerReading(hashlib.sha256(cose).digest(), meter_id, seq, time, imp, exp, cose)


_loads = cbor2.loads
# The canonical COSE_Sign1 of a reading starts 18([h'a10126', {4: kid}, ...]) (reading.verify
# accepts no other form), so its payload can be found without decoding the envelope.
_PREFIX = b"\xd2\x84\x43\xa1\x01\x26\xa1\x04"


def _bstr(data: bytes, pos: int) -> tuple[int, int]:
    """(length, start) of the byte string whose CBOR head is at `pos`."""
    head = data[pos]
    if 0x40 <= head <= 0x57:
        return head - 0x40, pos + 1
    if head == 0x58:
        return data[pos + 1], pos + 2
    if head == 0x59:
        return int.from_bytes(data[pos + 1 : pos + 3], "big"), pos + 3
    raise ValueError("not a short byte string")


def columns(cose: bytes) -> tuple[Any, ...]:
    """(meter id, seq, time, import Wh, export Wh) straight from a reading's payload.

    The fast path of chain verification: the bytes are already authenticated by
    their digest and the batch's Merkle root, so this only has to extract the
    fields; types are left to the comparison with the stored columns (and to
    `meterchain.reading.verify` when signatures are checked).
    """
    try:
        if cose.startswith(_PREFIX):
            kid_len, start = _bstr(cose, len(_PREFIX))
            pay_len, start = _bstr(cose, start + kid_len)
            payload = _loads(cose[start : start + pay_len])
        else:
            payload = codec.decode(codec.decode(cose, tags=_COSE_TAGS).value[2])
        return (payload[1], payload[2], payload[3], payload[4], payload[5])
    except (cbor2.CBORDecodeError, CodecError, ValueError, TypeError, OverflowError) as exc:
        raise ReadingFormatError(f"malformed reading: {exc}") from exc
    except (AttributeError, IndexError, KeyError) as exc:
        raise ReadingFormatError(f"not a COSE_Sign1 reading payload: {exc!r}") from exc


def source_of(cose: bytes) -> str | None:
    """The source type (payload key 8) a reading declares, if any."""
    value = payload_fields(cose).get(8)
    return value if isinstance(value, str) else None
