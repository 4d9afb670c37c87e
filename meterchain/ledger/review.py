"""Block proposals and their review: consensus agents re-execute a block, then sign or refuse.

A `Proposal` is an unsigned block plus the readings of its reading batches, in
one canonical CBOR message the aggregator sends to the consensus agents.
`review_block` is a pure function an agent calls with its own view of the
ledger (`ReviewContext`): it applies the whole block to a copy of the agent's
state with every check `ledger verify` makes (signatures, Merkle roots,
re-executed settlement and contracts) and returns a `Vote` (the agent's
signature over ["block", market, height, header hash]) or a `Refusal` naming the
first problem. `apply_block` is the same re-execution for the block former.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.keys import PrivateKey, PublicKey
from meterchain.ledger import checkpoint as cp
from meterchain.ledger.block import (
    GENESIS_PREV,
    Block,
    BlockError,
    Header,
    block_statement,
    body_root,
)
from meterchain.ledger.readings import LedgerReading, ReadingFormatError, parse
from meterchain.ledger.state import LedgerState, ReadingSource, TxContext
from meterchain.ledger.transactions import Tx, TxError
from meterchain.quorum import QuorumCertificate, QuorumError

# A reviewer refuses a block stamped further than this ahead of its own clock.
MAX_CLOCK_AHEAD_S = 300


class ProposalError(MeterChainError):
    """A proposal message is malformed."""


@dataclass(frozen=True)
class Proposal:
    block: Block
    readings: Mapping[int, tuple[LedgerReading, ...]]

    def encode(self) -> bytes:
        return codec.encode(
            [
                "proposal",
                self.block.header.encode(),
                [tx.raw for tx in self.block.txs],
                {idx: [r.cose for r in batch] for idx, batch in self.readings.items()},
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> Proposal:
        try:
            value = codec.decode(data)
            if not isinstance(value, list) or len(value) != 4:
                raise ProposalError('not a ["proposal", header, txs, readings] message')
            tag, header_raw, tx_raws, batches = value
            if (
                tag != "proposal"
                or not isinstance(tx_raws, list)
                or not isinstance(batches, dict)
                or not all(isinstance(raw, bytes) for raw in tx_raws)
            ):
                raise ProposalError('not a ["proposal", header, txs, readings] message')
            for idx, batch in batches.items():
                if (
                    type(idx) is not int
                    or not isinstance(batch, list)
                    or not all(isinstance(cose, bytes) for cose in batch)
                ):
                    raise ProposalError("reading batches must map a tx index to signed readings")
            header = Header.decode(header_raw)
            txs = tuple(Tx.decode(raw) for raw in tx_raws)
            readings = {idx: tuple(parse(cose) for cose in batch) for idx, batch in batches.items()}
        except (CodecError, BlockError, TxError, ReadingFormatError) as exc:
            raise ProposalError(f"malformed proposal: {exc}") from exc
        return cls(Block(header, txs), readings)


@dataclass(frozen=True)
class Vote:
    node_id: str
    signature: bytes


@dataclass(frozen=True)
class Refusal:
    reason: str


@dataclass
class ReviewContext:
    """A reviewer's own view: its ledger state after its head, its key and its clock.

    `state` is None before genesis; a genesis proposal is then checked against
    `regulator`, the regulator key the reviewer trusts.
    """

    state: LedgerState | None
    head: tuple[int, bytes] | None  # height and header hash of its last committed block
    node_id: str
    key: PrivateKey
    readings: ReadingSource
    now: int
    regulator: PublicKey | None = None


def rows_of(batch: Sequence[LedgerReading]) -> list[tuple[int, tuple]]:
    return [(pos, r.row()) for pos, r in enumerate(batch)]


def genesis_state(
    block: Block, source: ReadingSource, regulator: PublicKey | None = None
) -> LedgerState:
    """The state after genesis block `block` (its first transaction founds the market)."""
    header = block.header
    if header.height != 0 or header.prev != GENESIS_PREV:
        raise BlockError("a genesis block has height 0 and no previous block")
    if body_root(block.txs) != header.root:
        raise BlockError("body Merkle root does not match the transactions")
    if not block.txs:
        raise BlockError("genesis block has no transactions")
    try:
        state = LedgerState.from_genesis(block.txs[0], header.market)
    except TxError as exc:
        raise TxError(f"tx 0 (genesis): {exc}") from exc
    if regulator is not None and state.regulator.point != regulator.point:
        raise TxError("tx 0 (genesis): names another regulator key than the one trusted here")
    state.begin_block(0, header.time)
    for idx, tx in enumerate(block.txs[1:], start=1):
        if tx.kind == "readings":
            raise BlockError("the genesis block carries no readings")
        try:
            state.apply(tx, TxContext(0, idx, header.time, (), True, source))
        except TxError as exc:
            raise TxError(f"tx {idx} ({tx.kind}): {exc}") from exc
    state.end_block()
    return state


def apply_block(
    state: LedgerState,
    block: Block,
    readings: Mapping[int, Sequence[LedgerReading]],
    source: ReadingSource,
    *,
    signatures: bool = True,
) -> int:
    """Apply `block` to `state` with every ledger check; returns reading signatures checked.

    Raises TxError (or BlockError for the frame) naming the first problem; `state`
    is then partly updated, so callers apply to a copy.
    """
    header = block.header
    if header.market != state.market:
        raise BlockError(f"block is for market {header.market!r}, not {state.market!r}")
    if header.height != state.height + 1:
        raise BlockError(f"block height {header.height} does not follow {state.height}")
    if body_root(block.txs) != header.root:
        raise BlockError("body Merkle root does not match the transactions")
    for idx in readings:
        if not 0 <= idx < len(block.txs) or block.txs[idx].kind != "readings":
            raise BlockError(f"readings given for tx {idx}, which is not a reading batch")
    state.begin_block(header.height, header.time)
    checked = 0
    for idx, tx in enumerate(block.txs):
        rows = rows_of(readings.get(idx, ())) if tx.kind == "readings" else ()
        ctx = TxContext(header.height, idx, header.time, rows, signatures, source)
        try:
            checked += state.apply(tx, ctx)
        except TxError as exc:
            label = "reading batch" if tx.kind == "readings" else f"{tx.kind}"
            raise TxError(f"tx {idx} ({label}): {exc}") from exc
    state.end_block()
    return checked


def accept_block(
    state: LedgerState | None,
    block: Block,
    readings: Mapping[int, Sequence[LedgerReading]],
    source: ReadingSource,
    *,
    signatures: bool = True,
    regulator: PublicKey | None = None,
) -> LedgerState:
    """Check a sealed block against `state` (None: genesis) with its QC; the state after it.

    Raises BlockError or TxError; `state` itself is never changed, so a refused
    block leaves the caller exactly where it was.
    """
    header = block.header
    if block.qc is None:
        raise BlockError(f"block {header.height} has no quorum certificate")
    if state is None:
        after = genesis_state(block, source, regulator)
        membership = after.membership
    else:
        after = state.copy()
        membership = state.membership
    try:
        block.qc.verify(
            membership, expect=block_statement(header.market, header.height, block.hash)
        )
    except QuorumError as exc:
        raise BlockError(f"block {header.height}: quorum certificate: {exc}") from exc
    if state is not None:
        apply_block(after, block, readings, source, signatures=signatures)
    return after


def review_block(proposal: Proposal, ctx: ReviewContext) -> Vote | Refusal:
    """Re-execute a proposed block on a copy of the reviewer's state; sign it or refuse."""
    block = proposal.block
    header = block.header
    expected_prev = ctx.head[1] if ctx.head is not None else GENESIS_PREV
    expected_height = ctx.head[0] + 1 if ctx.head is not None else 0
    if (header.height, header.prev) != (expected_height, expected_prev):
        return Refusal(
            f"block {header.height} does not extend my head (height {expected_height - 1})"
        )
    if header.time > ctx.now + MAX_CLOCK_AHEAD_S:
        return Refusal(f"block time {header.time} is ahead of my clock {ctx.now}")
    for idx, batch in proposal.readings.items():
        for r in batch:
            if ctx.readings.meter_readings(r.meter_id, r.seq - 1, r.seq):
                return Refusal(f"block {header.height}: tx {idx}: reading {r.meter_id}:{r.seq} "
                               "is already committed")  # fmt: skip
    try:
        if ctx.state is None:
            membership = genesis_state(block, ctx.readings, ctx.regulator).membership
        else:
            membership = ctx.state.membership
            apply_block(ctx.state.copy(), block, proposal.readings, ctx.readings)
    except (TxError, BlockError) as exc:
        return Refusal(f"block {header.height}: {exc}")
    if membership.key_of(ctx.node_id) is None:
        return Refusal(f"{ctx.node_id} is not a consensus member")
    return Vote(ctx.node_id, ctx.key.sign(block.statement()))


# --- messages between the aggregator and the consensus agents --------------------------


def refusal_statement(market: str, height: int, header_hash: bytes, reason: str) -> bytes:
    return codec.encode(["block-refusal", market, height, header_hash, reason])


def reply_message(answer: Vote | Refusal, block: Block, node_id: str, key: PrivateKey) -> bytes:
    """A reviewer's signed answer to a proposal, for the aggregator."""
    h = block.header
    if isinstance(answer, Vote):
        return codec.encode(
            ["block-vote", h.market, h.height, block.hash, node_id, answer.signature]
        )
    signature = key.sign(refusal_statement(h.market, h.height, block.hash, answer.reason))
    return codec.encode(
        ["block-refusal", h.market, h.height, block.hash, node_id, answer.reason, signature]
    )


@dataclass(frozen=True)
class Reply:
    """A decoded answer: a vote (signature over the block statement) or a signed refusal."""

    kind: str  # "block-vote" or "block-refusal"
    market: str
    height: int
    header_hash: bytes
    node_id: str
    signature: bytes
    reason: str = ""


def parse_reply(data: bytes) -> Reply:
    try:
        value = codec.decode(data)
        if isinstance(value, list) and len(value) == 6 and value[0] == "block-vote":
            _, market, height, header_hash, node, sig = value
            reply = Reply("block-vote", market, height, header_hash, node, sig)
        elif isinstance(value, list) and len(value) == 7 and value[0] == "block-refusal":
            _, market, height, header_hash, node, reason, sig = value
            reply = Reply("block-refusal", market, height, header_hash, node, sig, reason)
        else:
            raise ProposalError("not a block-vote or block-refusal message")
    except CodecError as exc:
        raise ProposalError(f"malformed reply: {exc}") from exc
    types = (str, int, bytes, str, bytes, str)
    got = (reply.market, reply.height, reply.header_hash, reply.node_id, reply.signature,
           reply.reason)  # fmt: skip
    if not all(isinstance(v, t) for v, t in zip(got, types, strict=True)):
        raise ProposalError("malformed reply fields")
    return reply


def encode_committed(block: Block) -> bytes:
    """A committed block (header, transactions, QC) as the aggregator announces it."""
    if block.qc is None:
        raise BlockError("a committed block carries its quorum certificate")
    return codec.encode(["block", block.header.encode(), [t.raw for t in block.txs],
                         block.qc.to_cbor()])  # fmt: skip


def decode_committed(data: bytes) -> Block:
    try:
        tag, header_raw, tx_raws, qc = codec.decode(data)
        if tag != "block" or not isinstance(tx_raws, list):
            raise ProposalError("not a committed block message")
        return Block(
            Header.decode(header_raw),
            tuple(Tx.decode(raw) for raw in tx_raws),
            QuorumCertificate.from_cbor(qc),
        )
    except (CodecError, BlockError, TxError, QuorumError, TypeError, ValueError) as exc:
        raise ProposalError(f"malformed committed block: {exc}") from exc


class BlockReviewer:
    """A consensus node's part in block formation, over its own full copy of the ledger (M10).

    `review(proposal bytes)` answers with a signed vote or refusal message;
    `committed(block bytes)` applies a certified block the node reviewed and
    stores it, `sealed(block, readings)` one it did not review. After every
    `checkpoint_interval`-th block it keeps the digest of its own state, and
    `attest(proposal bytes)` signs the aggregator's checkpoint proposal only if
    it names that very state. The edge agent runs one of these next to its
    SDBFT node.
    """

    def __init__(
        self,
        store: Any,
        node_id: str,
        key: PrivateKey,
        *,
        regulator: PublicKey | None = None,
        checkpoint_interval: int = cp.DEFAULT_INTERVAL_BLOCKS,
    ) -> None:
        from meterchain.ledger.chain import StoreReadings, verify_store

        self.store = store
        self.node_id = node_id
        self.key = key
        self.regulator = regulator
        self.checkpoint_interval = checkpoint_interval
        self.source = StoreReadings(store)
        # Its own ledger was checked as it was written; a restart re-checks all but signatures.
        self.state, report = verify_store(store, signatures=False, regulator=regulator)
        self._proposals: dict[bytes, Proposal] = {}
        self.attestation: cp.Attestation | None = None  # of the last checkpoint height
        if self.state is not None:
            self._applied(report.head)

    def review(self, data: bytes, now: int) -> bytes:
        proposal = Proposal.decode(data)
        block = proposal.block
        if self.state is not None and block.header.market != self.state.market:
            raise ProposalError(f"proposal is for market {block.header.market!r}")
        ctx = ReviewContext(
            self.state, self.store.head(), self.node_id, self.key, self.source, now,
            self.regulator,
        )  # fmt: skip
        answer = review_block(proposal, ctx)
        if isinstance(answer, Vote):
            # Keep what was voted for: the certified block arrives without its readings.
            self._proposals = {
                h: p for h, p in self._proposals.items() if p.block.height >= block.height
            }
            self._proposals[block.hash] = proposal
        return reply_message(answer, block, self.node_id, self.key)

    def committed(self, data: bytes) -> int:
        """Apply and store a certified block; returns the new head height."""
        block = decode_committed(data)
        head = self.store.head()
        if head is not None and block.height <= head[0]:
            return head[0]  # already have it (a re-announcement)
        proposal = self._proposals.get(block.hash)
        if proposal is None:
            raise ProposalError(
                f"block {block.height} was committed without my vote: I need to sync it"
            )
        self.state = accept_block(
            self.state, block, proposal.readings, self.source, regulator=self.regulator
        )
        self.store.append(block, proposal.readings)
        del self._proposals[block.hash]
        self._applied(block.hash)
        return block.height

    def sealed(self, block: Block, readings: Mapping[int, Sequence[LedgerReading]]) -> bool:
        """Apply a certified block not voted for here (checked like any block: QC, readings).

        Returns False when this copy holds it already.
        """
        head = self.store.head()
        if head is not None and block.height <= head[0]:
            return False
        if block.height != (head[0] + 1 if head is not None else 0):
            raise ProposalError(
                f"block {block.height} sealed, but this ledger copy ends at "
                f"{head[0] if head else -1}: blocks in between are missing"
            )
        self.state = accept_block(
            self.state, block, readings, self.source, regulator=self.regulator
        )
        self.store.append(block, readings)
        self._applied(block.hash)
        return True

    def _applied(self, block_hash: bytes) -> None:
        """After each block: at a checkpoint height, hash the state it leaves."""
        assert self.state is not None
        if cp.is_due(self.state.height, self.checkpoint_interval):
            self.attestation = cp.Attestation.of(self.state, block_hash)

    def attest(self, data: bytes) -> cp.CheckpointVote:
        """A signed vote for the aggregator's checkpoint proposal `data`, if it is this node's
        own state at that height; CheckpointError saying why not otherwise."""
        return cp.attest(self.attestation, cp.parse_proposal(data), self.node_id, self.key)


def encode_sealed(block: Block, readings: Any) -> bytes:
    """A certified block with its reading batches: [committed block, proposal]."""
    return codec.encode([encode_committed(block), Proposal(block, readings).encode()])


def decode_sealed(data: bytes) -> tuple[Block, dict[int, tuple[LedgerReading, ...]]]:
    try:
        committed, proposal = codec.decode(data)
        block = decode_committed(committed)
        readings = Proposal.decode(proposal)
    except (CodecError, TypeError, ValueError) as exc:
        raise ProposalError(f"malformed sealed block: {exc}") from exc
    if readings.block.hash != block.hash:
        raise ProposalError("sealed block: the readings belong to another block")
    return block, dict(readings.readings)
