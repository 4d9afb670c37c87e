"""Firmware CBOR: byte-equal to cbor2's canonical form, round-trips, refuses malformed input."""

from __future__ import annotations

import os
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mc import cbor

INT64 = st.integers(-(2**64), 2**64 - 1)
KEYS = st.one_of(INT64, st.text(max_size=12), st.binary(max_size=12))
LEAVES = st.one_of(
    INT64,
    st.integers(-30, 30),  # the one-byte forms and their edges
    st.binary(max_size=300),
    st.text(max_size=40),
    st.booleans(),
    st.none(),
)
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(KEYS, children, max_size=6),
        st.builds(cbor.Tag, st.integers(0, 2**64 - 1), children),
    ),
    max_leaves=25,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((max(_depth(k), _depth(v)) for k, v in value.items()), default=0)
    if isinstance(value, cbor.Tag):
        return 1 + _depth(value.value)
    return 0


def _to_cbor2(value: Any) -> Any:
    """The same value with firmware Tags as cbor2 tags, for cbor2.dumps."""
    if isinstance(value, list):
        return [_to_cbor2(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_cbor2(v) for k, v in value.items()}
    if isinstance(value, cbor.Tag):
        return cbor2.CBORTag(value.tag, _to_cbor2(value.value))
    return value


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_encoding_equals_cbor2_canonical_and_round_trips(value: Any) -> None:
    assume(_depth(value) <= cbor.MAX_DEPTH)
    data = cbor.encode(value)
    assert data == cbor2.dumps(_to_cbor2(value), canonical=True)
    assert cbor.decode(data) == value
    assert cbor.decode(bytearray(data)) == value
    assert cbor.decode(memoryview(data)) == value


@settings(max_examples=100, deadline=None)
@given(VALUES)
def test_every_proper_prefix_is_refused(value: Any) -> None:
    assume(_depth(value) <= cbor.MAX_DEPTH)
    data = cbor.encode(value)
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            cbor.decode(data[:cut])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_value_error(data: bytes) -> None:
    try:
        cbor.decode(data)
    except ValueError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=12).map(lambda b: bytes(x | 0x80 if x & 1 else x for x in b)))
def test_text_strings_are_checked_exactly_like_cpython_utf8(raw: bytes) -> None:
    data = cbor.encode(raw)
    data = bytes([data[0] | 0x20]) + data[1:]  # same length, major type 3 (text)
    try:
        expected = raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(ValueError):
            cbor.decode(data)
    else:
        assert cbor.decode(data) == expected


def test_map_keys_are_ordered_like_the_core_codec() -> None:
    # Length-first, then bytewise: the order cbor2's canonical mode (the core codec) uses.
    value = {"b": 1, 1000: 2, "aa": 3, -1: 4, b"\x00": 5, 10: 6}
    data = cbor.encode(value)
    assert data == cbor2.dumps(value, canonical=True)
    assert list(cbor2.loads(data)) == [10, -1, b"\x00", "b", 1000, "aa"]


def test_known_encodings() -> None:
    # RFC 8949 appendix A examples within the subset.
    cases = [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (1000000, "1a000f4240"),
        (18446744073709551615, "1bffffffffffffffff"),
        (-1, "20"),
        (-18446744073709551616, "3bffffffffffffffff"),
        (False, "f4"),
        (True, "f5"),
        (None, "f6"),
        (b"\x01\x02\x03\x04", "4401020304"),
        ("\u00fc", "62c3bc"),
        ([1, [2, 3], [4, 5]], "8301820203820405"),
        ((1, 2), "820102"),
        ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
        (cbor.Tag(18, [b"", {}, b"", b""]), "d28440a04040"),
    ]
    for value, hex_ in cases:
        assert cbor.encode(value).hex() == hex_, value


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (1.5, TypeError),
        ({1, 2}, TypeError),
        (2**64, ValueError),
        (-(2**64) - 1, ValueError),
        ({True: 1}, TypeError),
        ({(1, 2): 1}, TypeError),
        ({1.0: 1}, TypeError),
        (cbor.Tag(-1, 0), ValueError),
        (cbor.Tag(2**64, 0), ValueError),
        ([[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]], ValueError),  # 17 levels
    ],
)
def test_values_outside_the_subset_are_refused(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        cbor.encode(value)


def test_nesting_limit_is_exactly_max_depth() -> None:
    deepest = 0
    for _ in range(cbor.MAX_DEPTH):
        deepest = [deepest]
    assert cbor.decode(cbor.encode(deepest)) == deepest
    assert cbor.decode(b"\x81" * cbor.MAX_DEPTH + b"\x00") == deepest
    with pytest.raises(ValueError):
        cbor.encode([deepest])


MALFORMED = {
    "empty": b"",
    "truncated uint8": b"\x18",
    "truncated uint16": b"\x19\x01",
    "truncated uint64": b"\x1b\x00\x00\x00\x00\x00\x00\x00",
    "truncated bytes": b"\x42\x01",
    "truncated text": b"\x63ab",
    "truncated array": b"\x82\x01",
    "truncated map value": b"\xa1\x01",
    "truncated tag": b"\xd2",
    "huge byte string": b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff",
    "huge array": b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00\x00",
    "huge map": b"\xbb\xff\xff\xff\xff\xff\xff\xff\xff\x00",
    "reserved info 28": b"\x1c",
    "reserved info 29 bytes": b"\x5d",
    "reserved info 30 map": b"\xbe",
    "reserved info 30 simple": b"\xfe",
    "indefinite bytes": b"\x5f\x41\x00\xff",
    "indefinite text": b"\x7f\x61a\xff",
    "indefinite array": b"\x9f\x01\xff",
    "indefinite map": b"\xbf\x01\x02\xff",
    "indefinite negint": b"\x3f",
    "lone break": b"\xff",
    "half float": b"\xf9\x3c\x00",
    "single float": b"\xfa\x3f\x80\x00\x00",
    "double float": b"\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00",
    "undefined": b"\xf7",
    "simple 16": b"\xf0",
    "simple one-byte": b"\xf8\x20",
    "bad utf-8": b"\x62\xc3\x28",
    "utf-8 surrogate": b"\x63\xed\xa0\x80",
    "utf-8 overlong": b"\x62\xc0\x80",
    "utf-8 overlong 3-byte": b"\x63\xe0\x80\x80",
    "utf-8 beyond U+10FFFF": b"\x64\xf4\x90\x80\x80",
    "utf-8 truncated sequence": b"\x62\xe2\x82",
    "duplicate key": b"\xa2\x01\x01\x01\x02",
    "array as key": b"\xa1\x80\x00",
    "bool as key": b"\xa1\xf5\x00",
    "trailing bytes": b"\x00\x00",
    "too deep arrays": b"\x81" * 17 + b"\x00",
    "too deep tags": b"\xc1" * 17 + b"\x00",
    "too deep maps": b"\xa1\x00" * 17 + b"\x00",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_raises_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        cbor.decode(MALFORMED[name])


ROUND_TRIP_BATCH = """
from mc import cbor
out = []
for item in INPUT:
    data = bytes.fromhex(item)
    try:
        out.append(cbor.encode(cbor.decode(data)).hex())
    except ValueError:
        out.append("ValueError")
print(json.dumps(out))
"""


def test_malformed_input_raises_value_error_under_micropython(mpy_json) -> None:
    names = sorted(MALFORMED)
    out = mpy_json(ROUND_TRIP_BATCH, [MALFORMED[n].hex() for n in names])
    assert dict(zip(names, out, strict=True)) == dict.fromkeys(names, "ValueError")


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(VALUES, min_size=10, max_size=25))
def test_micropython_decodes_and_reencodes_identically(mpy_json, values: list[Any]) -> None:
    values = [v for v in values if _depth(v) <= cbor.MAX_DEPTH]
    encoded = [cbor2.dumps(_to_cbor2(v), canonical=True).hex() for v in values]
    # Random bytes, and random text strings: MicroPython must refuse exactly what CPython
    # refuses (its own UTF-8 decoder is laxer than CPython's).
    noise = [os.urandom(n).hex() for n in range(1, 30)]
    noise += [(bytes([0x60 + n]) + os.urandom(n)).hex() for n in range(1, 24)]
    expected = []
    for item in noise:
        try:
            expected.append(cbor.encode(cbor.decode(bytes.fromhex(item))).hex())
        except ValueError:
            expected.append("ValueError")
    assert mpy_json(ROUND_TRIP_BATCH, encoded + noise) == encoded + expected


def test_tag_equality() -> None:
    assert cbor.Tag(18, [1]) == cbor.Tag(18, [1])
    assert cbor.Tag(18, [1]) != cbor.Tag(17, [1])
    assert cbor.Tag(18, [1]) != cbor.Tag(18, [2])
    assert cbor.Tag(18, [1]) != [1]
    assert repr(cbor.Tag(18, b"x")) == "Tag(18, b'x')"
