"""Firmware COSE_Sign1 ES256: DESIGN.md shape, verified by pycose and OpenSSL, same on both VMs."""

from __future__ import annotations

import os
from typing import Any

import cbor2
import ecdsa
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mc import cose, p256
from pycose.algorithms import Es256
from pycose.headers import KID, Algorithm
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message

ORDER = ecdsa.NIST256p.order

SIGN1_BATCH = """
from mc import cose, p256
out = []
for payload_hex, secret_hex, kid_hex in INPUT:
    secret = int(secret_hex, 16)
    message = cose.sign1(bytes.fromhex(payload_hex), secret, bytes.fromhex(kid_hex))
    # The board's self-check: take its own message apart and verify it.
    protected, unprotected, payload, signature = cose.decode_sign1(message)
    assert cose.verify1(message, p256.public_key(secret)) == payload
    out.append([message.hex(), protected.hex(), unprotected[4].hex(), payload.hex()])
print(json.dumps(out))
"""


def _pycose_verify(message: bytes, pub: bytes) -> tuple[bool, Sign1Message]:
    """Verify with pycose, an independent COSE implementation.

    pycose 1.1's `CoseMessage.decode` cannot take the tuples cbor2 >= 6 returns for tagged
    arrays, so the tag is checked here and the four fields are handed to pycose directly.
    """
    tagged = cbor2.loads(message)
    assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 18
    protected, unprotected, payload, signature = tagged.value
    msg = Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)
    msg.key = EC2Key(crv=P256, x=pub[1:33], y=pub[33:])
    return msg.verify_signature(), msg


def _check(cases: list[tuple[bytes, int, bytes]], out: list[list[str]]) -> None:
    assert len(out) == len(cases)
    for (payload, secret, kid), (message_hex, protected_hex, kid_hex, payload_hex) in zip(
        cases, out, strict=True
    ):
        message = bytes.fromhex(message_hex)
        # Byte-identical on CPython and MicroPython.
        assert message == cose.sign1(payload, secret, kid)
        assert (protected_hex, kid_hex, payload_hex) == ("a10126", kid.hex(), payload.hex())
        # Exactly the DESIGN.md structure, read by cbor2.
        tagged = cbor2.loads(message)
        assert tagged.tag == 18
        protected, unprotected, body, signature = tagged.value
        assert protected == b"\xa1\x01\x26" and cbor2.loads(protected) == {1: -7}
        assert dict(unprotected) == {4: kid}
        assert body == payload
        assert len(signature) == 64
        assert message == cbor2.dumps(tagged, canonical=True)
        # pycose verifies it, and rejects it with another payload.
        pub = p256.public_key(secret)
        ok, msg = _pycose_verify(message, pub)
        assert ok
        assert msg.phdr == {Algorithm: Es256} and msg.uhdr == {KID: kid}
        msg.payload = payload + b"\x00"
        assert not msg.verify_signature()
        # OpenSSL verifies r||s over a Sig_structure built by cbor2, independently.
        to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub)
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        key.verify(der, to_sign, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            key.verify(der, to_sign + b"\x00", ec.ECDSA(hashes.SHA256()))


def _as_input(cases: list[tuple[bytes, int, bytes]]) -> list[list[str]]:
    return [[p.hex(), f"{s:x}", k.hex()] for p, s, k in cases]


def test_signed_readings_verify_everywhere_and_match_on_both_vms(mpy_json) -> None:
    reading = bytes.fromhex("a801626d3102010302040305040624070108627076")
    cases = [
        (reading, 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721, b"m1"),
        (b"", 1, b""),
        (bytes(1000), ORDER - 1, b"meter-0042"),
        (os.urandom(100), p256.secret_from_random(os.urandom(40)), os.urandom(16)),
    ]
    _check(cases, mpy_json(SIGN1_BATCH, _as_input(cases)))


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.binary(max_size=200), st.integers(1, ORDER - 1), st.binary(max_size=40)),
        min_size=6,
        max_size=12,
    )
)
def test_hypothesis_messages_match_on_both_vms(mpy_json, cases: list[Any]) -> None:
    _check(cases, mpy_json(SIGN1_BATCH, _as_input(cases)))


VERIFY_BATCH = """
from mc import cose
out = []
for message_hex, pub_hex in INPUT:
    try:
        out.append(cose.verify1(bytes.fromhex(message_hex), bytes.fromhex(pub_hex)).hex())
    except ValueError as exc:
        out.append("ValueError")
print(json.dumps(out))
"""


def _pycose_sign(payload: bytes, secret: int, kid: bytes) -> bytes:
    pub = p256.public_key(secret)
    msg = Sign1Message(phdr={Algorithm: Es256}, uhdr={KID: kid}, payload=payload)
    msg.key = EC2Key(crv=P256, d=secret.to_bytes(32, "big"), x=pub[1:33], y=pub[33:])
    return msg.encode()


def test_board_verifies_messages_signed_by_pycose(mpy_json) -> None:
    secret = 0xA11CE
    pub = p256.public_key(secret).hex()
    other = p256.public_key(secret + 1).hex()
    good = _pycose_sign(b"reading", secret, b"m1")
    cases = [[good.hex(), pub], [good.hex(), other], [good[:-1].hex() + "00", pub]]
    assert mpy_json(VERIFY_BATCH, cases) == [b"reading".hex(), "ValueError", "ValueError"]
    assert cose.verify1(good, bytes.fromhex(pub)) == b"reading"


def _sign1_fields(**changes: Any) -> bytes:
    fields = {
        "tag": 18,
        "protected": b"\xa1\x01\x26",
        "unprotected": {4: b"m1"},
        "payload": b"\xa0",
        "signature": bytes(64),
    }
    fields.update(changes)
    body = [fields["protected"], fields["unprotected"], fields["payload"], fields["signature"]]
    return cbor2.dumps(cbor2.CBORTag(fields["tag"], body))


MALFORMED = {
    "untagged": cbor2.dumps([b"\xa1\x01\x26", {}, b"", bytes(64)]),
    "COSE_Sign tag 98": _sign1_fields(tag=98),
    "three fields": cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {}, b""])),
    "not an array": cbor2.dumps(cbor2.CBORTag(18, b"")),
    "protected as map": _sign1_fields(protected={1: -7}),
    "alg ES384": _sign1_fields(protected=cbor2.dumps({1: -35})),
    "no alg": _sign1_fields(protected=b""),
    "protected not CBOR": _sign1_fields(protected=b"\xff"),
    "unprotected not a map": _sign1_fields(unprotected=[]),
    "detached payload": _sign1_fields(payload=None),
    "payload as text": _sign1_fields(payload="text"),
    "short signature": _sign1_fields(signature=bytes(63)),
    "DER-like long signature": _sign1_fields(signature=bytes(72)),
    "truncated": _sign1_fields()[:-1],
    "trailing byte": _sign1_fields() + b"\x00",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_decode_sign1_refuses_malformed_messages(name: str) -> None:
    with pytest.raises(ValueError):
        cose.decode_sign1(MALFORMED[name])


def test_decode_sign1_refuses_malformed_messages_under_micropython(mpy_json) -> None:
    code = """
from mc import cose
out = []
for item in INPUT:
    try:
        cose.decode_sign1(bytes.fromhex(item))
        out.append("accepted")
    except ValueError:
        out.append("ValueError")
print(json.dumps(out))
"""
    names = sorted(MALFORMED)
    out = mpy_json(code, [MALFORMED[n].hex() for n in names] + [_sign1_fields().hex()])
    assert dict(zip(names, out, strict=False)) == dict.fromkeys(names, "ValueError")
    assert out[-1] == "accepted"  # the well-formed control case


def test_sign1_refuses_non_bytes() -> None:
    with pytest.raises(TypeError):
        cose.sign1("payload", 1, b"kid")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cose.sign1(b"payload", 1, "kid")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cose.sign1(b"payload", 0, b"kid")


def test_verify1_rejects_a_tampered_message() -> None:
    message = cose.sign1(b"payload", 77, b"k")
    pub = p256.public_key(77)
    assert cose.verify1(message, pub) == b"payload"
    tampered = message.replace(b"payload", b"paylaod")
    with pytest.raises(ValueError):
        cose.verify1(tampered, pub)
