"""The PostgreSQL ledger store (psycopg 3), for a market that outgrows one machine."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from meterchain.ledger.store import SCHEMA_VERSION, LedgerStore, StoreError

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS blocks (
        height BIGINT PRIMARY KEY,
        hash BYTEA NOT NULL UNIQUE,
        header BYTEA NOT NULL,
        qc BYTEA NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS txs (
        height BIGINT NOT NULL,
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        hash BYTEA NOT NULL UNIQUE,
        body BYTEA NOT NULL,
        PRIMARY KEY (height, idx))""",
    """CREATE TABLE IF NOT EXISTS readings (
        height BIGINT NOT NULL,
        idx INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        digest BYTEA NOT NULL,  -- no index: see LedgerStore.find_reading
        meter_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        time BIGINT NOT NULL,
        import_wh BIGINT NOT NULL,
        export_wh BIGINT NOT NULL,
        cose BYTEA NOT NULL,
        PRIMARY KEY (height, idx, pos),
        UNIQUE (meter_id, seq))""",
    """CREATE TABLE IF NOT EXISTS inbox (
        digest BYTEA PRIMARY KEY,
        meter_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        time BIGINT NOT NULL,
        import_wh BIGINT NOT NULL,
        export_wh BIGINT NOT NULL,
        cose BYTEA NOT NULL,
        UNIQUE (meter_id, seq))""",
    """CREATE TABLE IF NOT EXISTS tx_inbox (
        hash BYTEA PRIMARY KEY,
        body BYTEA NOT NULL,
        received BIGINT NOT NULL,
        arrival BIGINT NOT NULL)""",
]


def _pg(sql: str) -> str:
    # The shared SQL uses qmark placeholders and contains no literal question marks.
    return sql.replace("?", "%s")


class PostgresStore(LedgerStore):
    """A ledger in a PostgreSQL database given by a postgresql:// URL."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        try:
            self._db = psycopg.connect(url, autocommit=True)
            exists = self._db.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
            if not create and not (exists and exists[0]):
                self._db.close()
                raise StoreError(f"{self._safe_url()}: not a MeterChain ledger (no ledger tables)")
            with self._db.transaction():
                # Serialise schema creation between processes opening a fresh database.
                self._db.execute("SELECT pg_advisory_xact_lock(727274)")
                for statement in SCHEMA:
                    self._db.execute(statement)
                row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema', %s)", (SCHEMA_VERSION,)
                    )
                elif row[0] != SCHEMA_VERSION:
                    raise StoreError(
                        f"{self._safe_url()}: ledger schema {row[0]}, this build reads "
                        f"{SCHEMA_VERSION}"
                    )
        except psycopg.Error as exc:
            raise StoreError(f"{self._safe_url()}: cannot open PostgreSQL ledger: {exc}") from exc

    _BLOB = "BYTEA"

    def _has_table(self, name: str) -> bool:
        rows = self._execute("SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(rows and rows[0][0])

    def _safe_url(self) -> str:
        """The URL without a password, for error messages."""
        head, sep, tail = self.url.partition("@")
        if not sep or ":" not in head.split("//", 1)[-1]:
            return self.url
        scheme, _, userinfo = head.partition("//")
        return f"{scheme}//{userinfo.split(':', 1)[0]}:***@{tail}"

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            cur = self._db.execute(_pg(sql), tuple(params))
            return cur.fetchall() if cur.description is not None else []
        except pg_errors.UniqueViolation:
            raise
        except psycopg.Error as exc:
            raise StoreError(f"{self._safe_url()}: {exc}") from exc

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        try:
            with self._db.cursor() as cur:
                cur.executemany(_pg(sql), rows)
        except pg_errors.UniqueViolation:
            raise
        except psycopg.Error as exc:
            raise StoreError(f"{self._safe_url()}: {exc}") from exc

    def _begin(self) -> None:
        self._db.execute("BEGIN")
        # One writer at a time, like SQLite's BEGIN IMMEDIATE: the head check and the
        # inserts of a block commit cannot interleave with another writer's.
        self._db.execute("SELECT pg_advisory_xact_lock(727275)")

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        if self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._db.execute("ROLLBACK")

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, pg_errors.UniqueViolation)

    def _ignore_insert(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join("?" for _ in columns)
        return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def close(self) -> None:
        self._db.close()
