"""Consensus membership and quorum certificates, shared by SDBFT rounds and ledger blocks.

The regulator signs a `Membership`: the market's ordered list of consensus
nodes and their P-256 keys (M9/M10). A `QuorumCertificate` is more than n/2
distinct members' signatures over one canonical statement: a CBOR array that
starts with a type tag and names the market, e.g. ["vote", market, round,
view, proposal_hash] or ["block", market, height, header_hash]. Both the
consensus state machine and ledger verification check certificates here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterchain import codec
from meterchain.errors import ConfigError, MeterChainError, SignatureError
from meterchain.keys import PrivateKey, PublicKey
from meterchain.mqtt_auth import check_name


class QuorumError(MeterChainError):
    """A membership list or quorum certificate does not verify; the message says why."""


@dataclass(frozen=True)
class Member:
    node_id: str
    public_key: PublicKey


@dataclass(frozen=True)
class Membership:
    """The pre-elected consensus nodes of a market, in primary-rotation order."""

    market: str
    epoch: int
    members: tuple[Member, ...]
    regulator_signature: bytes = b""

    def __post_init__(self) -> None:
        if not self.members:
            raise QuorumError("membership has no members")
        ids = [m.node_id for m in self.members]
        if len(set(ids)) != len(ids):
            raise QuorumError(f"membership lists a node twice: {sorted(ids)}")
        points = [m.public_key.point for m in self.members]
        if len(set(points)) != len(points):
            raise QuorumError("two members share one public key")

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def quorum(self) -> int:
        """More than n/2 signatures."""
        return self.n // 2 + 1

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    def key_of(self, node_id: str) -> PublicKey | None:
        for member in self.members:
            if member.node_id == node_id:
                return member.public_key
        return None

    def primary(self, index: int) -> str:
        """Node id of the primary for rotation index k (k mod n)."""
        return self.members[index % self.n].node_id

    def statement(self) -> bytes:
        """Canonical bytes the regulator signs."""
        return codec.encode(
            [
                "membership",
                self.market,
                self.epoch,
                [[m.node_id, m.public_key.point] for m in self.members],
            ]
        )

    def signed_by(self, regulator: PrivateKey) -> Membership:
        return Membership(self.market, self.epoch, self.members, regulator.sign(self.statement()))

    def verify(self, regulator: PublicKey) -> None:
        if not regulator.verify(self.regulator_signature, self.statement()):
            raise QuorumError(
                f"membership of market {self.market!r} epoch {self.epoch}: "
                "regulator signature does not verify"
            )

    def to_toml(self) -> str:
        lines = [
            f'market = "{self.market}"',
            f"epoch = {self.epoch}",
            f'regulator_signature = "{self.regulator_signature.hex()}"',
            "",
        ]
        for m in self.members:
            lines += [
                "[[node]]",
                f'id = "{m.node_id}"',
                f'public_key = "{m.public_key.point.hex()}"',
                "",
            ]
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | Path) -> Membership:
        """Read a membership file: market, epoch, regulator_signature, [[node]] id/public_key."""
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(str(path), None, f"not UTF-8 text: {exc.reason}") from exc
        except OSError as exc:
            raise ConfigError(str(path), None, f"cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), None, f"not valid TOML: {exc}") from exc
        return cls.from_dict(doc, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, source: str = "<membership>") -> Membership:
        for key in ("market", "epoch", "node"):
            if key not in doc:
                raise ConfigError(source, key, "missing")
        if not isinstance(doc["market"], str):
            raise ConfigError(source, "market", "must be a string")
        if not isinstance(doc["epoch"], int) or doc["epoch"] < 0:
            raise ConfigError(source, "epoch", "must be a non-negative integer")
        nodes = doc["node"]
        if not isinstance(nodes, list) or not nodes:
            raise ConfigError(source, "node", "must be a non-empty list of [[node]] tables")
        members = []
        for i, entry in enumerate(nodes):
            where = f"node[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(source, where, "must be a table")
            unknown = set(entry) - {"id", "public_key"}
            if unknown:
                raise ConfigError(source, f"{where}.{sorted(unknown)[0]}", "unknown key")
            for key in ("id", "public_key"):
                if not isinstance(entry.get(key), str):
                    raise ConfigError(source, f"{where}.{key}", "missing or not a string")
            try:
                check_name("node id", entry["id"])
            except ValueError as exc:
                raise ConfigError(source, f"{where}.id", str(exc)) from exc
            try:
                key = PublicKey.from_hex(entry["public_key"])
            except SignatureError as exc:
                raise ConfigError(source, f"{where}.public_key", str(exc)) from exc
            members.append(Member(entry["id"], key))
        sig_hex = doc.get("regulator_signature", "")
        try:
            signature = bytes.fromhex(sig_hex) if isinstance(sig_hex, str) else None
        except ValueError:
            signature = None
        if signature is None:
            raise ConfigError(source, "regulator_signature", "must be hex")
        try:
            return cls(doc["market"], doc["epoch"], tuple(members), signature)
        except QuorumError as exc:
            raise ConfigError(source, "node", str(exc)) from exc


@dataclass(frozen=True)
class QuorumCertificate:
    """Signatures of distinct members over one canonical statement, sorted by node id."""

    statement: bytes
    signatures: tuple[tuple[str, bytes], ...]

    @classmethod
    def collect(
        cls, statement: bytes, signatures: Iterable[tuple[str, bytes]]
    ) -> QuorumCertificate:
        by_node: dict[str, bytes] = {}
        for node_id, sig in signatures:
            by_node.setdefault(node_id, sig)
        return cls(statement, tuple(sorted(by_node.items())))

    @property
    def signers(self) -> tuple[str, ...]:
        return tuple(node for node, _ in self.signatures)

    def fields(self) -> list[Any]:
        """The decoded statement array."""
        value = codec.decode(self.statement)
        if not isinstance(value, list) or not value or not isinstance(value[0], str):
            raise QuorumError("certificate statement is not a tagged CBOR array")
        return value

    def to_cbor(self) -> list[Any]:
        return [self.statement, [[node, sig] for node, sig in self.signatures]]

    @classmethod
    def from_cbor(cls, value: Any) -> QuorumCertificate:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise QuorumError("malformed quorum certificate: not [statement, signatures]")
        statement, sigs = value
        if not isinstance(statement, bytes):
            raise QuorumError("malformed quorum certificate: statement is not bytes")
        if not isinstance(sigs, list | tuple):
            raise QuorumError("malformed quorum certificate: signatures are not a list")
        for pair in sigs:
            if (
                not isinstance(pair, list | tuple)
                or len(pair) != 2
                or not isinstance(pair[0], str)
                or not isinstance(pair[1], bytes)
            ):
                raise QuorumError(
                    "malformed quorum certificate: each signature must be [node id, bytes]"
                )
        return cls(statement, tuple((node, sig) for node, sig in sigs))

    def verify(self, membership: Membership, *, expect: Sequence[Any] | None = None) -> None:
        """Raise QuorumError unless more than n/2 distinct members signed the statement.

        `expect`, when given, is the statement array the caller requires
        (compared after decoding, so a certificate for another round, view,
        height or market is refused).
        """
        fields = self.fields()
        if len(fields) < 2 or fields[1] != membership.market:
            raise QuorumError(f"certificate is for market {fields[1:2]}, not {membership.market!r}")
        if expect is not None and list(expect) != fields:
            raise QuorumError(f"certificate certifies {fields!r}, expected {list(expect)!r}")
        signers = [node for node, _ in self.signatures]
        if len(set(signers)) != len(signers) or signers != sorted(signers):
            raise QuorumError("certificate lists a signer twice or out of order")
        valid = 0
        for node_id, signature in self.signatures:
            key = membership.key_of(node_id)
            if key is None:
                raise QuorumError(f"certificate signer {node_id!r} is not a member")
            if not key.verify(signature, self.statement):
                raise QuorumError(f"signature of {node_id!r} on {fields[0]!r} does not verify")
            valid += 1
        if valid < membership.quorum:
            raise QuorumError(
                f"{valid} signature(s) on {fields[0]!r}; more than n/2 = {membership.quorum} "
                f"of {membership.n} needed"
            )
