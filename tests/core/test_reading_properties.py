"""Property tests for reading.verify: round trips, no bit flip survives, garbage is refused."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meterchain import codec, errors, reading
from meterchain.registry import Registry

from .conftest import LOAD_KEY, LOAD_METER, PV_KEY, PV_METER, make_registry, payload_map

REGISTRY = make_registry()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
# Bias towards the CBOR head-size boundaries, where encoders go wrong.
EDGES = st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
UINTS = st.one_of(UINT64, EDGES)

valid_fields = st.fixed_dictionaries(
    {
        "seq": UINTS,
        "import_wh": UINTS,
        "export_wh": UINTS,
        "power_w": st.integers(-reading.MAX_POWER_W, reading.MAX_POWER_W),
        "flags": st.integers(0, reading.KNOWN_FLAGS),
        "time": st.integers(reading.MIN_SYNCED_TIME, reading.MAX_TIME - 1),
        "pv": st.booleans(),
    }
)


def _sign(fields: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    fields = dict(fields)
    pv = fields.pop("pv")
    key, meter_id, source = (PV_KEY, PV_METER, "pv") if pv else (LOAD_KEY, LOAD_METER, "load")
    full = {**fields, "meter_id": meter_id, "source": source}
    return reading.sign_reading(key, **full), full


@SETTINGS
@given(valid_fields)
def test_signed_readings_round_trip(fields: dict[str, Any]) -> None:
    data, full = _sign(fields)
    got = reading.verify(data, REGISTRY)
    for name, value in full.items():
        assert getattr(got, name) == value
    assert got.signed == data


@SETTINGS
@given(valid_fields, st.text(alphabet="abcXYZ019_.:-", min_size=1, max_size=64))
def test_canonical_length_check_agrees_with_codec(fields: dict[str, Any], meter_id: str) -> None:
    fields = {k: v for k, v in fields.items() if k != "pv"}
    for source in sorted(reading.SOURCES):
        full = {**fields, "meter_id": meter_id, "source": source}
        encoded = reading.encode_payload(**full)
        assert reading._canonical_payload_len(**full) == len(encoded)


@SETTINGS
@given(st.binary(max_size=70000), st.binary(max_size=300), st.binary(max_size=70))
def test_builders_agree_with_codec(payload: bytes, kid: bytes, signature: bytes) -> None:
    assert reading.sig_structure(payload) == codec.encode(
        ["Signature1", reading.PROTECTED_ES256, b"", payload]
    )
    assert reading.encode_sign1(kid, payload, signature) == codec.encode(
        cbor2.CBORTag(18, [reading.PROTECTED_ES256, {4: kid}, payload, signature])
    )


def test_every_single_bit_flip_of_a_reading_is_refused() -> None:
    """Exhaustive over one reading: each of its ~1000 bits, flipped alone, is refused."""
    data, _ = _sign({**payload_map_fields(), "pv": True})
    reasons: set[str] = set()
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(errors.RejectedReading) as info:
            reading.verify(bytes(flipped), REGISTRY)
        reasons.add(info.value.reason)
    # The flips land in every layer, not just the signature.
    assert {"bad_signature", "malformed_cbor", "not_cose_sign1", "kid_mismatch"} <= reasons


def payload_map_fields() -> dict[str, Any]:
    values = payload_map()
    return {name: values[i + 1] for i, name in enumerate(reading.FIELDS) if i + 1 not in (1, 8)}


@SETTINGS
@given(valid_fields, st.data())
def test_random_bit_flips_of_random_readings_are_refused(
    fields: dict[str, Any], data: st.DataObject
) -> None:
    signed, _ = _sign(fields)
    bit = data.draw(st.integers(0, len(signed) * 8 - 1))
    flipped = bytearray(signed)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(errors.RejectedReading):
        reading.verify(bytes(flipped), REGISTRY)


def _only_refusals(data: bytes, registry: Registry = REGISTRY) -> None:
    """verify either accepts or raises a RejectedReading subclass, never anything else."""
    try:
        got = reading.verify(data, registry)
    except errors.RejectedReading as exc:
        assert type(exc) is not errors.RejectedReading and exc.reason != "rejected"
        assert str(exc)
        return
    assert got.signed == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_only_ever_refused(data: bytes) -> None:
    _only_refusals(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_behind_a_valid_prefix_are_only_ever_refused(tail: bytes) -> None:
    # Drives the decoder past the tag and array heads into every later branch.
    _only_refusals(b"\xd2\x84\x43\xa1\x01\x26\xa1\x04" + tail)


CBOR_LEAVES = st.one_of(
    st.integers(-(2**64), 2**64 - 1),
    st.binary(max_size=20),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
CBOR_TAGS = st.sampled_from([0, 1, 2, 3, 4, 5, 18, 24, 25, 28, 29, 30, 35, 36, 37, 256, 258, 55799])


def _tagged(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.builds(cbor2.CBORTag, CBOR_TAGS, children)


CBOR_VALUES = st.recursive(
    CBOR_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.integers(-2, 10), st.text(max_size=3)), children, max_size=5),
        _tagged(children),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(CBOR_VALUES)
def test_arbitrary_cbor_structures_are_only_ever_refused(value: Any) -> None:
    _only_refusals(cbor2.dumps(value))
    _only_refusals(cbor2.dumps(cbor2.CBORTag(18, value)))


@settings(max_examples=200, deadline=None)
@given(CBOR_VALUES, CBOR_VALUES, CBOR_VALUES, CBOR_VALUES, st.integers(0, 15))
def test_cose_shaped_structures_with_arbitrary_items_are_only_ever_refused(
    protected: Any, unprotected: Any, payload: Any, signature: Any, keep: int
) -> None:
    good = cbor2.loads(
        reading.sign_reading(
            PV_KEY, **{**payload_map_fields(), "meter_id": PV_METER, "source": "pv"}
        )
    ).value
    # Keep a random subset of the good items so the walk gets past earlier checks.
    items = [
        good[0] if keep & 1 else protected,
        dict(good[1]) if keep & 2 else unprotected,
        good[2] if keep & 4 else payload,
        good[3] if keep & 8 else signature,
    ]
    assume(keep != 15)
    _only_refusals(cbor2.dumps(cbor2.CBORTag(18, items)))


PAYLOAD_VALUES = st.one_of(
    CBOR_VALUES,
    UINT64,
    st.sampled_from([PV_METER, "pv", "load", reading.MIN_SYNCED_TIME, -1, 2**64 - 1]),
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.one_of(st.integers(-1, 10), st.text(max_size=2)), PAYLOAD_VALUES, max_size=10
    ),
    st.booleans(),
)
def test_signed_arbitrary_payload_maps_are_refused_or_exact(
    fields: dict[Any, Any], base: bool
) -> None:
    """Correctly signed payloads of any shape: refused, or accepted with exactly those fields."""
    if base:
        fields = {**payload_map(), **fields}
    try:
        payload = cbor2.dumps(fields)
    except (cbor2.CBOREncodeError, ValueError, TypeError):
        assume(False)
    data = reading.sign_payload(PV_KEY, payload, PV_METER.encode())
    try:
        got = reading.verify(data, REGISTRY)
    except errors.RejectedReading as exc:
        assert type(exc) is not errors.RejectedReading
        return
    assert got.payload_map() == fields
    assert payload == codec.encode(fields)
