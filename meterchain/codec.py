"""The one canonical encoding: deterministic CBOR (RFC 8949 section 4.2.1), decoded strictly.

Everything that is hashed or signed across nodes goes through `encode`; `decode`
is the one decoder for wire and stored inputs. Before cbor2 builds a single
object, a linear scan of the item heads refuses what no MeterChain format uses
and what could make decoding expensive: tags other than the ones the caller
allows (so never the shared-value tags 28/29 that let a few hundred bytes expand
exponentially), indefinite lengths, simple values other than false/true/null,
NaN and infinite floats, non-shortest heads, map keys that are not strings or
integers of modest size (larger integers, floats and containers can be crafted
to collide in Python's hash table), nesting deeper than `max_depth`, more than
`max_items` items, inputs longer than `max_bytes`, and declared lengths longer
than the bytes that remain. What passes is then decoded and must re-encode to
exactly its own bytes, so two nodes can never disagree about the bytes behind a
value.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2

from meterchain.errors import CodecError

# Containers and tags nested deeper than this are refused (the deepest wire format nests 8).
MAX_DEPTH = 32
# The most data items one input may hold: bounds the objects a decode can build.
MAX_ITEMS = 1 << 20
# The longest input (bytes) one decode accepts; a block proposal of a large market fits.
MAX_BYTES = 64 << 20
# Integer map keys must be smaller in magnitude than this: Python hashes ints modulo
# 2**61 - 1, so larger keys could be chosen to collide and make a map quadratic to build.
MAX_KEY_MAGNITUDE = 1 << 32
# Tags the MeterChain wire formats use inside canonical CBOR: COSE_Sign1 (signed readings).
COSE_SIGN1_TAG = 18

_NO_TAGS: frozenset[int] = frozenset()
_SHORTEST = (24, 1 << 8, 1 << 16, 1 << 32)  # smallest argument of a 1, 2, 4 and 8-byte head
_SIMPLE_OK = (20, 21, 22, 25, 26, 27)  # false, true, null and float16/32/64
# Exponent bits of float16/32/64: all set means NaN or an infinity, which no format carries.
_FLOAT_EXPONENT = (0x7C00, 0x7F80_0000, 0x7FF0_0000_0000_0000)
_KEY_MAJORS = (0, 1, 2, 3)  # map keys: integers, byte strings, text strings


def encode(value: Any) -> bytes:
    """Canonical CBOR bytes of `value` (ints, bytes, str, lists, dicts, bools, None)."""
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise CodecError(f"cannot encode {type(value).__name__}: {exc}") from exc


def _scan(data: bytes, *, tags: frozenset[int], max_depth: int, max_items: int) -> None:
    """Walk the item heads of `data` once and raise CodecError on anything `decode` refuses."""
    end = len(data)
    pos = 0
    items = 0
    # One entry per open container: (items still to read at that level, is it a map).
    stack: list[tuple[int, bool]] = []
    remaining, in_map = 1, False
    while True:
        if remaining == 0:
            if not stack:
                break
            remaining, in_map = stack.pop()
            continue
        is_key = in_map and remaining % 2 == 0
        remaining -= 1
        if pos >= end:
            raise CodecError(f"truncated CBOR: an item is missing at byte {pos}")
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        items += 1
        if items > max_items:
            raise CodecError(f"CBOR holds more than {max_items} items")
        if info < 24:
            arg = info
        elif info < 28:
            width = 1 << (info - 24)
            if pos + width > end:
                raise CodecError(f"truncated CBOR: head at byte {pos - 1} needs {width} more bytes")
            arg = int.from_bytes(data[pos : pos + width], "big")
            pos += width
            if major != 7 and arg < _SHORTEST[info - 24]:
                raise CodecError(f"CBOR head at byte {pos - 1 - width} is not in shortest form")
        elif info == 31:
            raise CodecError(f"indefinite-length CBOR item at byte {pos - 1} (not canonical)")
        else:
            raise CodecError(f"reserved CBOR additional information {info} at byte {pos - 1}")
        if is_key:
            if major not in _KEY_MAJORS:
                raise CodecError(f"CBOR map key at byte {pos - 1} is not an integer or a string")
            if major < 2 and arg >= MAX_KEY_MAGNITUDE:
                raise CodecError(f"CBOR integer map key at byte {pos - 1} is too large")
        if major < 2:
            continue
        if major < 4:
            if arg > end - pos:
                raise CodecError(
                    f"CBOR string at byte {pos} declares {arg} bytes, {end - pos} left"
                )
            pos += arg
            continue
        if major == 7:
            if info not in _SIMPLE_OK:
                raise CodecError(f"CBOR simple value {arg} is not false, true, null or a float")
            if info > 24 and arg & _FLOAT_EXPONENT[info - 25] == _FLOAT_EXPONENT[info - 25]:
                raise CodecError(f"CBOR float at byte {pos - 1} is NaN or infinite")
            continue
        if major == 6:
            if arg not in tags:
                raise CodecError(f"CBOR tag {arg} is not used by any MeterChain format")
            stack.append((remaining, in_map))
            remaining, in_map = 1, False
        else:
            count = arg if major == 4 else 2 * arg
            if count > end - pos:
                raise CodecError(f"CBOR container declares {count} items; {end - pos} bytes left")
            stack.append((remaining, in_map))
            remaining, in_map = count, major == 5
        if len(stack) > max_depth:
            raise CodecError(f"CBOR nested deeper than {max_depth} levels")
    if pos != end:
        raise CodecError(f"{end - pos} trailing byte(s) after the CBOR item")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    tags: frozenset[int] = _NO_TAGS,
    max_depth: int = MAX_DEPTH,
    max_items: int = MAX_ITEMS,
    max_bytes: int = MAX_BYTES,
) -> Any:
    """Decode one CBOR item that spans all of `data`, refusing anything outside the wire formats.

    `tags` names the CBOR tags the caller's format uses (none by default). The
    bytes must re-encode to themselves: no indefinite lengths, shortest heads,
    sorted map keys. Every refusal is a CodecError.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError(f"CBOR input of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    data = bytes(data)
    _scan(data, tags=tags, max_depth=max_depth, max_items=max_items)
    try:
        value = cbor2.loads(data, allow_duplicate_keys=False, allow_indefinite=False)
    except (
        cbor2.CBORDecodeError,
        ValueError,
        TypeError,
        OverflowError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise CodecError(f"malformed CBOR: {exc}") from exc
    try:
        again = cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError, RecursionError) as exc:
        raise CodecError(f"CBOR item cannot be canonical: {exc}") from exc
    if again != data:
        raise CodecError("CBOR is not in canonical (deterministic) form")
    return value


def digest(value: Any) -> bytes:
    """SHA-256 of the canonical encoding of `value`."""
    return hashlib.sha256(encode(value)).digest()
