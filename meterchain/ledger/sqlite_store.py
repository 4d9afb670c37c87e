"""The default ledger store: one SQLite file in WAL mode, one database transaction per block."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from meterchain.ledger.store import SCHEMA_VERSION, LedgerStore, StoreError
from meterchain.sqlitewal import use_wal

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    header BLOB NOT NULL,
    qc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS txs (
    height INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    kind TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE,
    body BLOB NOT NULL,
    PRIMARY KEY (height, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings (
    height INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    digest BLOB NOT NULL,  -- no index: see LedgerStore.find_reading
    meter_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    import_wh INTEGER NOT NULL,
    export_wh INTEGER NOT NULL,
    cose BLOB NOT NULL,
    PRIMARY KEY (height, idx, pos),
    UNIQUE (meter_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    digest BLOB PRIMARY KEY,
    meter_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    import_wh INTEGER NOT NULL,
    export_wh INTEGER NOT NULL,
    cose BLOB NOT NULL,
    UNIQUE (meter_id, seq)
);
CREATE TABLE IF NOT EXISTS tx_inbox (
    hash BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    received INTEGER NOT NULL,
    arrival INTEGER NOT NULL
);
"""


WAL_CHECKPOINT_PAGES = 4_000
_OPEN_TIMEOUT_S = 30.0  # how long an open waits for another writer (SQLite's busy timeout)

# The SQLite storage class every value of a ledger table must have (see mistyped_rows).
_LEDGER_COLUMN_TYPES = {
    "blocks": {"height": "integer", "hash": "blob", "header": "blob", "qc": "blob"},
    "txs": {"height": "integer", "idx": "integer", "kind": "text", "hash": "blob",
            "body": "blob"},
    "readings": {"height": "integer", "idx": "integer", "pos": "integer", "digest": "blob",
                 "meter_id": "text", "seq": "integer", "time": "integer",
                 "import_wh": "integer", "export_wh": "integer", "cose": "blob"},
}  # fmt: skip


class SQLiteStore(LedgerStore):
    """A ledger in one SQLite file (WAL journal, full fsync on commit)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.url = str(path)
        try:
            # Autocommit mode: transactions are opened and closed explicitly below.
            # One thread at a time uses a store, but not always the one that opened it
            # (services open it, then hand it to their worker thread).
            self._db = sqlite3.connect(
                str(path), isolation_level=None, timeout=_OPEN_TIMEOUT_S, check_same_thread=False
            )
            # FULL: a committed block survives power loss, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            # A long ledger's blocks dirty index pages at many places (and, in a ledger made
            # before the digest index was dropped, one random page per reading); a WAL
            # checkpoint every 4,000 pages (16 MB) instead of 1,000 writes a page touched by
            # several blocks back once (`bench ledger`, commit_over_days).
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            row = self._schema_version()
            if row is None and not create:
                self._db.close()
                raise StoreError(f"{path}: not a MeterChain ledger (no ledger tables)")
            if row is None:
                # A new ledger: only then take the write lock (a reader opening a live
                # ledger must not contend with the writer).
                use_wal(self._db, _OPEN_TIMEOUT_S)
                self._db.executescript(SCHEMA)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (SCHEMA_VERSION,),
                )
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: ledger schema {row[0]}, this build reads {SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open SQLite ledger: {exc}") from exc

    def _schema_version(self) -> tuple[str] | None:
        try:
            return self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"{self.url}: {exc}") from exc

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._db.executemany(sql, rows)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"{self.url}: {exc}") from exc

    def _begin(self) -> None:
        # IMMEDIATE takes the write lock up front, so the height check and the insert
        # cannot interleave with another writer.
        self._db.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def _ignore_insert(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join("?" for _ in columns)
        return f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})"

    def _has_table(self, name: str) -> bool:
        return bool(
            self._execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        )

    def mistyped_rows(self, readings_since: int = 0) -> list[tuple[str, str, int]]:
        # SQLite keeps whatever type a value was written with (0.5 in an INTEGER column
        # stays a REAL), so every column of the ledger tables is checked for its type.
        # Text and blob heights sort after every number, so `height >= N` keeps them.
        checks = []
        since = int(readings_since)
        for table, columns in _LEDGER_COLUMN_TYPES.items():
            where = f"height >= {since} AND " if table == "readings" and since > 0 else ""
            for column, kind in columns.items():
                checks.append(
                    f"SELECT '{table}', '{column}', height FROM {table} "
                    f"WHERE {where}typeof({column}) != '{kind}'"
                )
        rows = self._execute(" UNION ALL ".join(checks) + " ORDER BY 3 LIMIT 10")
        return [(str(t), str(c), int(h) if isinstance(h, int | float) else -1) for t, c, h in rows]

    def close(self) -> None:
        self._db.close()
