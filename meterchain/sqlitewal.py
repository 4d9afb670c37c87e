"""Switch an SQLite connection to WAL, also while another connection is creating the file.

Switching a new database file to WAL needs it to itself, and SQLite answers
"database is locked" at once (its busy timeout does not wait here) while
another connection is writing it. Services that start together (the
aggregator and a reader of its ledger, an agent and its ingest workers)
open a new file at the same moment, so the switch waits and tries again;
on a file already in WAL it is a no-op that takes no lock.
"""

from __future__ import annotations

import sqlite3
import time

_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_RETRY_S = 0.01


def use_wal(db: sqlite3.Connection, timeout_s: float) -> str:
    """`PRAGMA journal_mode=WAL`, retried for up to `timeout_s` while the file is locked;
    returns the journal mode SQLite reports ("wal" unless the file cannot have one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in _BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(_RETRY_S)
