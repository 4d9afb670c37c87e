"""CPython node keys: deterministic ES256 that agrees with the RFC 6979 vector and the board."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterchain.errors import SignatureError
from meterchain.keys import PrivateKey, PublicKey
from meterchain.mqtt_auth import check_name

RFC6979_SECRET = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721


def test_rfc6979_sample_vector() -> None:
    sig = PrivateKey.from_secret(RFC6979_SECRET).sign(b"sample")
    assert sig.hex().upper() == (
        "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716"
        "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"
    )


def test_sign_verify_and_reject(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "node.pem"
    key.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = PrivateKey.load(path)
    sig = loaded.sign(b"round 7")
    pub = PublicKey.from_point(key.public_key().point)
    assert pub.verify(sig, b"round 7")
    assert not pub.verify(sig, b"round 8")
    assert not pub.verify(sig[:63], b"round 7")
    assert not pub.verify(bytes(64), b"round 7")


def test_bad_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="65-byte uncompressed"):
        PublicKey.from_point(b"\x04" + bytes(10))
    with pytest.raises(SignatureError, match="not a point on P-256"):
        PublicKey.from_point(b"\x04" + bytes(64))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        PrivateKey.load(bad)


@pytest.mark.parametrize("name", ["m1\n", "a/b", "+", "#", "", "x" * 65, "a b"])
def test_names_that_could_escape_a_topic_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64 characters"):
        check_name("meter id", name)
