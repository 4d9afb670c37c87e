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

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.keys import PrivateKey
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
from meterchain.quorum import QuorumError

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
            tag, header_raw, tx_raws, batches = value
            if tag != "proposal" or not isinstance(tx_raws, list) or not isinstance(batches, dict):
                raise ProposalError('not a ["proposal", header, txs, readings] message')
            header = Header.decode(header_raw)
            txs = tuple(Tx.decode(raw) for raw in tx_raws)
            readings = {
                int(idx): tuple(parse(bytes(cose)) for cose in batch)
                for idx, batch in batches.items()
            }
        except (CodecError, BlockError, TxError, ReadingFormatError, TypeError, ValueError) as exc:
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
    """A reviewer's own view: its ledger state after its head, its key and its clock."""

    state: LedgerState
    head: tuple[int, bytes] | None  # height and header hash of its last committed block
    node_id: str
    key: PrivateKey
    readings: ReadingSource
    now: int


def rows_of(batch: Sequence[LedgerReading]) -> list[tuple[int, tuple]]:
    return [(pos, r.row()) for pos, r in enumerate(batch)]


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
    state: LedgerState,
    block: Block,
    readings: Mapping[int, Sequence[LedgerReading]],
    source: ReadingSource,
    *,
    signatures: bool = True,
) -> LedgerState:
    """Check a sealed block against `state` (QC first, then everything in it); the state after it.

    Raises BlockError or TxError; `state` itself is never changed, so a refused
    block leaves the caller exactly where it was.
    """
    header = block.header
    if block.qc is None:
        raise BlockError(f"block {header.height} has no quorum certificate")
    try:
        block.qc.verify(
            state.membership, expect=block_statement(header.market, header.height, block.hash)
        )
    except QuorumError as exc:
        raise BlockError(f"block {header.height}: quorum certificate: {exc}") from exc
    after = state.copy()
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
    if ctx.state.membership.key_of(ctx.node_id) is None:
        return Refusal(f"{ctx.node_id} is not a consensus member")
    try:
        apply_block(ctx.state.copy(), block, proposal.readings, ctx.readings)
    except (TxError, BlockError) as exc:
        return Refusal(f"block {header.height}: {exc}")
    return Vote(ctx.node_id, ctx.key.sign(block.statement()))
