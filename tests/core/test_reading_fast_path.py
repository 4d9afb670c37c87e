"""verify's byte-slicing envelope split agrees with the full decode on valid and broken input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterchain import errors, reading

from .conftest import DEFAULTS, PV_KEY, PV_METER, make_registry

REGISTRY = make_registry()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GOOD = reading.sign_reading(PV_KEY, **DEFAULTS)
GOOD_PAYLOAD = reading.encode_payload(**DEFAULTS)
GOOD_SIGNATURE = GOOD[-reading.SIGNATURE_LEN :]

# Lengths around every head-size boundary: 23/24 (one-byte head or 0x58), 255/256 (0x59).
KIDS = st.one_of(
    st.just(PV_METER.encode()),
    st.binary(max_size=30),
    st.integers(0, 300).map(lambda n: b"k" * n),
)
PAYLOADS = st.one_of(
    st.just(GOOD_PAYLOAD),
    st.binary(max_size=30),
    st.integers(0, 300).map(lambda n: GOOD_PAYLOAD[:n].ljust(n, b"\x00")),
)
SIGNATURES = st.one_of(st.just(GOOD_SIGNATURE), st.binary(min_size=62, max_size=66))


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """Canonical envelopes of arbitrary parts, then maybe one edit: flip, splice, cut, append."""
    data = bytearray(reading.encode_sign1(draw(KIDS), draw(PAYLOADS), draw(SIGNATURES)))
    edit = draw(st.sampled_from(["none", "flip", "replace", "insert", "delete", "cut", "append"]))
    if edit == "none":
        return bytes(data)
    at = draw(st.integers(0, len(data) - 1))
    if edit == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif edit == "replace":
        data[at] = draw(st.integers(0, 255))
    elif edit == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=3))
    elif edit == "delete":
        del data[at]
    elif edit == "cut":
        del data[at:]
    else:
        data += draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


INPUTS = st.one_of(
    envelopes(),
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda tail: reading._SIGN1_ES256 + tail),
)


def _strict(data: bytes) -> Any:
    try:
        return reading._split_strict(data)
    except errors.RejectedReading as exc:
        return type(exc), str(exc)


@SETTINGS
@given(INPUTS)
def test_fast_split_only_accepts_what_the_full_decode_accepts(data: bytes) -> None:
    fast = reading._split_canonical(data)
    if fast is not None:
        assert fast == _strict(data)


@SETTINGS
@given(KIDS, PAYLOADS, SIGNATURES)
def test_fast_split_takes_every_canonical_envelope_it_can(
    kid: bytes, payload: bytes, signature: bytes
) -> None:
    data = reading.encode_sign1(kid, payload, signature)
    fast = reading._split_canonical(data)
    if len(kid) < 256 and len(payload) < 256 and len(signature) == reading.SIGNATURE_LEN:
        assert fast is not None  # the hot path is really taken for what boards send
        assert fast[3] == signature
        assert reading._SIG_STRUCTURE_ES256 + fast[2] == reading.sig_structure(payload)
    else:
        assert fast is None


def _outcome(data: bytes) -> Any:
    try:
        return reading.verify(data, REGISTRY)
    except errors.RejectedReading as exc:
        return type(exc), str(exc)


@SETTINGS
@given(INPUTS)
def test_verify_gives_the_same_reading_or_refusal_without_the_fast_split(data: bytes) -> None:
    fast = _outcome(data)
    with pytest.MonkeyPatch.context() as patch:
        # Not a stand-in for a component: it switches the shortcut off, leaving the full decode.
        patch.setattr(reading, "_split_canonical", lambda data: None)
        slow = _outcome(data)
    assert fast == slow


def test_a_board_reading_takes_the_fast_split() -> None:
    kid, payload, payload_item, signature = reading._split_canonical(GOOD) or (b"",) * 4
    assert (kid, payload, signature) == (PV_METER.encode(), GOOD_PAYLOAD, GOOD_SIGNATURE)
    assert payload_item == GOOD[len(reading._SIGN1_ES256) + 1 + len(kid) : -66]
    assert reading.verify(GOOD, REGISTRY).signed == GOOD


@pytest.mark.parametrize(
    "head", [b"\x58\x09", b"\x59\x00\x09", b"\x5a\x00\x00\x00\x09", b"\x5f\x49"]
)
def test_a_longer_kid_head_is_left_to_the_full_decode(head: bytes) -> None:
    """The same kid behind a longer head (or in chunks) decodes alike but is not canonical."""
    kid = PV_METER.encode()
    start = len(reading._SIGN1_ES256)
    data = (
        GOOD[:start]
        + head
        + kid
        + (b"\xff" if head == b"\x5f\x49" else b"")
        + GOOD[start + 1 + len(kid) :]
    )
    assert reading._split_canonical(data) is None
    with pytest.raises(errors.NonCanonical):
        reading.verify(data, REGISTRY)
