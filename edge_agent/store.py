"""The agent's SQLite state: hourly energy per meter and the gateway outbox, beside the guard's.

It also keeps the end-to-end delivery state (edge_agent.delivery): each
own meter's acknowledged watermark, and the rejection log, where every
reading refused is kept with its bytes and reason (bounded, oldest dropped
and counted), so a refusal that lets a board free a reading loses nothing.

One connection, owned by the ingest thread, writes (one per process: the
agent and each ingest worker; their transactions queue on a file lock next
to the database, `<db>.writelock`). The sequence guard
(`meterchain.sequence.SequenceGuard`) keeps its tables in the same database
through the same connection, so every change a reading causes (guard state,
hourly energy, outbox row) happens in one transaction, and MQTT
acknowledgements are sent only after it commits (STYLE rule 6). WAL with
`synchronous=FULL` makes a commit durable on power loss, not just on a
process crash. Other threads use their own connections (`StoreView`).

Energy accounting starts at the first accepted reading of a meter: it sets
the baseline, and each later reading adds the register difference since the
previous one (the guard's last state), split over hours by
`edge_agent.energy.split_interval`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from edge_agent.energy import split_interval
from meterchain.market.model import Dispatch
from meterchain.sqlitewal import use_wal
from meterchain.sqlrows import execute_rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS hourly_energy (
    hour      INTEGER NOT NULL,
    meter_id  TEXT NOT NULL,
    owner     TEXT NOT NULL,
    source    TEXT NOT NULL,
    import_wh INTEGER NOT NULL,
    export_wh INTEGER NOT NULL,
    PRIMARY KEY (hour, meter_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schedule (
    hour          INTEGER PRIMARY KEY,
    dispatch      TEXT NOT NULL,
    result_digest BLOB NOT NULL,
    not_applied   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS delivery (
    meter_id  TEXT PRIMARY KEY,
    watermark TEXT NOT NULL  -- uint64 as decimal text (SQLite integers are signed)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejection_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    received INTEGER NOT NULL,
    sender   TEXT NOT NULL,
    meter_id TEXT,
    seq      TEXT,
    reason   TEXT NOT NULL,
    detail   TEXT NOT NULL,
    payload  BLOB NOT NULL
);
"""


REJECTED_PAYLOAD_MAX = 4096  # bytes of a refused message the rejection log keeps


@dataclass(frozen=True, slots=True)
class HourlyEnergy:
    """Energy one meter measured in the UTC hour starting at `hour` (Unix s), in Wh."""

    hour: int
    meter_id: str
    owner: str
    source: str
    import_wh: int
    export_wh: int


class Rejection(NamedTuple):
    """A refused reading as the rejection log keeps it (`meter_id`/`seq` as claimed, if known)."""

    received: int
    sender: str
    meter_id: str | None
    seq: int | None
    reason: str
    detail: str
    payload: bytes


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with full fsync on commit and explicit transactions."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    use_wal(conn, 30.0)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class AgentStore:
    """The writer's view of the agent database (use from one thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.path)
        self.conn.executescript(SCHEMA)
        # Writers of one database (the agent and its ingest workers) queue on this lock:
        # a blocked flock wakes as soon as the holder commits, where SQLite's busy handler
        # polls with sleeps of up to 100 ms, leaving cores idle while work waits.
        self._write_lock = open(self.path.with_name(self.path.name + ".writelock"), "a+b")  # noqa: SIM115
        self.outbox_limit = 100_000
        self.outbox_dropped = 0
        self.rejection_limit = 100_000
        self.rejections_dropped = 0
        # (hour, meter) -> (owner, source, import_wh, export_wh) of the open transaction
        self._pending: dict[tuple[int, str], tuple[str, str, int, int]] = {}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... (hourly rows written) COMMIT, or ROLLBACK on any error."""
        with self._writer_turn():
            self.conn.execute("BEGIN IMMEDIATE")
            self._pending.clear()
            try:
                yield self.conn
                execute_rows(
                    self.conn,
                    "INSERT INTO hourly_energy",
                    [(hour, meter, *row) for (hour, meter), row in self._pending.items()],
                    "ON CONFLICT (hour, meter_id) DO UPDATE SET "
                    "import_wh = import_wh + excluded.import_wh, "
                    "export_wh = export_wh + excluded.export_wh",
                )
            except BaseException:
                self.conn.execute("ROLLBACK")
                self._pending.clear()
                raise
            self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """Hold the database's write lock (shared by every process that writes it)."""
        fcntl.flock(self._write_lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._write_lock, fcntl.LOCK_UN)

    def fold(
        self,
        meter_id: str,
        owner: str,
        source: str,
        t0: int,
        t1: int,
        import_delta_wh: int,
        export_delta_wh: int,
    ) -> None:
        """Add the energy a meter measured between times t0 and t1 to its hourly rows (Wh).

        Runs inside `transaction()`, beside the guard's admission of the
        reading; the rows of one transaction are summed in memory and written
        once before it commits (a board emptying its spool sends many
        readings of one hour in one batch).
        """
        assert self.conn.in_transaction, "fold() must run inside transaction()"
        for share in split_interval(t0, t1, import_delta_wh, export_delta_wh):
            key = (share.hour, meter_id)
            _, _, imported, exported = self._pending.get(key, (owner, source, 0, 0))
            self._pending[key] = (
                owner,
                source,
                imported + share.import_wh,
                exported + share.export_wh,
            )

    def add_outbox(self, topic: str, payload: bytes) -> None:
        """Queue a gateway reading for publication (in a transaction); bounded, drops counted."""
        assert self.conn.in_transaction, "add_outbox() must run inside transaction()"
        self.conn.execute("INSERT INTO outbox (topic, payload) VALUES (?, ?)", (topic, payload))
        (pending,) = self.conn.execute("SELECT count(*) FROM outbox").fetchone()
        if pending > self.outbox_limit:
            # The reading itself is safe in hourly_energy; what is lost is only
            # the copy for other nodes, and the count says so.
            excess = pending - self.outbox_limit
            self.conn.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                (excess,),
            )
            self.outbox_dropped += excess

    def watermark(self, meter_id: str) -> int | None:
        """The meter's committed delivery watermark, or None if it was never acknowledged."""
        row = self.conn.execute(
            "SELECT watermark FROM delivery WHERE meter_id = ?", (meter_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def set_watermarks(self, watermarks: dict[str, int]) -> None:
        """Record advanced watermarks in the open transaction."""
        assert self.conn.in_transaction, "set_watermarks() must run inside transaction()"
        execute_rows(
            self.conn,
            "INSERT INTO delivery (meter_id, watermark)",
            [(meter_id, str(seq)) for meter_id, seq in watermarks.items()],
            "ON CONFLICT (meter_id) DO UPDATE SET watermark = excluded.watermark",
        )

    def log_rejections(self, rejections: list[Rejection]) -> None:
        """Keep refused readings (in the transaction); bounded, the oldest dropped and counted.

        A payload is kept up to REJECTED_PAYLOAD_MAX bytes (a signed reading is
        about 200): a sender of huge messages cannot fill the disk.
        """
        assert self.conn.in_transaction, "log_rejections() must run inside transaction()"
        self.conn.executemany(
            "INSERT INTO rejection_log (received, sender, meter_id, seq, reason, detail, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    *r[:3],
                    None if r.seq is None else str(r.seq),
                    r.reason,
                    r.detail[:1000],
                    r.payload[:REJECTED_PAYLOAD_MAX],
                )
                for r in rejections
            ],
        )
        (first, last) = self.conn.execute("SELECT min(id), max(id) FROM rejection_log").fetchone()
        excess = last - first + 1 - self.rejection_limit
        if excess > 0:  # ids are dense (AUTOINCREMENT, deletes only at the old end)
            self.conn.execute("DELETE FROM rejection_log WHERE id < ?", (first + excess,))
            self.rejections_dropped += excess

    def close(self) -> None:
        self.conn.close()
        self._write_lock.close()


class StoreView:
    """Queries, outbox acknowledgements and executed schedules, from threads other than the writer.

    Each thread gets its own connection; SQLite serializes the few writes
    made here with the writer's transactions.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
        return conn

    def hourly(self, *, owner: str | None = None, since: int = 0) -> list[HourlyEnergy]:
        sql = "SELECT hour, meter_id, owner, source, import_wh, export_wh FROM hourly_energy"
        sql += " WHERE hour >= ?" + (" AND owner = ?" if owner is not None else "")
        params: tuple[object, ...] = (since, owner) if owner is not None else (since,)
        rows = self._conn().execute(sql + " ORDER BY hour, meter_id", params).fetchall()
        return [HourlyEnergy(*row) for row in rows]

    def watermarks(self) -> dict[str, int]:
        """Every acknowledged meter's delivery watermark."""
        rows = self._conn().execute("SELECT meter_id, watermark FROM delivery").fetchall()
        return {meter_id: int(watermark) for meter_id, watermark in rows}

    def rejections(self, limit: int = 1000) -> list[Rejection]:
        """The most recent refused readings, oldest first."""
        rows = self._conn().execute(
            "SELECT received, sender, meter_id, seq, reason, detail, payload FROM ("
            "SELECT * FROM rejection_log ORDER BY id DESC LIMIT ?) ORDER BY id",
            (limit,),
        ).fetchall()
        return [
            Rejection(t, sender, meter, None if seq is None else int(seq), reason, detail, payload)
            for t, sender, meter, seq, reason, detail, payload in rows
        ]

    def outbox(self, limit: int = 1000) -> list[tuple[int, str, bytes]]:
        return (
            self._conn()
            .execute("SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,))
            .fetchall()
        )

    def outbox_pending(self) -> int:
        (count,) = self._conn().execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    def delete_outbox(self, row_id: int) -> None:
        self._conn().execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def record_schedule(
        self, hour: int, dispatch: Dispatch, result_digest: bytes, not_applied: str
    ) -> None:
        """Remember what was executed in `hour` (the next window's storage starts from it)."""
        self._conn().execute(
            "INSERT OR REPLACE INTO schedule VALUES (?, ?, ?, ?)",
            (hour, json.dumps(dispatch.to_list()), result_digest, not_applied),
        )

    def schedule(self, hour: int) -> Dispatch | None:
        row = (
            self._conn().execute("SELECT dispatch FROM schedule WHERE hour = ?", (hour,)).fetchone()
        )
        return Dispatch.from_list(json.loads(row[0])) if row else None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
