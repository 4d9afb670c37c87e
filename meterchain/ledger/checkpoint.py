"""Signed checkpoints: the replayed ledger state at a height, hashed and certified by > n/2 members.

A checkpoint holds the height, that block's header hash, the canonical CBOR of
the `LedgerState` after that block (`state_bytes`), its SHA-256 digest and a
`QuorumCertificate` over ["checkpoint", market, height, block hash, digest]
signed by more than n/2 of the members in force after that block. `ledger
verify` then checks the header hash links and transaction Merkle roots up to the
checkpoint, the certificate and the digest, and replays rules and signatures only
after it. Each member signs (`sign_checkpoint`) the state it replayed itself;
`combine` turns enough signatures into a stored checkpoint.

On a site this runs every `interval` blocks (`is_due`): the aggregator proposes
the statement of its state after such a block, each consensus member compares
it with its own state (`Attestation`) and answers with a signed
`CheckpointVote` or, if the digests differ, with nothing, and the aggregator's
`Collector` combines the votes that match once more than n/2 members signed.

The state encoding is a tagged tree: every container is a two-item array
[tag, payload] and scalars stand for themselves; maps and sets are sorted by
the canonical bytes of their keys, so one state has exactly one encoding.
Decoding builds only the record types listed in `_RECORDS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.keys import PrivateKey, PublicKey
from meterchain.ledger import state as st
from meterchain.market import certificates as certs
from meterchain.market import monitoring as mon
from meterchain.quorum import Member, Membership, QuorumCertificate, QuorumError

# Record types a serialised state may contain, by name.
_RECORDS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        st.LedgerState, st.Participant, st.MeterEntry, st.Order, st.TxRecord, st.Clearing,
        certs.CertificateRegistry, certs.RenewableMeter, certs.MeterAccount, certs.Certificate,
        certs.ReadingShare, mon.TradeRow, mon.CapacityRow, Membership, Member,
    )
}  # fmt: skip
# Largest serialised state one checkpoint may hold (a year of a 100-microgrid market fits).
MAX_STATE_BYTES = 512 << 20
# Blocks between checkpoints on a site (a day of hourly blocks); set per market in the configs.
DEFAULT_INTERVAL_BLOCKS = 24


class CheckpointError(MeterChainError):
    """A checkpoint is malformed, does not match its state or lacks a valid quorum."""


@dataclass(frozen=True)
class Checkpoint:
    height: int
    block_hash: bytes
    digest: bytes
    state: bytes  # canonical CBOR of the state after block `height`
    qc: QuorumCertificate


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str | bytes):
        return value
    if isinstance(value, PublicKey):
        return ["K", value.point]
    if isinstance(value, st.History):
        return ["H", _pairs(value)]
    if isinstance(value, Mapping):
        return ["D", _pairs(value)]
    if isinstance(value, frozenset | set):
        items = sorted((_encode(v) for v in value), key=codec.encode)
        return ["F" if isinstance(value, frozenset) else "S", items]
    if isinstance(value, tuple):
        return ["T", [_encode(v) for v in value]]
    if isinstance(value, list):
        return ["L", [_encode(v) for v in value]]
    if dataclasses.is_dataclass(value) and type(value).__name__ in _RECORDS:
        names = [f.name for f in dataclasses.fields(value) if f.name != "_registry"]
        return ["R", [type(value).__name__, [[n, _encode(getattr(value, n))] for n in names]]]
    raise CheckpointError(f"cannot checkpoint a {type(value).__name__}")


def _pairs(mapping: Mapping[Any, Any]) -> list[list[Any]]:
    pairs = [[_encode(k), _encode(v)] for k, v in mapping.items()]
    pairs.sort(key=lambda kv: codec.encode(kv[0]))
    return pairs


def _decode(value: Any) -> Any:
    if not isinstance(value, list):
        if value is None or isinstance(value, bool | int | str | bytes):
            return value
        raise CheckpointError(f"state holds a {type(value).__name__}")
    if len(value) != 2 or not isinstance(value[0], str):
        raise CheckpointError("state node is not [tag, payload]")
    tag, payload = value
    if tag == "K":
        try:
            return PublicKey.from_point(payload)
        except (MeterChainError, TypeError, ValueError) as exc:
            raise CheckpointError(f"state key: {exc}") from exc
    if not isinstance(payload, list):
        raise CheckpointError(f"state node {tag!r} has no item list")
    if tag in ("H", "D"):
        items = {_key(_decode(k)): _decode(v) for k, v in _check_pairs(payload)}
        return st.History(items) if tag == "H" else items
    if tag in ("F", "S"):
        members = [_key(_decode(v)) for v in payload]
        return frozenset(members) if tag == "F" else set(members)
    if tag == "T":
        return tuple(_decode(v) for v in payload)
    if tag == "L":
        return [_decode(v) for v in payload]
    if tag == "R" and len(payload) == 2 and payload[0] in _RECORDS:
        cls = _RECORDS[payload[0]]
        fields = dict((n, _decode(v)) for n, v in _check_pairs(payload[1]))
        try:
            return cls(**fields)
        except (TypeError, ValueError, MeterChainError) as exc:
            raise CheckpointError(f"state record {payload[0]}: {exc}") from exc
    raise CheckpointError(f"state node has unknown tag {tag!r}")


def _check_pairs(items: Any) -> list[tuple[Any, Any]]:
    if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise CheckpointError("state map is not a list of [key, value] pairs")
    return [(p[0], p[1]) for p in items]


def _key(value: Any) -> Any:
    try:
        hash(value)
    except TypeError as exc:
        raise CheckpointError(f"state map key is not hashable: {exc}") from exc
    return value


def state_bytes(state: st.LedgerState) -> bytes:
    """The one canonical encoding of a state between blocks."""
    if state.pending_membership is not None or any(state.pending_forfeits.values()):
        raise CheckpointError("a state can only be checkpointed between blocks")
    return codec.encode(_encode(state))


def state_from_bytes(data: bytes) -> st.LedgerState:
    """The state `state_bytes` encoded (raises CheckpointError on anything else)."""
    try:
        value = codec.decode(data, max_bytes=MAX_STATE_BYTES, max_items=1 << 28, max_depth=128)
    except CodecError as exc:
        raise CheckpointError(f"state bytes: {exc}") from exc
    state = _ledger_state(value)
    if codec.encode(_encode(state)) != data:
        raise CheckpointError("state bytes are not the canonical encoding of their state")
    return state


def _ledger_state(value: Any) -> st.LedgerState:
    state = _decode(value)
    if not isinstance(state, st.LedgerState):
        raise CheckpointError("state bytes do not hold a ledger state")
    return state


def _vouched_state(data: bytes) -> st.LedgerState:
    """The state of bytes whose SHA-256 more than n/2 members signed (see `check`).

    Each signer hashed exactly `state_bytes` of its own state, so bytes that match
    the signed digest are canonical: the strict decode's scan and the two
    re-encodings of `state_from_bytes` would only repeat what the signatures
    vouch for, and cost most of an incremental verify of a long ledger.
    """
    try:
        value = cbor2.loads(data, allow_duplicate_keys=False, allow_indefinite=False)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CheckpointError(f"state bytes: {exc}") from exc
    return _ledger_state(value)


def statement(market: str, height: int, block_hash: bytes, digest: bytes) -> bytes:
    """What members sign for a checkpoint."""
    return codec.encode(["checkpoint", market, height, block_hash, digest])


def sign_checkpoint(
    state: st.LedgerState, block_hash: bytes, node_id: str, key: PrivateKey
) -> tuple[str, bytes]:
    """One member's signature over the checkpoint of `state` (replayed by that member)."""
    return node_id, key.sign(Attestation.of(state, block_hash).statement())


def combine(
    state: st.LedgerState, block_hash: bytes, signatures: list[tuple[str, bytes]]
) -> Checkpoint:
    """A checkpoint of `state` from members' signatures; refused without a valid quorum."""
    data = state_bytes(state)
    digest = hashlib.sha256(data).digest()
    qc = QuorumCertificate.collect(
        statement(state.market, state.height, block_hash, digest), signatures
    )
    checkpoint = Checkpoint(state.height, block_hash, digest, data, qc)
    check(checkpoint, state.market, state.membership)
    return checkpoint


def check(checkpoint: Checkpoint, market: str, membership: Membership) -> st.LedgerState:
    """The checkpoint's state, if its certificate and digest hold; CheckpointError otherwise.

    `membership` is the one in force after block `checkpoint.height`, as the
    verifier derived it from the regulator-signed genesis and membership records.
    """
    cp = checkpoint
    expect = ["checkpoint", market, cp.height, cp.block_hash, cp.digest]
    try:
        cp.qc.verify(membership, expect=expect)
    except (QuorumError, CodecError) as exc:
        raise CheckpointError(f"checkpoint at height {cp.height}: certificate: {exc}") from exc
    if hashlib.sha256(cp.state).digest() != cp.digest:
        raise CheckpointError(f"checkpoint at height {cp.height}: state does not match its digest")
    state = _vouched_state(cp.state)
    if (state.market, state.height) != (market, cp.height):
        raise CheckpointError(
            f"checkpoint at height {cp.height}: state is of {state.market!r} at {state.height}"
        )
    if state.membership != membership:
        raise CheckpointError(
            f"checkpoint at height {cp.height}: state names another membership than the ledger's"
        )
    return state


def to_cbor(checkpoint: Checkpoint) -> list[Any]:
    cp = checkpoint
    return [cp.height, cp.block_hash, cp.digest, cp.state, cp.qc.to_cbor()]


def from_cbor(value: Any) -> Checkpoint:
    if not isinstance(value, list) or len(value) != 5:
        raise CheckpointError("malformed checkpoint: not [height, hash, digest, state, qc]")
    height, block_hash, digest, data, qc = value
    if type(height) is not int or height < 0:
        raise CheckpointError("malformed checkpoint: height is not a natural number")
    if not all(isinstance(b, bytes) for b in (block_hash, digest, data)):
        raise CheckpointError("malformed checkpoint: hash, digest and state must be bytes")
    try:
        return Checkpoint(height, block_hash, digest, data, QuorumCertificate.from_cbor(qc))
    except QuorumError as exc:
        raise CheckpointError(f"malformed checkpoint: {exc}") from exc


def is_due(height: int, interval: int) -> bool:
    """True when the block at `height` is one a site checkpoints (every `interval` blocks)."""
    return height > 0 and height % interval == 0


# --- checkpoints on a site: the aggregator proposes, members sign, the aggregator combines ---


@dataclass(frozen=True)
class Attestation:
    """A member's own view of a checkpoint: its state after block `height`, hashed."""

    market: str
    height: int
    block_hash: bytes
    digest: bytes

    @classmethod
    def of(cls, state: st.LedgerState, block_hash: bytes) -> Attestation:
        return cls.of_bytes(state.market, state.height, block_hash, state_bytes(state))

    @classmethod
    def of_bytes(cls, market: str, height: int, block_hash: bytes, data: bytes) -> Attestation:
        """The attestation of a state already encoded by `state_bytes`."""
        return cls(market, height, block_hash, hashlib.sha256(data).digest())

    def statement(self) -> bytes:
        return statement(self.market, self.height, self.block_hash, self.digest)


def _attestation(fields: list) -> Attestation | None:
    """[market, height, hash, digest] as an Attestation, or None if they are not that."""
    market, height, block_hash, digest = fields
    if (
        isinstance(market, str)
        and type(height) is int
        and all(isinstance(v, bytes) and len(v) == 32 for v in (block_hash, digest))
    ):
        return Attestation(market, height, block_hash, digest)
    return None


def parse_proposal(data: bytes) -> Attestation:
    """The aggregator's proposed checkpoint: exactly a `statement`."""
    try:
        value = codec.decode(data)
    except CodecError as exc:
        raise CheckpointError(f"malformed checkpoint proposal: {exc}") from exc
    proposed = (
        _attestation(value[1:])
        if isinstance(value, list) and len(value) == 5 and value[0] == "checkpoint"
        else None
    )
    if proposed is None:
        raise CheckpointError('malformed checkpoint proposal: not ["checkpoint", market, '
                              "height, hash, digest]")  # fmt: skip
    return proposed


@dataclass(frozen=True)
class CheckpointVote:
    """A member's signature over a checkpoint statement, as it travels to the aggregator."""

    node_id: str
    attestation: Attestation
    signature: bytes

    def encode(self) -> bytes:
        a = self.attestation
        return codec.encode(["checkpoint-vote", a.market, a.height, a.block_hash, a.digest,
                             self.node_id, self.signature])  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> CheckpointVote:
        try:
            value = codec.decode(data)
        except CodecError as exc:
            raise CheckpointError(f"malformed checkpoint vote: {exc}") from exc
        attestation = (
            _attestation(value[1:5])
            if isinstance(value, list) and len(value) == 7 and value[0] == "checkpoint-vote"
            else None
        )
        if attestation is None or not (isinstance(value[5], str) and isinstance(value[6], bytes)):
            raise CheckpointError("malformed checkpoint vote")
        return cls(value[5], attestation, value[6])


def attest(
    mine: Attestation | None, proposed: Attestation, node_id: str, key: PrivateKey
) -> CheckpointVote:
    """A member's vote for `proposed` if it is exactly its own view `mine`; CheckpointError
    saying why not otherwise (the member then does not sign)."""
    if mine is None or (mine.market, mine.height) != (proposed.market, proposed.height):
        raise CheckpointError(
            f"checkpoint at height {proposed.height}: I hold no state of mine at that height"
        )
    if mine.block_hash != proposed.block_hash:
        raise CheckpointError(
            f"checkpoint at height {proposed.height}: proposed block {proposed.block_hash.hex()}"
            f" is not mine {mine.block_hash.hex()}"
        )
    if mine.digest != proposed.digest:
        raise CheckpointError(
            f"checkpoint at height {proposed.height}: proposed state digest "
            f"{proposed.digest.hex()} is not mine {mine.digest.hex()}"
        )
    return CheckpointVote(node_id, mine, key.sign(mine.statement()))


@dataclass
class _Open:
    attestation: Attestation
    state: bytes  # `state_bytes` of the state the attestation hashes
    membership: Membership  # in force after that block: who may sign
    signatures: dict[str, bytes]


class Collector:
    """The aggregator's side: propose checkpoints, check each member's vote, combine.

    Pure (no I/O): `propose` returns the statement to publish, `add` a `Checkpoint`
    to store once more than n/2 members of the membership in force after that block
    signed the very statement proposed; a vote for anything else is refused with
    a CheckpointError naming why. At most `keep` checkpoints wait for votes.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._open: dict[int, _Open] = {}

    def propose(self, state: st.LedgerState, block_hash: bytes) -> bytes:
        """Open the checkpoint of `state` (the state after block `state.height`).

        The state is encoded now: what is stored later is exactly what was proposed.
        """
        data = state_bytes(state)
        attestation = Attestation.of_bytes(state.market, state.height, block_hash, data)
        self._open[state.height] = _Open(attestation, data, state.membership, {})
        for height in sorted(self._open)[: -self.keep]:
            del self._open[height]
        return attestation.statement()

    def add(self, sender: str, data: bytes) -> Checkpoint | None:
        """Take one member's vote; the combined checkpoint once it has a quorum."""
        vote = CheckpointVote.decode(data)
        got = vote.attestation
        if vote.node_id != sender:
            raise CheckpointError(f"vote names {vote.node_id!r} but came from {sender!r}")
        pending = self._open.get(got.height)
        if pending is None:
            raise CheckpointError(f"no checkpoint open at height {got.height}")
        want = pending.attestation
        if got != want:
            raise CheckpointError(
                f"{sender} signed checkpoint {got.height} with block {got.block_hash.hex()[:16]} "
                f"and state digest {got.digest.hex()}, the ledger's are "
                f"{want.block_hash.hex()[:16]} and {want.digest.hex()}: not counted"
            )
        key = pending.membership.key_of(sender)
        if key is None:
            raise CheckpointError(f"{sender} is not a member at height {got.height}")
        if not key.verify(vote.signature, want.statement()):
            raise CheckpointError(f"{sender}'s signature over checkpoint {got.height} is invalid")
        pending.signatures[sender] = vote.signature
        if len(pending.signatures) < pending.membership.quorum:
            return None
        del self._open[got.height]
        qc = QuorumCertificate.collect(want.statement(), sorted(pending.signatures.items()))
        checkpoint = Checkpoint(want.height, want.block_hash, want.digest, pending.state, qc)
        check(checkpoint, want.market, pending.membership)
        return checkpoint
