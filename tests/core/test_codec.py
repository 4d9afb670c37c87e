"""The strict decoder: only what the wire formats use, bounded work, one error family."""

from __future__ import annotations

import tracemalloc

import cbor2
import pytest

from meterchain import codec
from meterchain.errors import CodecError


def shared_value_bomb(levels: int) -> bytes:
    """`levels` nested pairs that each reference the level below twice (tags 28/29).

    A decoder that resolves shared values builds 2**levels leaves when the value is
    re-encoded (24 levels: 12 s and 410 MB in the original `codec.decode`).
    """
    value: list = []
    for _ in range(levels):
        value = [value, value]
    return cbor2.dumps(value, value_sharing=True)


@pytest.mark.parametrize("levels", [1, 2, 8, 24, 40])
def test_shared_value_bombs_are_refused_before_any_work(levels: int) -> None:
    bomb = shared_value_bomb(levels)
    assert len(bomb) < 300
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="tag 28 is not used"):
            codec.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # refused by the head scan: no object of the message is ever built
    assert peak < 64 * 1024


def test_a_lone_shared_reference_is_refused() -> None:
    with pytest.raises(CodecError, match="tag 29"):
        codec.decode(b"\x82\x80\xd8\x1d\x00")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (cbor2.dumps(cbor2.CBORTag(1, 0)), "tag 1 is not used"),  # datetime
        (cbor2.dumps(2**70), "tag 2 is not used"),  # bignum
        (cbor2.dumps(cbor2.CBORTag(18, [])), "tag 18 is not used"),  # COSE outside a reading
        (b"\xf7", "simple value 23"),  # undefined
        (b"\xf0", "simple value 16"),
        (b"\xf8\xff", "simple value 255"),
        (b"\x9f\x01\xff", "indefinite-length"),
        (b"\x7f\x61a\xff", "indefinite-length"),
        (b"\x18\x01", "shortest form"),
        (b"\x5a\x00\x00\x00\x01\x00", "shortest form"),
        (b"\x1c", "reserved"),
        (b"\x19\x01", "truncated"),
        (b"\x82\x00", "declares 2 items"),
        (b"\x5b" + (2**63).to_bytes(8, "big"), "declares"),
        (b"\x9b" + (2**63).to_bytes(8, "big"), "declares"),
        (b"\x01\x02", "trailing"),
        (b"\xa2\x02\x00\x01\x00", "not in canonical"),  # keys out of order
        (b"\xa2\x01\x00\x01\x00", "malformed CBOR"),  # duplicate key
        (b"\xa1\x81\x00\x00", "map key"),  # array as a key: crafted hash collisions
        (b"\xa1\xf9\x3c\x00\x00", "map key"),  # float as a key
        (b"\xa1\x1b\x00\x00\x00\x01\x00\x00\x00\x00\x00", "too large"),
        (b"\xfa\x3f\x80\x00\x00", "not in canonical"),  # 1.0 as float32, shortest is float16
        (b"\x62\xff\xfe", "malformed CBOR"),  # not UTF-8
        (b"\xf9\x7e\x00", "NaN or infinite"),
        (b"\xf9\xfc\x00", "NaN or infinite"),  # -inf
        (b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x01", "NaN or infinite"),
    ],
)
def test_everything_outside_the_wire_formats_is_a_codec_error(data: bytes, why: str) -> None:
    with pytest.raises(CodecError, match=why):
        codec.decode(data)


def test_bounds_on_depth_items_and_length() -> None:
    deep = b"\x81" * codec.MAX_DEPTH + b"\x00"
    assert codec.decode(deep) is not None
    with pytest.raises(CodecError, match="nested deeper"):
        codec.decode(b"\x81" + deep)
    many = codec.encode(list(range(100)))
    assert codec.decode(many, max_items=101) == list(range(100))
    with pytest.raises(CodecError, match="more than 100 items"):
        codec.decode(many, max_items=100)
    with pytest.raises(CodecError, match="exceeds the 10-byte limit"):
        codec.decode(codec.encode(b"x" * 10), max_bytes=10)
    with pytest.raises(CodecError, match="expected bytes"):
        codec.decode(3)  # type: ignore[arg-type]


def test_allowed_tags_and_the_formats_values_round_trip() -> None:
    cose = cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {4: b"k"}, b"\xa0", b"s" * 64]))
    assert codec.decode(cose, tags=frozenset({codec.COSE_SIGN1_TAG})).tag == 18
    value = {"a": [1, -1, 2**64 - 1, -(2**64), b"", "", None, True, False, 1.5], 7: {"x": []}}
    assert codec.decode(codec.encode(value)) == value
