"""Chain verification: replay a stored ledger and name the first block that is not what it claims.

Checked for every block, in height order: the stored header hash against the
header bytes, the previous-header link, the transaction hashes and the body
Merkle root, the quorum certificate of more than n/2 members over the block
statement, and every transaction against the ledger rules (`LedgerState`):
regulator and party signatures, each reading batch's readings (digest, indexed
columns, Merkle root, and with `signatures` each reading's COSE signature
against the meters registered on the ledger), and re-executed settlement.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time as _time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.keys import PublicKey
from meterchain.ledger import checkpoint as cp
from meterchain.ledger.block import GENESIS_PREV, BlockError, Header, block_statement
from meterchain.ledger.merkle import leaf_hash, root_of_hashes
from meterchain.ledger.reading_signatures import MeterKeys, first_bad_signature
from meterchain.ledger.readings import LedgerReading
from meterchain.ledger.state import LedgerState, TxContext
from meterchain.ledger.store import LedgerStore, StoredBlock, StoreError
from meterchain.ledger.transactions import Tx, TxError
from meterchain.quorum import QuorumCertificate, QuorumError

# Ledgers with at least this many readings check reading signatures in worker processes,
# one per core, while the main process replays the ledger rules; smaller ones inline.
PARALLEL_FROM_READINGS = 20_000
# Readings per worker task: whole reading batches are gathered across blocks up to this,
# so a year of 20-reading blocks costs one task hand-over per hundred blocks, not per block.
_CHUNK = 2_000
_LINK_CHUNK = 2_000  # blocks per query of the hash pass below a checkpoint


@dataclass
class _Chunk:
    """Reading batches gathered for one worker task, and where each batch starts in it."""

    coses: list[bytes] = field(default_factory=list)
    keys: MeterKeys = field(default_factory=dict)
    points: dict[bytes, str] = field(default_factory=dict)  # key point -> meter id
    batches: list[tuple[int, int, str]] = field(default_factory=list)  # (start, height, label)
    future: Future[tuple[int, str] | None] | None = None

    def add_keys(self, wanted: MeterKeys) -> bool:
        """Take the keys of a batch's meters; False (nothing taken) if a meter had another key
        here, or its key another meter: a registry holds one key per meter and one meter per key.
        """
        for meter_id, key in wanted.items():
            if self.keys.get(meter_id, key) != key or self.points.get(key[0], meter_id) != meter_id:
                return False
        self.keys.update(wanted)
        self.points.update((key[0], meter_id) for meter_id, key in wanted.items())
        return True

    def failure(self, found: tuple[int, str] | None) -> ChainError | None:
        """The worker's (index, reason) as the error of the block that holds that reading."""
        if found is None:
            return None
        index, reason = found
        start, height, label = max(b for b in self.batches if b[0] <= index)
        return ChainError(height, f"{label}: reading {index - start} {reason}")


class _SignaturePool:
    """Reading signature checks fanned out to worker processes, failures named by block.

    Only the signed bytes travel, in tasks of about _CHUNK readings, and at most a
    few tasks per worker are in flight (the main process waits for the oldest
    beyond that), so memory stays bounded on a ledger of any length. If the pool
    breaks (a worker killed, no way to start one), the chunks it holds are checked
    here instead: a broken pool costs speed, never a check.
    """

    def __init__(self, workers: int) -> None:
        # spawn, not fork: the parent holds database connections and OpenSSL state.
        context = multiprocessing.get_context("spawn")
        self.executor = ProcessPoolExecutor(workers, mp_context=context)
        self.in_flight: deque[_Chunk] = deque()
        self.max_in_flight = 2 * workers + 1
        self.chunk = _Chunk()
        self.failure: ChainError | None = None  # the first, so the lowest block's

    def submit(self, height: int, label: str, rows: Sequence[tuple], state: LedgerState) -> int:
        """Queue one reading batch's signatures; returns how many will be checked."""
        wanted: MeterKeys = {}
        for meter_id in {row[1] for _, row in rows}:
            meter = state.meters.get(meter_id)
            if meter is not None:
                wanted[meter_id] = (meter.key.point, meter.owner, meter.source)
        chunk = self.chunk
        if not chunk.add_keys(wanted):
            # A meter registered anew with another key, or a retired meter's key given to
            # a new one: this batch starts a new task.
            self._send()
            chunk = self.chunk
            chunk.add_keys(wanted)
        chunk.batches.append((len(chunk.coses), height, label))
        chunk.coses.extend(row[6] for _, row in rows)
        if len(chunk.coses) >= _CHUNK:
            self._send()
        if self.failure is not None:
            # Its block and all below passed the rules, and the tasks before it are
            # collected (in order): it is the first bad block, no need to go on.
            raise self.failure
        return len(rows)

    def _send(self) -> None:
        chunk, self.chunk = self.chunk, _Chunk()
        if not chunk.coses:
            return
        try:
            chunk.future = self.executor.submit(first_bad_signature, chunk.coses, chunk.keys)
        except (BrokenProcessPool, RuntimeError):
            self._record(chunk.failure(first_bad_signature(chunk.coses, chunk.keys)))
            return
        self.in_flight.append(chunk)
        while len(self.in_flight) > self.max_in_flight:
            self._collect(self.in_flight.popleft())

    def _collect(self, chunk: _Chunk) -> None:
        assert chunk.future is not None
        try:
            found = chunk.future.result()
        except BrokenProcessPool:
            found = first_bad_signature(chunk.coses, chunk.keys)
        self._record(chunk.failure(found))

    def _record(self, failure: ChainError | None) -> None:
        if failure is not None and (self.failure is None or failure.height < self.failure.height):
            self.failure = failure

    def first_failure(self, below: int | None = None) -> ChainError | None:
        """The lowest-height failure among checks of blocks below `below` (all if None)."""
        self._send()
        while self.in_flight:
            self._collect(self.in_flight.popleft())
        if self.failure is not None and (below is None or self.failure.height < below):
            return self.failure
        return None

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)


class ChainError(MeterChainError):
    """The first bad block of a ledger; `height` and `reason` say where and why."""

    def __init__(self, height: int, reason: str) -> None:
        self.height = height
        self.reason = reason
        super().__init__(f"block {height}: {reason}")


@dataclass
class VerifyReport:
    market: str = ""
    blocks: int = 0
    transactions: int = 0
    readings: int = 0
    signatures_checked: int = 0
    head: bytes = b""
    height: int = -1  # of the head block (-1: empty)
    regulator: str = ""
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    # Height of the signed checkpoint the replay started after (-1: replayed from genesis);
    # blocks up to it had their hash links and transaction Merkle roots checked.
    checkpoint: int = -1


class BadCheckpoint(ChainError):
    """The stored checkpoint is refused: certificate, digest, state or block do not hold."""


def latest_checkpoint(store: LedgerStore) -> cp.Checkpoint | None:
    """The newest stored checkpoint, decoded (BadCheckpoint if it is malformed)."""
    rows = store.checkpoint_rows()
    if not rows:
        return None
    height, block_hash, digest, state, qc = rows[0]
    where = height if type(height) is int else -1
    try:
        qc_value = codec.decode(bytes(qc))
        return cp.from_cbor([height, bytes(block_hash), bytes(digest), bytes(state), qc_value])
    except (CodecError, cp.CheckpointError, TypeError) as exc:
        raise BadCheckpoint(where, f"checkpoint: {exc}") from exc


class StoreReadings:
    """The committed readings of a store, as transactions consult them (a `ReadingSource`)."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store

    def reading(self, digest: bytes) -> tuple[LedgerReading, int, int] | None:
        found = self.store.find_reading(digest)
        if found is None:
            return None
        height, idx, _, row = found
        return LedgerReading(*row), height, idx

    def meter_readings(
        self, meter_id: str, after_seq: int, upto_seq: int
    ) -> list[tuple[LedgerReading, int, int]]:
        return [
            (LedgerReading(*row), height, idx)
            for height, idx, row in self.store.meter_rows(meter_id, after_seq, upto_seq)
        ]


def _genesis_state(
    txs: Sequence[Tx], market: str, regulator: PublicKey | None, report: VerifyReport
) -> LedgerState:
    """The state block 0 founds (its first transaction is the genesis); checks the pinned
    regulator key and names the market and regulator in `report`."""
    if not txs:
        raise ChainError(0, "genesis block has no transactions")
    try:
        state = LedgerState.from_genesis(txs[0], market)
    except TxError as exc:
        raise ChainError(0, f"tx 0 (genesis): {exc}") from exc
    if regulator is not None and state.regulator.point != regulator.point:
        raise ChainError(0, "genesis regulator key is not the pinned regulator key")
    report.market = state.market
    report.regulator = state.regulator.fingerprint
    return state


def check_block_frame(
    stored: StoredBlock, expected_height: int, prev_hash: bytes
) -> tuple[Header, list[Tx]]:
    """Header bytes, hash, link, transaction hashes and body root of one stored block."""
    height = expected_height
    header = _linked_header(height, stored.hash, stored.header_raw, prev_hash)
    for idx, position in enumerate(stored.positions):
        if position != idx:
            raise ChainError(height, f"transaction stored at position {position}, not {idx}")
    txs: list[Tx] = []
    for idx, (kind, tx_hash, raw) in enumerate(stored.txs):
        try:
            tx = Tx.decode(raw)
        except TxError as exc:
            raise ChainError(height, f"tx {idx}: {exc}") from exc
        if tx.kind != kind:
            raise ChainError(height, f"tx {idx}: stored kind {kind!r} but the bytes say {tx.kind}")
        if leaf_hash(raw) != tx_hash:
            raise ChainError(height, f"{tx_label(idx, tx)}: stored hash does not match its bytes")
        txs.append(tx)
    if root_of_hashes([leaf_hash(raw) for _, _, raw in stored.txs]) != header.root:
        raise ChainError(height, "body Merkle root does not match the header")
    return header, txs


def _linked_header(height: int, block_hash: bytes, header_raw: bytes, prev_hash: bytes) -> Header:
    """The stored header at `height`, if its bytes hash to `block_hash` and link to `prev_hash`."""
    try:
        header = Header.decode(header_raw)
    except BlockError as exc:
        raise ChainError(height, f"header: {exc}") from exc
    if header.height != height:
        raise ChainError(height, f"header says height {header.height}")
    if hashlib.sha256(header_raw).digest() != block_hash:
        raise ChainError(height, "stored header hash does not match the header bytes")
    if header.prev != prev_hash:
        raise ChainError(height, "previous-header hash does not match the block before it")
    return header


def check_qc(stored: StoredBlock, header: Header, state: LedgerState) -> None:
    height = header.height
    try:
        qc = QuorumCertificate.from_cbor(codec.decode(stored.qc_raw))
        qc.verify(state.membership, expect=block_statement(state.market, height, stored.hash))
    except (QuorumError, CodecError) as exc:
        raise ChainError(height, f"quorum certificate: {exc}") from exc


def tx_label(idx: int, tx: Tx) -> str:
    if tx.kind == "readings":
        return f"reading batch {idx} (hour {tx.body['hour']})"
    return f"tx {idx} ({tx.describe()})"


def verify_store(
    store: LedgerStore,
    *,
    signatures: bool = True,
    regulator: PublicKey | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    checkpoint: cp.Checkpoint | None = None,
    upto: int | None = None,
) -> tuple[LedgerState | None, VerifyReport]:
    """Replay every stored block (up to height `upto`); raise ChainError naming the first bad one.

    With a `checkpoint` (see `latest_checkpoint`), blocks up to its height have
    their header hash links and transaction Merkle roots checked and their
    regulator-signed membership records followed; the checkpoint's certificate
    (more than n/2 of that membership) and state digest must hold (BadCheckpoint
    otherwise), and the rules and signatures are replayed only after it.

    `regulator`, when given, pins the trust anchor: the genesis must name this key.
    With `signatures`, a pass over PARALLEL_FROM_READINGS readings or more has its
    reading signatures checked by `workers` processes (default: one per core) while
    the rules are replayed here; `workers=1` checks them inline.
    Returns the final state and counts of what was checked.
    """
    if workers is None:
        workers = os.cpu_count() or 1
        # Only the readings the pass replays count: a day after a checkpoint is checked inline.
        since = checkpoint.height + 1 if checkpoint is not None else 0
        if store.reading_count(since) < PARALLEL_FROM_READINGS:
            workers = 1
    started = _time.perf_counter()
    pool = _SignaturePool(workers) if signatures and workers > 1 else None
    try:
        try:
            state, report = _replay(store, signatures, regulator, progress, pool, checkpoint, upto)
        except ChainError as exc:
            # A bad signature in an earlier block is the first bad block.
            earlier = pool.first_failure(below=exc.height) if pool is not None else None
            raise (earlier or exc) from None
        failure = pool.first_failure() if pool is not None else None
        if failure is not None:
            raise failure
    finally:
        if pool is not None:
            pool.close()
    report.seconds = _time.perf_counter() - started
    return state, report


def _replay(
    store: LedgerStore,
    signatures: bool,
    regulator: PublicKey | None,
    progress: Callable[[int], None] | None,
    pool: _SignaturePool | None,
    checkpoint: cp.Checkpoint | None = None,
    upto: int | None = None,
) -> tuple[LedgerState | None, VerifyReport]:
    report = VerifyReport()
    # After a checkpoint, readings before it are vouched for by its signers.
    since = checkpoint.height + 1 if checkpoint is not None else 0
    mistyped = store.mistyped_rows(since)
    if mistyped:
        table, column, height = mistyped[0]
        raise ChainError(height, f"{table}.{column} holds a value of the wrong type")
    state: LedgerState | None = None
    prev_hash = GENESIS_PREV
    expected = 0
    if checkpoint is not None:
        state = _links_to_checkpoint(store, checkpoint, regulator, report)
        prev_hash = checkpoint.block_hash
        expected = checkpoint.height + 1
        report.checkpoint = checkpoint.height
    source = StoreReadings(store)
    for stored in store.stored_blocks(expected):
        if upto is not None and stored.height > upto:
            break
        if stored.height != expected:
            raise ChainError(expected, f"missing (the next stored block is {stored.height})")
        header, txs = check_block_frame(stored, expected, prev_hash)
        height = header.height
        first = 0
        if state is None:
            state = _genesis_state(txs, header.market, regulator, report)
            first = 1
        elif header.market != state.market:
            raise ChainError(height, f"header names market {header.market!r}")
        check_qc(stored, header, state)
        try:
            state.begin_block(height, header.time)
        except TxError as exc:
            raise ChainError(height, str(exc)) from exc
        for idx in range(first, len(txs)):
            tx = txs[idx]
            rows = store.batch_rows(height, idx) if tx.kind == "readings" else ()
            inline = signatures and pool is None
            ctx = TxContext(height, idx, header.time, rows, inline, source)
            try:
                report.signatures_checked += state.apply(tx, ctx)
            except TxError as exc:
                raise ChainError(height, f"{tx_label(idx, tx)}: {exc}") from exc
            if pool is not None and rows:
                report.signatures_checked += pool.submit(height, tx_label(idx, tx), rows, state)
            report.readings += len(rows)
            report.kinds[tx.kind] = report.kinds.get(tx.kind, 0) + 1
        if first:
            report.kinds["genesis"] = 1
        try:
            state.end_block()
        except TxError as exc:
            raise ChainError(height, str(exc)) from exc
        report.transactions += len(txs)
        report.blocks += 1
        prev_hash = stored.hash
        expected += 1
        if progress is not None:
            progress(height)
    orphans = store.orphan_rows(since)
    if orphans:
        table, height, idx = orphans[0]
        raise ChainError(
            height, f"{table} rows of tx {idx} belong to no stored block (a deleted block?)"
        )
    stray = store.stray_readings(since)
    if stray:
        height, idx, pos = stray[0]
        raise ChainError(height, f"reading at tx {idx} position {pos} is not in a reading batch")
    report.head = prev_hash if state is not None else b""
    report.height = expected - 1
    return state, report


def _links_to_checkpoint(
    store: LedgerStore,
    checkpoint: cp.Checkpoint,
    regulator: PublicKey | None,
    report: VerifyReport,
) -> LedgerState:
    """What the checkpoint rests on, by hashes only; then its state.

    Up to the checkpoint: the header hash chain from the genesis (whose regulator
    is the trust anchor) to the block the checkpoint certifies, and each block's
    stored transactions against its header's Merkle root. Only the genesis and
    the regulator-signed membership records are decoded (they say who may sign
    the checkpoint); the other transactions' effect is the state the members
    signed, so they are not decoded or replayed (`--full` does that). One query
    per `_LINK_CHUNK` blocks instead of two per block: a year is seconds.
    """
    if store.head() is None:
        raise BadCheckpoint(checkpoint.height, "checkpoint is beyond the stored ledger (empty)")
    try:
        genesis = store.stored_block(0)
    except StoreError:
        raise ChainError(0, "missing (the ledger has no genesis block)") from None
    header, txs = check_block_frame(genesis, 0, GENESIS_PREV)
    tracker = _genesis_state(txs, header.market, regulator, report)
    prev_hash = GENESIS_PREV
    for start in range(0, checkpoint.height + 1, _LINK_CHUNK):
        stop = min(start + _LINK_CHUNK, checkpoint.height + 1)
        txs_at: dict[int, list[tuple[int, str, bytes, bytes]]] = {}
        for height, idx, kind, tx_hash, raw in store.tx_hash_rows(start, stop):
            txs_at.setdefault(height, []).append((idx, kind, tx_hash, raw))
        expected = start
        for height, block_hash, header_raw in store.header_rows(start, stop):
            if height != expected:
                raise ChainError(expected, f"missing (the next stored block is {height})")
            prev_hash = _linked_block(
                height, block_hash, header_raw, prev_hash, txs_at.get(height, []), tracker, report
            )
            expected += 1
        if expected < stop:
            head = store.head()
            if head is not None and head[0] > expected:
                raise ChainError(expected, f"missing (block {head[0]} is stored)")
            raise BadCheckpoint(
                checkpoint.height, f"checkpoint is beyond the stored ledger (head {expected - 1})"
            )
    if prev_hash != checkpoint.block_hash:
        raise BadCheckpoint(checkpoint.height, "checkpoint names another block at its height")
    try:
        state = cp.check(checkpoint, tracker.market, tracker.membership)
    except cp.CheckpointError as exc:
        raise BadCheckpoint(checkpoint.height, str(exc)) from exc
    if state.regulator.point != tracker.regulator.point:
        raise BadCheckpoint(checkpoint.height, "checkpoint state names another regulator")
    return state


def _linked_block(
    height: int,
    block_hash: bytes,
    header_raw: bytes,
    prev_hash: bytes,
    txs: list[tuple[int, str, bytes, bytes]],
    tracker: LedgerState,
    report: VerifyReport,
) -> bytes:
    """One block below a checkpoint: header hash and link, body root, memberships; its hash."""
    header = _linked_header(height, block_hash, header_raw, prev_hash)
    if header.market != tracker.market:
        raise ChainError(height, f"header names market {header.market!r}")
    leaves = []
    for position, (idx, kind, tx_hash, raw) in enumerate(txs):
        if idx != position:
            raise ChainError(height, f"transaction stored at position {idx}, not {position}")
        leaf = leaf_hash(raw)
        if leaf != tx_hash:
            raise ChainError(height, f"tx {idx}: stored hash does not match its bytes")
        leaves.append(leaf)
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
        if kind == "membership":
            _follow_membership(height, idx, raw, header.time, tracker)
    if root_of_hashes(leaves) != header.root:
        raise ChainError(height, "body Merkle root does not match the header")
    tracker.end_block()
    report.transactions += len(txs)
    report.blocks += 1
    return block_hash


def _follow_membership(height: int, idx: int, raw: bytes, time: int, tracker: LedgerState) -> None:
    """Apply a regulator-signed membership record below a checkpoint.

    A record relabelled away from "membership" is missed here, and then the
    checkpoint's membership is not the ledger's: refused either way.
    """
    try:
        tx = Tx.decode(raw)
    except TxError as exc:
        raise ChainError(height, f"tx {idx}: {exc}") from exc
    if tx.kind != "membership":
        raise ChainError(height, f"tx {idx}: stored kind 'membership' but the bytes say {tx.kind}")
    try:
        tracker.apply(tx, TxContext(height, idx, time))
    except TxError as exc:
        raise ChainError(height, f"{tx_label(idx, tx)}: {exc}") from exc


def check_head(
    store: LedgerStore,
    state: LedgerState | None,
    report: VerifyReport,
    *,
    head: bytes | None = None,
    min_height: int | None = None,
    signed_head: QuorumCertificate | None = None,
) -> None:
    """Refuse a verified ledger that is shorter than what the caller knows exists.

    A ledger whose top blocks were deleted is still a valid chain; only a head
    from elsewhere shows it is stale. `head` is a block hash the ledger must
    hold, `min_height` a height it must reach, and `signed_head` a block
    certificate (more than n/2 members over ["block", market, height, hash],
    e.g. from any consensus node) that the ledger must hold: the freshness
    check of an extension node. Raises ChainError naming what is missing.
    """
    top = report.height
    if min_height is not None and top < min_height:
        raise ChainError(top + 1, f"ledger ends at height {top}, below the pinned {min_height}")
    if head is not None and not _holds(store, top, head):
        raise ChainError(top + 1, f"ledger (head {top}) does not hold pinned block {head.hex()}")
    if signed_head is None:
        return
    if state is None:
        raise ChainError(0, "an empty ledger cannot match a signed head")
    try:
        fields = signed_head.fields()
        if len(fields) != 4 or fields[0] != "block" or type(fields[2]) is not int:
            raise QuorumError("not a block certificate")
        _, _, height, block_hash = fields
        expect = block_statement(state.market, height, block_hash)
        signed_head.verify(state.membership, expect=expect)
    except (QuorumError, CodecError) as exc:
        raise ChainError(top + 1, f"signed head: {exc}") from exc
    if top < height:
        raise ChainError(top + 1, f"stale: ledger ends at height {top}, signed head at {height}")
    if not _holds(store, top, block_hash, height):
        raise ChainError(height, "the block at the signed head's height is another block")


def _holds(store: LedgerStore, top: int, block_hash: bytes, height: int | None = None) -> bool:
    """True if the verified chain (heights 0..top) holds `block_hash` (at `height`)."""
    at = store.height_of(block_hash)
    return at is not None and at <= top and (height is None or at == height)
