"""The ledger store interface, shared by the SQLite and PostgreSQL back ends.

A store holds committed blocks (header bytes, quorum certificate, transactions),
the verified readings each reading batch commits to, and two inboxes of material
waiting for a block: verified readings and pending transactions. Ledger rows are
only ever inserted: there is no update or delete of a committed record. A block
and its readings are written in one database transaction, so a crash (even
kill -9) at any point leaves either the whole block or none of it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meterchain import codec
from meterchain.errors import MeterChainError
from meterchain.ledger.block import GENESIS_PREV, Block, Header
from meterchain.ledger.readings import LedgerReading
from meterchain.ledger.transactions import Tx
from meterchain.quorum import QuorumCertificate

SCHEMA_VERSION = "1"

# Column order of a reading row everywhere (store, inbox, proofs).
READING_COLUMNS = ("digest", "meter_id", "seq", "time", "import_wh", "export_wh", "cose")
ReadingRow = tuple[bytes, str, int, int, int, int, bytes]


class StoreError(MeterChainError):
    """The store cannot be opened or a database operation failed; the message says which."""


class LedgerConflict(StoreError):
    """A block conflicts with what is stored (another block at its height, a gap, a duplicate)."""


@dataclass
class IngestResult:
    """What `ingest_readings` did with a batch of verified readings."""

    new: int = 0
    duplicate: int = 0
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoredBlock:
    """A block as stored: the raw header and QC bytes kept as they are on disk."""

    height: int
    hash: bytes
    header_raw: bytes
    qc_raw: bytes
    txs: tuple[tuple[str, bytes, bytes], ...]  # (kind column, hash column, body bytes)
    positions: tuple[int, ...]  # the idx column of each transaction, in order


def qc_bytes(qc: QuorumCertificate) -> bytes:
    return codec.encode(qc.to_cbor())


class LedgerStore(abc.ABC):
    """Common logic over a DB-API connection; back ends supply SQL dialect and transactions."""

    url: str
    # Test hook: called with a step name between the statements of a block commit, so a
    # crash test can kill the process at an exact point. None in normal operation.
    on_commit_step: Callable[[str], None] | None = None

    # --- back-end specifics -------------------------------------------------------
    @abc.abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    @abc.abstractmethod
    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    @abc.abstractmethod
    def _begin(self) -> None: ...

    @abc.abstractmethod
    def _commit(self) -> None: ...

    @abc.abstractmethod
    def _rollback(self) -> None: ...

    @abc.abstractmethod
    def _is_unique_violation(self, exc: BaseException) -> bool: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _ignore_insert(self, table: str, columns: Sequence[str]) -> str:
        """INSERT statement for `table` that silently skips rows violating a unique key."""

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step(self, name: str) -> None:
        if self.on_commit_step is not None:
            self.on_commit_step(name)

    # --- blocks -------------------------------------------------------------------
    def head(self) -> tuple[int, bytes] | None:
        """Height and header hash of the last committed block, or None for an empty ledger."""
        rows = self._execute("SELECT height, hash FROM blocks ORDER BY height DESC LIMIT 1")
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def append(
        self, block: Block, readings: Mapping[int, Sequence[LedgerReading]] | None = None
    ) -> bool:
        """Commit `block` (with its QC) and the readings of its reading batches atomically.

        `readings` maps a reading-batch transaction index to its readings in batch
        order. Returns False when this exact block is already stored (idempotent);
        raises LedgerConflict for another block at the same height, a block that does
        not extend the head, or a reading already committed in an earlier block.
        """
        if block.qc is None:
            raise LedgerConflict(f"block {block.height}: refusing to store a block without a QC")
        readings = readings or {}
        header_raw = block.header.encode()
        block_hash = block.hash
        self._begin()
        try:
            existing = self._execute("SELECT hash FROM blocks WHERE height = ?", (block.height,))
            if existing:
                self._rollback()
                if bytes(existing[0][0]) == block_hash:
                    return False
                raise LedgerConflict(
                    f"block {block.height}: another block is already committed at this height"
                )
            head = self._execute("SELECT height, hash FROM blocks ORDER BY height DESC LIMIT 1")
            expected = (int(head[0][0]) + 1, bytes(head[0][1])) if head else (0, GENESIS_PREV)
            if (block.height, block.header.prev) != expected:
                self._rollback()
                raise LedgerConflict(
                    f"block {block.height}: does not extend the head (expected height "
                    f"{expected[0]} after {expected[1].hex()[:16]})"
                )
            self._step("begin")
            self._execute(
                "INSERT INTO blocks (height, hash, header, qc) VALUES (?, ?, ?, ?)",
                (block.height, block_hash, header_raw, qc_bytes(block.qc)),
            )
            self._step("block")
            self._executemany(
                "INSERT INTO txs (height, idx, kind, hash, body) VALUES (?, ?, ?, ?, ?)",
                [(block.height, i, tx.kind, tx.hash, tx.raw) for i, tx in enumerate(block.txs)],
            )
            self._step("txs")
            for idx, batch in sorted(readings.items()):
                self._executemany(
                    "INSERT INTO readings (height, idx, pos, digest, meter_id, seq, time, "
                    "import_wh, export_wh, cose) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(block.height, idx, pos, *r.row()) for pos, r in enumerate(batch)],
                )
                self._step("readings")
            if readings:
                # One statement, not one per reading: the committed readings leave the inbox.
                self._execute(
                    "DELETE FROM inbox WHERE digest IN (SELECT digest FROM readings "
                    "WHERE height = ?)",
                    (block.height,),
                )
            tx_hashes = [(tx.hash,) for tx in block.txs]
            self._executemany("DELETE FROM tx_inbox WHERE hash = ?", tx_hashes)
            self._step("inbox")
            self._commit()
        except LedgerConflict:
            raise
        except Exception as exc:
            self._rollback()
            if self._is_unique_violation(exc):
                raise LedgerConflict(
                    f"block {block.height}: a reading or transaction in it is already committed"
                    f" ({exc})"
                ) from exc
            raise
        self._step("committed")
        return True

    def stored_block(self, height: int) -> StoredBlock:
        rows = self._execute(
            "SELECT height, hash, header, qc FROM blocks WHERE height = ?", (height,)
        )
        if not rows:
            raise StoreError(f"no block at height {height}")
        txs = self._execute(
            "SELECT idx, kind, hash, body FROM txs WHERE height = ? ORDER BY idx", (height,)
        )
        h, hsh, header, qc = rows[0]
        return StoredBlock(
            int(h),
            bytes(hsh),
            bytes(header),
            bytes(qc),
            tuple((str(k), bytes(x), bytes(b)) for _, k, x, b in txs),
            tuple(int(i) for i, _, _, _ in txs),
        )

    def block(self, height: int) -> Block:
        """The block at `height`, decoded (raises on malformed stored bytes)."""
        stored = self.stored_block(height)
        qc = QuorumCertificate.from_cbor(codec.decode(stored.qc_raw))
        return Block(
            Header.decode(stored.header_raw), tuple(Tx.decode(b) for _, _, b in stored.txs), qc
        )

    def stored_blocks(self, start: int = 0) -> Iterator[StoredBlock]:
        """Every stored block from `start` in height order, with gaps visible to the caller."""
        heights = [
            int(r[0])
            for r in self._execute(
                "SELECT height FROM blocks WHERE height >= ? ORDER BY height", (start,)
            )
        ]
        for height in heights:
            yield self.stored_block(height)

    def header_rows(self, start: int, stop: int) -> list[tuple[int, bytes, bytes]]:
        """(height, hash, header bytes) of the stored blocks start <= height < stop, in order."""
        rows = self._execute(
            "SELECT height, hash, header FROM blocks WHERE height >= ? AND height < ? "
            "ORDER BY height",
            (start, stop),
        )
        return [(int(h), bytes(x), bytes(b)) for h, x, b in rows]

    def tx_hash_rows(self, start: int, stop: int) -> list[tuple[int, int, str, bytes, bytes]]:
        """(height, idx, kind, hash, body) of the transactions start <= height < stop, in order."""
        rows = self._execute(
            "SELECT height, idx, kind, hash, body FROM txs WHERE height >= ? AND height < ? "
            "ORDER BY height, idx",
            (start, stop),
        )
        return [(int(h), int(i), str(k), bytes(x), bytes(b)) for h, i, k, x, b in rows]

    def batch_rows(self, height: int, idx: int) -> list[tuple[int, ReadingRow]]:
        """(position, reading row) of one reading batch, in batch order."""
        rows = self._execute(
            "SELECT pos, digest, meter_id, seq, time, import_wh, export_wh, cose FROM readings "
            "WHERE height = ? AND idx = ? ORDER BY pos",
            (height, idx),
        )
        # Both drivers already return bytes/str/int for these columns: no per-row conversion
        # (this is the hot path of chain verification).
        return [(row[0], row[1:]) for row in rows]  # type: ignore[misc]

    def height_of(self, block_hash: bytes) -> int | None:
        """Height of the stored block with header hash `block_hash`, if there is one."""
        rows = self._execute("SELECT height FROM blocks WHERE hash = ?", (block_hash,))
        return int(rows[0][0]) if rows else None

    def orphan_rows(self, readings_since: int = 0) -> list[tuple[str, int, int]]:
        """(table, height, idx) of transactions and readings of a block that is not stored.

        A block's rows are only ever written together; rows whose block row is gone
        mean someone deleted the block (a truncated head) and left its body behind.
        Readings below height `readings_since` are not looked at (blocks up to a
        verified checkpoint are known to be contiguous).
        """
        rows = self._execute(
            "SELECT 'txs', t.height, t.idx FROM txs t LEFT JOIN blocks b ON b.height = t.height "
            "WHERE b.height IS NULL UNION ALL "
            "SELECT 'readings', r.height, r.idx FROM readings r LEFT JOIN blocks b "
            "ON b.height = r.height WHERE r.height >= ? AND b.height IS NULL "
            "ORDER BY 2, 3 LIMIT 10",
            (readings_since,),
        )
        return [(str(t), int(h), int(i)) for t, h, i in rows]

    def mistyped_rows(self, readings_since: int = 0) -> list[tuple[str, str, int]]:
        """(table, column, height) of stored values whose type is not the column's.

        A typed back end (PostgreSQL) cannot hold one; SQLite can (an edited
        `txs.idx = 0.5` would read back as a float), so its store overrides this.
        Readings below height `readings_since` are not looked at.
        """
        return []

    def stray_readings(self, since: int = 0) -> list[tuple[int, int, int]]:
        """Readings (at height `since` or above) whose (height, idx) is not a reading batch."""
        rows = self._execute(
            "SELECT r.height, r.idx, r.pos FROM readings r LEFT JOIN txs t "
            "ON t.height = r.height AND t.idx = r.idx AND t.kind = 'readings' "
            "WHERE r.height >= ? AND t.height IS NULL ORDER BY r.height, r.idx, r.pos LIMIT 10",
            (since,),
        )
        return [(int(h), int(i), int(p)) for h, i, p in rows]

    def find_reading(self, digest: bytes) -> tuple[int, int, int, ReadingRow] | None:
        """(height, tx index, position, row) of a committed reading (proofs: not a hot path).

        Readings are not indexed by digest: an index on a hash takes each reading at
        a random place, so once it outgrew a block every reading dirtied its own page
        and a block's commit cost grew with the ledger (`bench ledger`,
        commit_over_days). A digest is unique all the same (it hashes the signed
        bytes, which name the meter and sequence the table keeps unique), and the
        ledger rules and block review look readings up by meter and sequence. A
        ledger made before this keeps its digest index, which this query then uses.
        """
        rows = self._execute(
            "SELECT height, idx, pos, digest, meter_id, seq, time, import_wh, export_wh, cose "
            "FROM readings WHERE digest = ?",
            (digest,),
        )
        if not rows:
            return None
        h, i, p, d, m, s, t, imp, exp, c = rows[0]
        return (
            int(h),
            int(i),
            int(p),
            (bytes(d), str(m), int(s), int(t), int(imp), int(exp), bytes(c)),
        )

    def meter_rows(
        self, meter_id: str, after_seq: int, upto_seq: int
    ) -> list[tuple[int, int, ReadingRow]]:
        """(height, tx index, row) of a meter's committed readings after_seq < seq <= upto_seq."""
        rows = self._execute(
            "SELECT height, idx, digest, meter_id, seq, time, import_wh, export_wh, cose "
            "FROM readings WHERE meter_id = ? AND seq > ? AND seq <= ? ORDER BY seq",
            (meter_id, after_seq, upto_seq),
        )
        return [(int(r[0]), int(r[1]), tuple(r[2:])) for r in rows]  # type: ignore[misc]

    def meter_last_seq(self, meter_id: str) -> int | None:
        """The highest committed sequence number of a meter."""
        rows = self._execute("SELECT MAX(seq) FROM readings WHERE meter_id = ?", (meter_id,))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def digest_of(self, meter_id: str, seq: int) -> bytes | None:
        rows = self._execute(
            "SELECT digest FROM readings WHERE meter_id = ? AND seq = ?", (meter_id, seq)
        )
        if not rows:
            rows = self._execute(
                "SELECT digest FROM inbox WHERE meter_id = ? AND seq = ?", (meter_id, seq)
            )
        return bytes(rows[0][0]) if rows else None

    # --- checkpoints (meterchain.ledger.checkpoint) ------------------------------------
    _BLOB = "BLOB"

    @abc.abstractmethod
    def _has_table(self, name: str) -> bool: ...

    def put_checkpoint(
        self, height: int, block_hash: bytes, digest: bytes, state: bytes, qc_raw: bytes
    ) -> bool:
        """Keep a signed checkpoint (one per height; False if that height already has one)."""
        b = self._BLOB
        self._execute(
            f"CREATE TABLE IF NOT EXISTS checkpoints (height BIGINT PRIMARY KEY, "
            f"hash {b} NOT NULL, digest {b} NOT NULL, state {b} NOT NULL, qc {b} NOT NULL)"
        )
        if self._execute("SELECT 1 FROM checkpoints WHERE height = ?", (height,)):
            return False
        self._execute(
            "INSERT INTO checkpoints (height, hash, digest, state, qc) VALUES (?, ?, ?, ?, ?)",
            (height, block_hash, digest, state, qc_raw),
        )
        return True

    def checkpoint_rows(self) -> list[tuple[Any, Any, Any, Any, Any]]:
        """(height, hash, digest, state, qc) of the stored checkpoints, newest first."""
        if not self._has_table("checkpoints"):
            return []
        rows = self._execute(
            "SELECT height, hash, digest, state, qc FROM checkpoints ORDER BY height DESC"
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]

    def reading_count(self, since: int = 0) -> int:
        """Readings committed in blocks at height `since` or above (all by default)."""
        return int(self._execute("SELECT COUNT(*) FROM readings WHERE height >= ?", (since,))[0][0])

    # --- inboxes ------------------------------------------------------------------
    def ingest_readings(self, readings: Sequence[LedgerReading]) -> IngestResult:
        """Keep verified readings until a block commits them; the same reading twice is kept once.

        A different reading claiming a (meter, sequence) already taken is not stored
        and is reported in `conflicts` (a replay or a meter signing twice).
        """
        result = IngestResult()
        if not readings:
            return result
        self._begin()
        try:
            fresh: list[LedgerReading] = []
            seen: dict[tuple[str, int], bytes] = {}
            for r in readings:
                key = (r.meter_id, r.seq)
                known = seen.get(key)
                if known is None:
                    for table in ("readings", "inbox"):
                        rows = self._execute(
                            f"SELECT digest FROM {table} WHERE meter_id = ? AND seq = ?", key
                        )
                        if rows:
                            known = bytes(rows[0][0])
                            break
                if known is None:
                    seen[key] = r.digest
                    fresh.append(r)
                elif known == r.digest:
                    result.duplicate += 1
                else:
                    result.conflicts.append(
                        f"meter {r.meter_id} seq {r.seq}: a different reading has this sequence"
                    )
            self._executemany(
                self._ignore_insert("inbox", READING_COLUMNS), [r.row() for r in fresh]
            )
            self._commit()
        except Exception:
            self._rollback()
            raise
        result.new = len(fresh)
        return result

    def inbox_readings(self, before_time: int | None = None) -> list[LedgerReading]:
        """Readings waiting for a block, ordered by meter and sequence."""
        sql = "SELECT digest, meter_id, seq, time, import_wh, export_wh, cose FROM inbox"
        params: tuple[Any, ...] = ()
        if before_time is not None:
            sql += " WHERE time < ?"
            params = (before_time,)
        rows = self._execute(sql + " ORDER BY meter_id, seq", params)
        return [
            LedgerReading(bytes(d), str(m), int(s), int(t), int(i), int(e), bytes(c))
            for d, m, s, t, i, e, c in rows
        ]

    def inbox_count(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM inbox")[0][0])

    def submit_tx(self, tx: Tx, received: int) -> bool:
        """Keep a pending transaction until a block includes it; True when it was new."""
        if self._execute("SELECT 1 FROM txs WHERE hash = ?", (tx.hash,)):
            return False
        self._begin()
        try:
            before = self._execute("SELECT 1 FROM tx_inbox WHERE hash = ?", (tx.hash,))
            # Arrival order, so a transaction never goes into a block before one it builds on
            # (writers are serialised, so MAX + 1 is unique).
            arrival = int(self._execute("SELECT COALESCE(MAX(arrival), 0) FROM tx_inbox")[0][0])
            self._execute(
                self._ignore_insert("tx_inbox", ("hash", "body", "received", "arrival")),
                (tx.hash, tx.raw, received, arrival + 1),
            )
            self._commit()
        except Exception:
            self._rollback()
            raise
        return not before

    def pending_txs(self) -> list[Tx]:
        rows = self._execute("SELECT body FROM tx_inbox ORDER BY arrival")
        return [Tx.decode(bytes(r[0])) for r in rows]

    def drop_pending_tx(self, tx_hash: bytes) -> None:
        """Forget a pending transaction that can never be included (it broke a ledger rule)."""
        self._begin()
        try:
            self._execute("DELETE FROM tx_inbox WHERE hash = ?", (tx_hash,))
            self._commit()
        except Exception:
            self._rollback()
            raise


def open_store(target: str, *, create: bool = True) -> LedgerStore:
    """Open a ledger: a SQLite file path or a postgresql:// URL.

    With `create` (the default) a missing ledger is created; without, opening
    anything that is not already a ledger raises StoreError (read-only tools).
    """
    if target.startswith(("postgresql://", "postgres://")):
        from meterchain.ledger.postgres_store import PostgresStore

        return PostgresStore(target, create=create)
    from meterchain.ledger.sqlite_store import SQLiteStore

    return SQLiteStore(target, create=create)
