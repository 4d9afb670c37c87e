"""Firmware P-256 signer: RFC 6979 vectors, OpenSSL/`ecdsa` interop, same bytes on both VMs."""

from __future__ import annotations

import hashlib
import hmac
import os

import ecdsa
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mc import p256

P256_ORDER = ecdsa.NIST256p.order

# RFC 6979 A.2.5 (P-256, SHA-256): the key and "sample" signature DESIGN.md quotes,
# and the RFC's second message, "test".
RFC6979_SECRET = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_PUBLIC = bytes.fromhex(
    "04"
    "60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6"
    "7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299"
)
RFC6979_SAMPLE_SIG = bytes.fromhex(
    "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716"
    "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"
)
RFC6979_TEST_SIG = bytes.fromhex(
    "F1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367"
    "019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083"
)

# Scalars that stress the comb: one tooth only, full columns, the extremes of [1, n-1].
EDGE_SECRETS = [
    1,
    2,
    3,
    0xFF,
    1 << 32,
    1 << 224,
    (1 << 255) + 1,
    sum(1 << (32 * t) for t in range(8)),  # column 0 uses all 8 teeth
    sum(1 << (32 * t + 31) for t in range(8)),  # column 31 uses all 8 teeth
    P256_ORDER - 1,
    P256_ORDER - 2,
    P256_ORDER >> 1,
]

# Signs each case, returns public keys and signatures as hex.
SIGN_BATCH = """
from mc import p256
out = []
for secret_hex, msg_hex in INPUT:
    secret = int(secret_hex, 16)
    msg = bytes.fromhex(msg_hex)
    out.append([p256.public_key(secret).hex(), p256.sign(secret, msg).hex()])
print(json.dumps(out))
"""


def _cryptography_verify(pub: bytes, msg: bytes, sig: bytes) -> bool:
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), pub)
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), msg, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _ecdsa_key(secret: int) -> ecdsa.SigningKey:
    return ecdsa.SigningKey.from_secret_exponent(secret, curve=ecdsa.NIST256p)


def _check_batch(cases: list[tuple[int, bytes]], mp_out: list[list[str]]) -> None:
    """MicroPython results equal CPython's and `ecdsa`'s bytes and verify with both libraries."""
    assert len(mp_out) == len(cases)
    for (secret, msg), (pub_hex, sig_hex) in zip(cases, mp_out, strict=True):
        pub = bytes.fromhex(pub_hex)
        sig = bytes.fromhex(sig_hex)
        assert pub == p256.public_key(secret)
        assert sig == p256.sign(secret, msg)
        sk = _ecdsa_key(secret)
        assert pub == b"\x04" + sk.get_verifying_key().to_string()
        # Both implement RFC 6979, so the signatures must be identical, not just valid.
        assert sig == sk.sign_deterministic(msg, hashfunc=hashlib.sha256)
        assert sk.get_verifying_key().verify(sig, msg, hashfunc=hashlib.sha256)
        assert _cryptography_verify(pub, msg, sig)


def test_rfc6979_vectors_on_cpython() -> None:
    assert p256.public_key(RFC6979_SECRET) == RFC6979_PUBLIC
    assert p256.sign(RFC6979_SECRET, b"sample") == RFC6979_SAMPLE_SIG
    assert p256.sign(RFC6979_SECRET, b"test") == RFC6979_TEST_SIG


def test_rfc6979_vectors_under_micropython(mpy_json) -> None:
    cases = [[f"{RFC6979_SECRET:x}", b"sample".hex()], [f"{RFC6979_SECRET:x}", b"test".hex()]]
    out = mpy_json(SIGN_BATCH, cases)
    assert out == [
        [RFC6979_PUBLIC.hex(), RFC6979_SAMPLE_SIG.hex()],
        [RFC6979_PUBLIC.hex(), RFC6979_TEST_SIG.hex()],
    ]


def test_edge_scalars_and_messages_match_on_both_vms(mpy_json) -> None:
    messages = [b"", b"\x00", b"x" * 1000, bytes(range(256))]
    cases = [(s, messages[i % len(messages)]) for i, s in enumerate(EDGE_SECRETS)]
    out = mpy_json(SIGN_BATCH, [[f"{s:x}", m.hex()] for s, m in cases])
    _check_batch(cases, out)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(1, P256_ORDER - 1), st.binary(max_size=300)),
        min_size=8,
        max_size=16,
    )
)
def test_hypothesis_batches_match_on_both_vms(mpy_json, cases: list[tuple[int, bytes]]) -> None:
    out = mpy_json(SIGN_BATCH, [[f"{s:x}", m.hex()] for s, m in cases])
    _check_batch(cases, out)


def test_signature_is_not_low_s_normalised() -> None:
    # The RFC's s is in the upper half; the module documents that it keeps it as is.
    s = int.from_bytes(p256.sign(RFC6979_SECRET, b"sample")[32:], "big")
    assert s > P256_ORDER // 2


@pytest.mark.parametrize("secret", [0, P256_ORDER, P256_ORDER + 1, -1])
def test_out_of_range_secret_is_refused(secret: int) -> None:
    with pytest.raises(ValueError):
        p256.sign(secret, b"m")
    with pytest.raises(ValueError):
        p256.public_key(secret)


def test_non_int_secret_is_refused() -> None:
    with pytest.raises(TypeError):
        p256.sign(True, b"m")
    with pytest.raises(TypeError):
        p256.public_key("1")  # type: ignore[arg-type]


def test_verify_accepts_openssl_signatures_and_rejects_forgeries() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    msg = b"reading 42"
    r, s = decode_dss_signature(key.sign(msg, ec.ECDSA(hashes.SHA256())))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert p256.verify(pub, msg, sig)
    # The other s of the pair (n - s) is valid ECDSA too; verifiers must accept both halves.
    assert p256.verify(pub, msg, sig[:32] + (P256_ORDER - s).to_bytes(32, "big"))
    assert not p256.verify(pub, msg + b"!", sig)
    assert not p256.verify(pub, msg, sig[:63] + bytes([sig[63] ^ 1]))
    assert not p256.verify(pub, msg, bytes(32) + sig[32:])  # r == 0
    assert not p256.verify(pub, msg, sig[:32] + P256_ORDER.to_bytes(32, "big"))  # s == n
    assert not p256.verify(pub, msg, sig[:32])  # truncated
    off_curve = pub[:64] + bytes([pub[64] ^ 1])
    assert not p256.verify(off_curve, msg, sig)
    assert not p256.verify(b"\x02" + pub[1:33], msg, sig)  # compressed form not accepted


def test_verify_handles_the_equal_and_opposite_point_cases() -> None:
    n = P256_ORDER
    msg = b"edge"
    e = int.from_bytes(hashlib.sha256(msg).digest(), "big") % n
    k = 0x5EED
    r = int.from_bytes(p256.public_key(k)[1:33], "big") % n
    # With the key d = e/r, u1*G == u2*Q (u1 = e/s, u2 = r/s): the final addition is a
    # doubling.  s = (e + r*d)/k = 2e/k makes (r, s) a valid signature for that key.
    d = e * pow(r, -1, n) % n
    s = 2 * e * pow(k, -1, n) % n
    pub = p256.public_key(d)
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert _cryptography_verify(pub, msg, sig)
    assert p256.verify(pub, msg, sig)
    # With d = -e/r the two halves cancel: u1*G + u2*Q is the point at infinity.
    pub = p256.public_key(n - d)
    assert not p256.verify(pub, msg, sig)


VERIFY_BATCH = """
from mc import p256
out = []
for pub_hex, msg_hex, sig_hex in INPUT:
    out.append(p256.verify(bytes.fromhex(pub_hex), bytes.fromhex(msg_hex), bytes.fromhex(sig_hex)))
print(json.dumps(out))
"""


def test_verify_under_micropython(mpy_json) -> None:
    sk = _ecdsa_key(0x1234567890ABCDEF)
    pub = (b"\x04" + sk.get_verifying_key().to_string()).hex()
    cases, expected = [], []
    for i in range(4):
        msg = f"reading {i}".encode()
        sig = sk.sign(msg, hashfunc=hashlib.sha256)  # random nonce, not RFC 6979
        cases.append([pub, msg.hex(), sig.hex()])
        expected.append(True)
        cases.append([pub, (msg + b"x").hex(), sig.hex()])
        expected.append(False)
    assert mpy_json(VERIFY_BATCH, cases) == expected


SECRET_BATCH = """
from mc import p256
out = []
for rand_hex in INPUT:
    try:
        out.append("%x" % p256.secret_from_random(bytes.fromhex(rand_hex)))
    except ValueError:
        out.append("ValueError")
print(json.dumps(out))
"""


def _reference_secret(rand: bytes) -> int:
    # FIPS 186-4 B.4.1: d = (c mod (n - 1)) + 1.
    return int.from_bytes(rand, "big") % (P256_ORDER - 1) + 1


def test_secret_from_random_maps_every_input_into_range_deterministically(mpy_json) -> None:
    n = P256_ORDER
    inputs = [
        bytes(40),  # zero -> 1
        b"\xff" * 40,
        (n - 1).to_bytes(40, "big"),  # wraps to 1
        (n - 2).to_bytes(40, "big"),  # the largest key, n - 1
        (n).to_bytes(40, "big"),
        os.urandom(40),
        os.urandom(64),  # longer input is used whole
        bytes(39),  # too short
        b"",
    ]
    expected = [
        1,
        _reference_secret(b"\xff" * 40),
        1,
        n - 1,
        2,
        _reference_secret(inputs[5]),
        _reference_secret(inputs[6]),
    ]
    for rand, want in zip(inputs, expected, strict=False):
        assert p256.secret_from_random(rand) == want
        assert p256.secret_from_random(rand) == want  # same bytes, same key
    for rand in inputs[7:]:
        with pytest.raises(ValueError):
            p256.secret_from_random(rand)
    out = mpy_json(SECRET_BATCH, [r.hex() for r in inputs])
    assert out == [f"{w:x}" for w in expected] + ["ValueError", "ValueError"]
    assert p256.RANDOM_BYTES == 40


def test_secret_from_random_is_roughly_uniform() -> None:
    # 4096 keys: each of the 16 top-nibble buckets should hold about 256 (sd ~16).
    buckets = [0] * 16
    lower_half = 0
    for _ in range(4096):
        d = p256.secret_from_random(os.urandom(p256.RANDOM_BYTES))
        assert 1 <= d <= P256_ORDER - 1
        buckets[d >> 252] += 1
        lower_half += d < P256_ORDER // 2
    assert all(150 < b < 370 for b in buckets), buckets
    assert 1800 < lower_half < 2300


@pytest.mark.parametrize("key_len", [0, 1, 32, 64, 65, 200])
def test_hmac_sha256_matches_the_standard_library(key_len: int) -> None:
    key = bytes(range(key_len % 256)) * (key_len // 256 + 1)
    key = key[:key_len]
    for msg in (b"", b"abc", bytes(1000)):
        assert p256.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


def test_hmac_sha256_under_micropython(mpy_json) -> None:
    sizes = ((0, 0), (32, 97), (64, 1), (90, 300))
    cases = [[os.urandom(n).hex(), os.urandom(m).hex()] for n, m in sizes]
    code = """
from mc import p256
print(json.dumps([p256.hmac_sha256(bytes.fromhex(k), bytes.fromhex(m)).hex() for k, m in INPUT]))
"""
    expected = [
        hmac.new(bytes.fromhex(k), bytes.fromhex(m), hashlib.sha256).hexdigest() for k, m in cases
    ]
    assert mpy_json(code, cases) == expected


def test_precompute_builds_the_table_once() -> None:
    size = p256.precompute()
    assert size == 255 * 64
    table = p256._table
    assert p256.precompute() == size
    assert p256._table is table
    # Entry 1 is G itself, entry 255 the sum of all eight teeth.
    assert bytes(table[:64]) == p256.public_key(1)[1:]
    all_teeth = sum(1 << (32 * t) for t in range(8))
    assert bytes(table[254 * 64 :]) == p256.public_key(all_teeth)[1:]
