"""reading.verify: round trips, COSE interop with pycose, and one exact-reason test per refusal."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys.curves import P256
from pycose.keys.ec2 import EC2Key
from pycose.messages.sign1message import Sign1Message

from meterchain import codec, errors, reading
from meterchain.keys import PrivateKey
from meterchain.registry import Registry

from .conftest import DEFAULTS, LOAD_KEY, LOAD_METER, OTHER_KEY, PV_KEY, PV_METER, T0, payload_map

Signed = Callable[..., bytes]


def _envelope(
    protected: Any, unprotected: Any, payload: Any, signature: Any, tag: int = 18
) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, [protected, unprotected, payload, signature]))


def _parts(data: bytes) -> tuple[bytes, dict[int, Any], bytes, bytes]:
    protected, unprotected, payload, signature = cbor2.loads(data).value
    return protected, dict(unprotected), payload, signature


def _sign_raw_payload(payload: bytes, key: PrivateKey = PV_KEY, kid: bytes = b"mg1-pv-01") -> bytes:
    """A correctly signed envelope around arbitrary payload bytes."""
    return reading.sign_payload(key, payload, kid)


def _sign_map(key: PrivateKey = PV_KEY, kid: bytes = b"mg1-pv-01", **overrides: Any) -> bytes:
    return _sign_raw_payload(codec.encode(payload_map(**overrides)), key, kid)


def _refused(data: Any, registry: Registry, cls: type[errors.RejectedReading], **kw: Any) -> str:
    """verify(data) raises exactly `cls` (not a subclass of it); returns the message."""
    with pytest.raises(errors.RejectedReading) as info:
        reading.verify(data, registry, **kw)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    assert info.value.reason == cls.reason
    return str(info.value)


# --- round trips -------------------------------------------------------------------------


def test_round_trip_gives_back_every_field(registry: Registry, signed: Signed) -> None:
    data = signed()
    got = reading.verify(data, registry)
    assert (got.meter_id, got.seq, got.time) == (PV_METER, 42, T0)
    assert (got.import_wh, got.export_wh, got.power_w) == (1_234_567, 89_012, -2_500)
    assert (got.flags, got.source) == (0, "pv")
    assert got.signed == data
    assert got.digest == hashlib.sha256(data).digest()
    assert got.payload_map() == payload_map()


def test_wire_bytes_have_the_design_shape(signed: Signed) -> None:
    data = signed()
    protected, unprotected, payload, signature = _parts(data)
    assert data[:2] == b"\xd2\x84"  # tag 18, array of 4
    assert protected == bytes.fromhex("a10126")
    assert unprotected == {4: PV_METER.encode()}
    assert payload == codec.encode(payload_map())
    assert len(signature) == 64
    assert PV_KEY.public_key().verify(
        signature, codec.encode(["Signature1", protected, b"", payload])
    )


def test_reading_is_frozen_and_flag_helpers_read_the_bits(
    registry: Registry, signed: Signed
) -> None:
    flags = reading.FLAG_CLOCK_NOT_SYNCED | reading.FLAG_TAMPER | reading.FLAG_GATEWAY_ATTESTED
    got = reading.verify(signed(flags=flags), registry)
    assert not got.clock_synced and got.tamper and got.gateway_attested
    assert not (got.meter_read_error or got.counter_reset or got.spool_overflow)
    assert got.renewable
    with pytest.raises(AttributeError):
        got.seq = 43  # type: ignore[misc]
    every = reading.verify(signed(flags=reading.KNOWN_FLAGS, seq=43), registry)
    assert every.meter_read_error and every.counter_reset and every.spool_overflow
    assert not reading.verify(
        signed(key=LOAD_KEY, meter_id=LOAD_METER, source="load"), registry
    ).renewable


def test_fast_constructor_builds_the_same_reading(registry: Registry, signed: Signed) -> None:
    got = reading.verify(signed(), registry)
    by_dataclass = reading.Reading(
        got.meter_id, got.seq, got.time, got.import_wh, got.export_wh, got.power_w,
        got.flags, got.source, got.signed, got.digest,
    )  # fmt: skip
    assert got == by_dataclass and hash(got) == hash(by_dataclass)
    assert repr(got) == repr(by_dataclass)


def test_boundary_values_are_accepted(registry: Registry, signed: Signed) -> None:
    top = 2**64 - 1
    for fields in (
        {"seq": 0, "import_wh": 0, "export_wh": 0, "power_w": 0},
        {"seq": top, "import_wh": top, "export_wh": top},
        {"power_w": reading.MAX_POWER_W},
        {"power_w": -reading.MAX_POWER_W},
        {"time": reading.MIN_SYNCED_TIME},
        {"time": reading.MAX_TIME - 1},
        {"time": 0, "flags": reading.FLAG_CLOCK_NOT_SYNCED},  # unsynced clock: any early time
        {"meter_id": LOAD_METER, "source": "load"},
    ):
        key = LOAD_KEY if fields.get("meter_id") == LOAD_METER else PV_KEY
        got = reading.verify(signed(key=key, **fields), registry)
        for name, value in fields.items():
            assert getattr(got, name) == value


def test_bytearray_and_memoryview_inputs_are_accepted(registry: Registry, signed: Signed) -> None:
    data = signed()
    assert reading.verify(bytearray(data), registry).signed == data
    assert reading.verify(memoryview(data), registry).signed == data


def test_builders_match_codec_encoding() -> None:
    payload = codec.encode(payload_map())
    assert reading.sig_structure(payload) == codec.encode(
        ["Signature1", reading.PROTECTED_ES256, b"", payload]
    )
    kid, signature = b"k" * 30, bytes(range(64))
    assert reading.encode_sign1(kid, payload, signature) == codec.encode(
        cbor2.CBORTag(18, [reading.PROTECTED_ES256, {4: kid}, payload, signature])
    )
    assert reading.PROTECTED_ES256 == bytes.fromhex("a10126")


# --- interop with pycose, an independent COSE implementation ------------------------------


def _pycose_key(key: PrivateKey, private: bool) -> EC2Key:
    point = key.public_key().point
    d = key.secret.to_bytes(32, "big") if private else b""
    return EC2Key(crv=P256, x=point[1:33], y=point[33:], d=d)


def _pycose_message(items: list[Any]) -> Any:
    # pycose 1.1 cannot decode the tuples cbor2 >= 6 returns for tagged arrays,
    # so the four items go in through from_cose_obj. (Any: pycose's class
    # decorator hides Sign1Message's methods from type checkers.)
    return Sign1Message.from_cose_obj(items, True)


def test_pycose_verifies_what_sign_reading_makes(signed: Signed) -> None:
    protected, unprotected, payload, signature = _parts(signed())
    message = _pycose_message([protected, unprotected, payload, signature])
    message.key = _pycose_key(PV_KEY, private=False)
    assert message.verify_signature()
    assert message.phdr == {Algorithm: Es256}
    assert message.uhdr == {KID: PV_METER.encode()}


def test_verify_accepts_what_pycose_makes_and_it_is_byte_for_byte_canonical(
    registry: Registry,
) -> None:
    payload = codec.encode(payload_map())
    message: Any = Sign1Message(
        phdr={Algorithm: Es256}, uhdr={KID: PV_METER.encode()}, payload=payload
    )
    message.key = _pycose_key(PV_KEY, private=True)
    data = message.encode()
    got = reading.verify(data, registry)
    assert got.payload_map() == payload_map()
    # pycose encodes the protected header as a10126 and the envelope exactly as
    # encode_sign1 does: only the (randomized) signature differs from ours.
    assert data == reading.encode_sign1(PV_METER.encode(), payload, data[-64:])


def test_pycose_refuses_a_signature_verify_refuses(signed: Signed) -> None:
    protected, unprotected, payload, signature = _parts(signed())
    forged = bytes([signature[0] ^ 1]) + signature[1:]
    message = _pycose_message([protected, unprotected, payload, forged])
    message.key = _pycose_key(PV_KEY, private=False)
    assert not message.verify_signature()


# --- malformed CBOR ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "premature end"),
        (b"\xff", "break"),
        (b"\xd2\x84\x43\xa1\x01", "premature end"),
        (b"\x7f\x61a", "premature end"),
        (b"\x62\xff\xfe", "COSE_Sign1"),  # invalid UTF-8
    ],
)
def test_malformed_cbor(registry: Registry, data: bytes, says: str) -> None:
    assert says in _refused(data, registry, errors.MalformedCBOR)


def test_truncated_reading_is_malformed(registry: Registry, signed: Signed) -> None:
    assert "COSE_Sign1" in _refused(signed()[:-1], registry, errors.MalformedCBOR)


def test_trailing_bytes_are_malformed(registry: Registry, signed: Signed) -> None:
    message = _refused(signed() + b"\x00\x01", registry, errors.MalformedCBOR)
    assert "2 trailing bytes" in message


def test_duplicate_header_label_is_malformed(registry: Registry, signed: Signed) -> None:
    protected, _, payload, signature = _parts(signed())
    kid = PV_METER.encode()
    # {4: kid, 4: kid}: cbor2 would keep one; a map with a repeated key is invalid CBOR.
    unprotected = b"\xa2" + (b"\x04" + cbor2.dumps(kid)) * 2
    data = b"\xd2\x84\x43" + protected + unprotected + cbor2.dumps(payload) + cbor2.dumps(signature)
    assert "Duplicate" in _refused(data, registry, errors.MalformedCBOR)


def test_non_bytes_input_is_malformed(registry: Registry) -> None:
    assert "expected bytes, got str" in _refused("d284", registry, errors.MalformedCBOR)


def test_payload_that_is_not_cbor_is_malformed(registry: Registry) -> None:
    message = _refused(_sign_raw_payload(b"\xa8\x01"), registry, errors.MalformedCBOR)
    assert message.startswith("payload:")


def test_payload_with_trailing_bytes_is_malformed(registry: Registry) -> None:
    payload = codec.encode(payload_map()) + b"\x00"
    assert "payload: 1 trailing bytes" in _refused(
        _sign_raw_payload(payload), registry, errors.MalformedCBOR
    )


def test_payload_with_repeated_key_is_malformed(registry: Registry) -> None:
    good = codec.encode(payload_map())
    payload = b"\xa9" + good[1:] + b"\x07\x00"  # key 7 twice
    assert "Duplicate" in _refused(_sign_raw_payload(payload), registry, errors.MalformedCBOR)


# --- not a COSE_Sign1 --------------------------------------------------------------------


def test_not_cose_sign1_shapes(registry: Registry, signed: Signed) -> None:
    protected, unprotected, payload, signature = _parts(signed())
    cases = {
        "tag 98 is not COSE_Sign1": _envelope(protected, unprotected, payload, signature, tag=98),
        "tag 17 is not COSE_Sign1": _envelope(protected, unprotected, payload, signature, tag=17),
        "untagged array": cbor2.dumps([protected, unprotected, payload, signature]),
        "array of 4 items, got an array of 3": cbor2.dumps(
            cbor2.CBORTag(18, [protected, unprotected, payload])
        ),
        "got an array of 5": cbor2.dumps(
            cbor2.CBORTag(18, [protected, unprotected, payload, signature, b""])
        ),
        "got a map": cbor2.dumps(cbor2.CBORTag(18, {1: 2})),
        "expected CBOR tag 18 (COSE_Sign1), got an integer": cbor2.dumps(7),
        "expected CBOR tag 18 (COSE_Sign1), got a map": cbor2.dumps({1: 2}),
        "protected header must be a byte string, got a map": _envelope(
            {1: -7}, unprotected, payload, signature
        ),
        "unprotected header must be a map, got a byte string": _envelope(
            protected, b"", payload, signature
        ),
        "detached payload": _envelope(protected, unprotected, None, signature),
        "payload must be a byte string, got a text string": _envelope(
            protected, unprotected, "x", signature
        ),
        "signature must be a byte string, got an array": _envelope(
            protected, unprotected, payload, [1]
        ),
        "CBOR tag 55799 is not COSE_Sign1": cbor2.dumps(
            cbor2.CBORTag(55799, cbor2.CBORTag(18, [protected, unprotected, payload, signature]))
        ),
    }
    for says, data in cases.items():
        assert says in _refused(data, registry, errors.NotCoseSign1)


# --- headers -----------------------------------------------------------------------------


def test_wrong_algorithm(registry: Registry, signed: Signed) -> None:
    _, unprotected, payload, signature = _parts(signed())
    cases = {
        "alg -35 is not ES256": codec.encode({1: -35}),  # ES384
        "alg -8 is not ES256": codec.encode({1: -8}),  # EdDSA
        "alg 'ES256' is not ES256": codec.encode({1: "ES256"}),
        "protected header is empty": b"",
        "has no alg": codec.encode({}),
        "has no alg (label 1)": codec.encode({4: b"x"}),
    }
    for says, protected in cases.items():
        data = _envelope(protected, unprotected, payload, signature)
        assert says in _refused(data, registry, errors.WrongAlgorithm)


def test_extra_header_parameters_are_refused(registry: Registry, signed: Signed) -> None:
    protected, unprotected, payload, signature = _parts(signed())
    with_ctyp = _envelope(codec.encode({1: -7, 3: 0}), unprotected, payload, signature)
    assert "only alg; also found labels [3]" in _refused(with_ctyp, registry, errors.BadHeader)
    not_a_map = _envelope(codec.encode(-7), unprotected, payload, signature)
    assert "must encode a map" in _refused(not_a_map, registry, errors.BadHeader)
    extra_unprotected = _envelope(protected, {**unprotected, 5: b"iv"}, payload, signature)
    assert "only kid; also found labels [5]" in _refused(
        extra_unprotected, registry, errors.BadHeader
    )


def test_protected_header_must_be_canonical(registry: Registry, signed: Signed) -> None:
    _, unprotected, payload, signature = _parts(signed())
    # -7 in a one-byte argument (38 06) instead of the short form 26.
    data = _envelope(bytes.fromhex("a1013806"), unprotected, payload, signature)
    assert "a1013806, not a10126" in _refused(data, registry, errors.NonCanonical)


def test_missing_kid(registry: Registry, signed: Signed) -> None:
    protected, _, payload, signature = _parts(signed())
    no_kid = _envelope(protected, {}, payload, signature)
    assert "no kid (label 4)" in _refused(no_kid, registry, errors.MissingKid)
    text_kid = _envelope(protected, {4: PV_METER}, payload, signature)
    assert "byte string, got a text string" in _refused(text_kid, registry, errors.MissingKid)
    float_label = bytes.fromhex("d28443a10126a1f94400") + cbor2.dumps(PV_METER.encode())
    float_label += cbor2.dumps(payload) + cbor2.dumps(signature)
    assert "labels: [4.0]" in _refused(float_label, registry, errors.MissingKid)


def test_kid_mismatch(registry: Registry) -> None:
    data = _sign_map(kid=LOAD_METER.encode())
    message = _refused(data, registry, errors.KidMismatch)
    assert "b'mg2-load-07'" in message and "'mg1-pv-01'" in message


def test_non_canonical_envelope(registry: Registry, signed: Signed) -> None:
    data = signed()
    # The 64-byte signature's length in a two-byte argument (59 0040 instead of 58 40).
    longer = data[:-66] + b"\x59\x00\x40" + data[-64:]
    assert "envelope" in _refused(longer, registry, errors.NonCanonical)
    indefinite = b"\xd2\x9f" + data[2:] + b"\xff"  # indefinite-length array
    assert "envelope" in _refused(indefinite, registry, errors.NonCanonical)


def test_non_canonical_payloads_are_refused_even_when_signed(registry: Registry) -> None:
    good = codec.encode(payload_map())
    items = list(payload_map().items())
    reordered = b"\xa8" + b"".join(
        cbor2.dumps(k) + cbor2.dumps(v) for k, v in [items[1], items[0], *items[2:]]
    )
    long_int = good.replace(b"\x02\x18\x2a", b"\x02\x19\x00\x2a")  # seq 42 in two bytes
    assert long_int != good
    indefinite_map = b"\xbf" + good[1:] + b"\xff"
    meter = PV_METER.encode()
    indefinite_text = good.replace(
        b"\x69" + meter,
        b"\x7f" + cbor2.dumps(meter[:3].decode()) + cbor2.dumps(meter[3:].decode()) + b"\xff",
    )
    for payload in (reordered, long_int, indefinite_map, indefinite_text):
        assert cbor2.loads(payload) == payload_map()
        message = _refused(_sign_raw_payload(payload), registry, errors.NonCanonical)
        assert "payload" in message


# --- registry, source, signature ---------------------------------------------------------


def test_unknown_meter(signed: Signed) -> None:
    empty = Registry()
    assert "'mg1-pv-01' is not in the registry" in _refused(signed(), empty, errors.UnknownMeter)


def test_source_must_match_the_registry(registry: Registry, signed: Signed) -> None:
    message = _refused(signed(source="wind"), registry, errors.SourceMismatch)
    assert "registered as 'pv' but the reading says 'wind'" in message


def test_bad_signatures(registry: Registry, signed: Signed) -> None:
    data = signed()
    flipped = data[:-1] + bytes([data[-1] ^ 0x80])
    assert "mg1-pv-01" in _refused(flipped, registry, errors.BadSignature)
    by_other_key = signed(key=OTHER_KEY)
    assert "does not verify" in _refused(by_other_key, registry, errors.BadSignature)
    protected, unprotected, payload, signature = _parts(data)
    short = _envelope(protected, unprotected, payload, signature[:63])
    assert "63 bytes" in _refused(short, registry, errors.BadSignature)
    zeros = _envelope(protected, unprotected, payload, bytes(64))  # r = s = 0
    _refused(zeros, registry, errors.BadSignature)
    # A valid signature over another reading of the same meter.
    other = _parts(signed(seq=43))[3]
    _refused(_envelope(protected, unprotected, payload, other), registry, errors.BadSignature)


def test_signature_by_the_other_registered_meter_is_refused(registry: Registry) -> None:
    # LOAD_KEY is registered, but for another meter id: kid and payload say PV.
    _refused(_sign_map(key=LOAD_KEY), registry, errors.BadSignature)


# --- fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("seq", -1, "-1 is outside 0 .. 2**64-1"),
        ("import_wh", -5, "-5 is outside"),
        ("export_wh", -(2**64), "is outside"),
        ("power_w", reading.MAX_POWER_W + 1, "10000001 W is beyond"),
        ("power_w", -reading.MAX_POWER_W - 1, "-10000001 W is beyond"),
        ("flags", 0x40, "unknown bits 0x40"),
        ("flags", -1, "-1 is outside"),
        ("time", reading.MIN_SYNCED_TIME - 1, "clock-not-synced flag is not set"),
        ("time", reading.MAX_TIME, "outside 2020-01-01 .. 2100-01-01"),
        ("source", "coal", "unknown source type 'coal'"),
        ("meter_id", "", "'' is not 1-64 characters"),
        ("meter_id", "mg1/pv", "'mg1/pv' is not"),
        ("meter_id", "mg1-pv-01\n", "is not 1-64"),
        ("meter_id", "m" * 65, "is not 1-64"),
    ],
)
def test_field_out_of_range(registry: Registry, field: str, value: Any, says: str) -> None:
    kid = value.encode() if field == "meter_id" else b"mg1-pv-01"
    error = _refused(_sign_map(kid=kid, **{field: value}), registry, errors.FieldOutOfRange)
    assert error.startswith(f"reading field {field}: ") and says in error


def test_unsynced_time_still_has_an_upper_bound(registry: Registry) -> None:
    data = _sign_map(time=reading.MAX_TIME, flags=reading.FLAG_CLOCK_NOT_SYNCED)
    assert "after 2100-01-01" in _refused(data, registry, errors.FieldOutOfRange)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("seq", "42", "unsigned integer, got a text string"),
        ("seq", True, "got a boolean"),
        ("time", 1.76e9, "got a float"),
        ("import_wh", cbor2.CBORTag(2, b"\x01"), "got CBOR tag 2"),  # bignum 1
        ("export_wh", None, "got null"),
        ("power_w", 2.5, "integer (W), got a float"),
        ("flags", [0], "got an array"),
        ("meter_id", b"mg1-pv-01", "text string, got a byte string"),
        ("source", {1: "pv"}, "text string, got a map"),
    ],
)
def test_field_wrong_type(registry: Registry, field: str, value: Any, says: str) -> None:
    error = _refused(_sign_map(**{field: value}), registry, errors.FieldWrongType)
    assert error.startswith(f"reading field {field}: ") and says in error


@pytest.mark.parametrize("key", range(1, 9))
def test_missing_field(registry: Registry, key: int) -> None:
    fields = payload_map()
    del fields[key]
    error = _refused(_sign_raw_payload(codec.encode(fields)), registry, errors.MissingField)
    name = reading.FIELDS[key - 1]
    assert error == f"reading field {name}: key {key} is missing from the payload"
    assert error.startswith(f"reading field {name}:")


@pytest.mark.parametrize(
    ("key", "shown"), [(9, "key 9"), (0, "key 0"), ("1", "key '1'"), (-1, "key -1")]
)
def test_unknown_field(registry: Registry, key: Any, shown: str) -> None:
    fields: dict[Any, Any] = {**payload_map(), key: 1}
    error = _refused(_sign_raw_payload(codec.encode(fields)), registry, errors.UnknownField)
    assert error.startswith(f"reading field {shown}: not a reading field")


def test_boolean_key_is_not_key_one(registry: Registry) -> None:
    fields: dict[Any, Any] = payload_map()
    meter = fields.pop(1)
    # CBOR true (f5) compares equal to 1 in Python; it must not pass as the meter id key.
    payload = b"\xa8\xf5" + cbor2.dumps(meter) + codec.encode(fields)[1:]
    error = _refused(_sign_raw_payload(payload), registry, errors.UnknownField)
    assert "key True" in error


def test_payload_must_be_a_map(registry: Registry) -> None:
    data = _sign_raw_payload(codec.encode(list(payload_map().values())))
    assert "payload must be a map, got an array" in _refused(data, registry, errors.NotAReading)


# --- clock -------------------------------------------------------------------------------


def test_clock_skew_only_when_a_clock_is_given(registry: Registry, signed: Signed) -> None:
    ahead = signed(time=T0 + 301)
    assert reading.verify(ahead, registry).time == T0 + 301
    error = _refused(ahead, registry, errors.ClockSkew, now=T0)
    assert "301 s ahead" in error and "allowed 300 s" in error
    assert reading.verify(ahead, registry, now=T0, max_clock_ahead_s=400).seq == 42
    assert reading.verify(signed(time=T0 + 300), registry, now=T0).time == T0 + 300
    # An unsynced clock already says its time is unreliable: flagged, not refused.
    unsynced = signed(time=T0 + 10_000, flags=reading.FLAG_CLOCK_NOT_SYNCED)
    assert reading.verify(unsynced, registry, now=T0).time == T0 + 10_000


# --- building readings -------------------------------------------------------------------


def test_encode_payload_refuses_what_verify_refuses() -> None:
    with pytest.raises(errors.FieldOutOfRange, match="power_w"):
        reading.encode_payload(**{**DEFAULTS, "power_w": 10**8})
    with pytest.raises(errors.FieldWrongType, match="seq"):
        reading.encode_payload(**{**DEFAULTS, "seq": 1.0})


def test_every_reason_is_distinct_and_stable() -> None:
    classes = [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.RejectedReading)
    ]
    reasons = {cls.reason for cls in classes}
    assert len(reasons) == len(classes)
    assert {
        "malformed_cbor", "not_cose_sign1", "wrong_algorithm", "bad_header", "non_canonical",
        "missing_kid", "kid_mismatch", "unknown_meter", "source_mismatch", "bad_signature",
        "not_a_reading", "missing_field", "unknown_field", "field_wrong_type",
        "field_out_of_range", "clock_skew", "replayed", "duplicate", "out_of_order",
        "counter_backwards",
    } <= reasons  # fmt: skip
