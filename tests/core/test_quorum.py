"""Membership lists and quorum certificates: more than n/2 distinct valid member signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterchain import codec
from meterchain.errors import ConfigError
from meterchain.keys import PrivateKey
from meterchain.quorum import Member, Membership, QuorumCertificate, QuorumError


def _members(n: int) -> tuple[dict[str, PrivateKey], Membership]:
    keys = {f"node{i}": PrivateKey.from_secret(1000 + i) for i in range(n)}
    members = tuple(Member(node, key.public_key()) for node, key in keys.items())
    return keys, Membership("m1", 1, members)


def _qc(keys: dict[str, PrivateKey], signers: list[str], statement: bytes) -> QuorumCertificate:
    return QuorumCertificate.collect(statement, [(s, keys[s].sign(statement)) for s in signers])


def test_quorum_is_more_than_half() -> None:
    assert [_members(n)[1].quorum for n in (3, 4, 5, 7)] == [2, 3, 3, 4]


def test_certificate_with_majority_verifies_and_minority_does_not() -> None:
    keys, membership = _members(5)
    statement = codec.encode(["vote", "m1", 7, 0, b"\x01" * 32])
    _qc(keys, ["node0", "node2", "node4"], statement).verify(membership)
    with pytest.raises(QuorumError, match="2 signature\\(s\\) on 'vote'; more than n/2 = 3 of 5"):
        _qc(keys, ["node0", "node2"], statement).verify(membership)


def test_duplicate_signer_counts_once() -> None:
    keys, membership = _members(5)
    statement = codec.encode(["vote", "m1", 7, 0, b"\x01" * 32])
    sig = keys["node0"].sign(statement)
    qc = QuorumCertificate.collect(
        statement, [("node0", sig)] * 3 + [("node1", keys["node1"].sign(statement))]
    )
    assert qc.signers == ("node0", "node1")
    with pytest.raises(QuorumError, match="more than n/2"):
        qc.verify(membership)


def test_forged_signature_and_outsider_are_named() -> None:
    keys, membership = _members(3)
    statement = codec.encode(["block", "m1", 4, b"\x02" * 32])
    other = codec.encode(["block", "m1", 5, b"\x02" * 32])
    bad = QuorumCertificate.collect(
        statement, [("node0", keys["node0"].sign(statement)), ("node1", keys["node1"].sign(other))]
    )
    with pytest.raises(QuorumError, match="signature of 'node1' on 'block' does not verify"):
        bad.verify(membership)
    outsider = PrivateKey.from_secret(99)
    qc = QuorumCertificate.collect(
        statement, [("node0", keys["node0"].sign(statement)), ("mallory", outsider.sign(statement))]
    )
    with pytest.raises(QuorumError, match="'mallory' is not a member"):
        qc.verify(membership)


def test_expected_statement_and_market_are_enforced() -> None:
    keys, membership = _members(3)
    statement = codec.encode(["vote", "m1", 7, 0, b"\x01" * 32])
    qc = _qc(keys, ["node0", "node1"], statement)
    qc.verify(membership, expect=["vote", "m1", 7, 0, b"\x01" * 32])
    with pytest.raises(QuorumError, match="expected"):
        qc.verify(membership, expect=["vote", "m1", 8, 0, b"\x01" * 32])
    foreign = codec.encode(["vote", "m2", 7, 0, b"\x01" * 32])
    with pytest.raises(QuorumError, match="not 'm1'"):
        _qc(keys, ["node0", "node1"], foreign).verify(membership)


def test_certificate_cbor_round_trip() -> None:
    keys, membership = _members(3)
    statement = codec.encode(["vote", "m1", 1, 0, b"\x00" * 32])
    qc = _qc(keys, ["node2", "node0"], statement)
    again = QuorumCertificate.from_cbor(codec.decode(codec.encode(qc.to_cbor())))
    assert again == qc
    again.verify(membership)
    with pytest.raises(QuorumError, match="malformed"):
        QuorumCertificate.from_cbor([b"x"])


def test_membership_file_round_trip_and_regulator_signature(tmp_path: Path) -> None:
    _, membership = _members(4)
    regulator = PrivateKey.from_secret(4242)
    signed = membership.signed_by(regulator)
    path = tmp_path / "membership.toml"
    path.write_text(signed.to_toml())
    loaded = Membership.load(path)
    assert loaded == signed
    loaded.verify(regulator.public_key())
    with pytest.raises(QuorumError, match="regulator signature does not verify"):
        loaded.verify(PrivateKey.from_secret(4243).public_key())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('epoch = 1\n[[node]]\nid = "a"\npublic_key = "04"\n', "market: missing"),
        (
            'market = "m"\nepoch = -1\n[[node]]\nid = "a"\npublic_key = "04"\n',
            "epoch: must be a non-negative",
        ),
        (
            'market = "m"\nepoch = 1\n[[node]]\nid = "a"\npublic_key = "zz"\n',
            "node\\[0\\].public_key",
        ),
        ('market = "m"\nepoch = 1\n[[node]]\nid = "a b"\npublic_key = "04"\n', "node\\[0\\].id"),
        (
            'market = "m"\nepoch = 1\n[[node]]\nid = "a"\nkey = "04"\n',
            "node\\[0\\].key: unknown key",
        ),
        ('market = "m"\nepoch = 1\nnode = [\n', "not valid TOML"),
    ],
)
def test_bad_membership_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "membership.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Membership.load(path)


def test_non_utf8_membership_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "membership.toml"
    path.write_bytes(b'market = "m\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        Membership.load(path)


def test_duplicate_member_is_refused() -> None:
    key = PrivateKey.from_secret(5).public_key()
    with pytest.raises(QuorumError, match="twice"):
        Membership("m1", 1, (Member("a", key), Member("a", PrivateKey.from_secret(6).public_key())))
