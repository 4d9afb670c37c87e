"""CPython node keys: deterministic ES256 that agrees with the RFC 6979 vector and the board."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meterchain.errors import SignatureError
from meterchain.keys import PrivateKey, PublicKey, write_private_file
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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_saved_key_is_owner_only_whatever_was_there(tmp_path: Path) -> None:
    key = PrivateKey.from_secret(7)
    path = tmp_path / "node.key"
    path.write_text("old")
    path.chmod(0o644)
    key.save(path)
    assert _mode(path) == 0o600
    assert PrivateKey.load(path).secret == 7
    # a symlink planted at the key's path is replaced, never written through
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o644)
    link = tmp_path / "link.key"
    link.symlink_to(victim)
    key.save(link)
    assert victim.read_text() == "precious" and _mode(victim) == 0o644
    assert not link.is_symlink() and _mode(link) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_write_private_file_can_keep_the_access_a_service_needs(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    write_private_file(path, b"new\n", keep_access=True)
    assert _mode(path) == 0o600  # a new file: owner only
    path.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # e.g. the broker's user and group
    write_private_file(path, b"newer\n", keep_access=True)
    assert path.read_bytes() == b"newer\n" and _mode(path) == 0o640
    if os.geteuid() == 0:
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
