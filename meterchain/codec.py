"""The one canonical encoding: deterministic CBOR (RFC 8949 section 4.2.1).

Everything that is hashed or signed across nodes goes through `encode`; `decode`
refuses anything that is not exactly the canonical encoding of what it decodes
to, so two nodes can never disagree about the bytes behind a value.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2

from meterchain.errors import CodecError


def encode(value: Any) -> bytes:
    """Canonical CBOR bytes of `value` (ints, bytes, str, lists, dicts, bools, None)."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise CodecError(f"cannot encode {type(value).__name__}: {exc}") from exc


def decode(data: bytes, *, require_canonical: bool = True) -> Any:
    """Decode one CBOR item that spans all of `data`.

    With `require_canonical`, the bytes must re-encode to themselves: no
    indefinite lengths, shortest integer forms, sorted map keys.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    try:
        value = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CodecError(f"malformed CBOR: {exc}") from exc
    if require_canonical:
        try:
            again = cbor2.dumps(value, canonical=True)
        except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
            raise CodecError(f"CBOR item cannot be canonical: {exc}") from exc
        if again != data:
            raise CodecError("CBOR is not in canonical (deterministic) form")
    return value


def digest(value: Any) -> bytes:
    """SHA-256 of the canonical encoding of `value`."""
    return hashlib.sha256(encode(value)).digest()
