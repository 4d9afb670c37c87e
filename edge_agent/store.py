"""The agent's SQLite state: per-meter last reading, hourly energy per meter, the gateway outbox.

One connection, owned by the ingest thread, writes; every change a reading
causes (sequence guard, last reading, hourly energy, outbox row) happens in
one transaction, and MQTT acknowledgements are sent only after it commits
(STYLE rule 6). WAL with `synchronous=FULL` makes a commit durable on power
loss, not just on a process crash. Other threads read through their own
connections (`AgentStore.reader`).

Energy accounting starts at the first accepted reading of a meter: it sets
the baseline, and each later reading adds the register difference since the
previous one, split over hours by `edge_agent.energy.split_interval`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.energy import split_interval
from meterchain.reading import Reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS meter_last (
    meter_id  TEXT PRIMARY KEY,
    seq       INTEGER NOT NULL,
    time      INTEGER NOT NULL,
    import_wh INTEGER NOT NULL,
    export_wh INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hourly_energy (
    hour      INTEGER NOT NULL,
    meter_id  TEXT NOT NULL,
    owner     TEXT NOT NULL,
    source    TEXT NOT NULL,
    import_wh INTEGER NOT NULL,
    export_wh INTEGER NOT NULL,
    PRIMARY KEY (hour, meter_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class LastReading:
    seq: int
    time: int
    import_wh: int
    export_wh: int


@dataclass(frozen=True, slots=True)
class HourlyEnergy:
    """Energy one meter measured in the UTC hour starting at `hour` (Unix s), in Wh."""

    hour: int
    meter_id: str
    owner: str
    source: str
    import_wh: int
    export_wh: int


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with full fsync on commit and explicit transactions."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
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
        self._last: dict[str, LastReading] = {}
        self._reload()
        self._in_tx = False
        self.outbox_limit = 100_000
        self.outbox_dropped = 0

    def _reload(self) -> None:
        rows = self.conn.execute(
            "SELECT meter_id, seq, time, import_wh, export_wh FROM meter_last"
        ).fetchall()
        self._last = {row[0]: LastReading(*row[1:]) for row in rows}

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; on any error ROLLBACK and forget cached state."""
        self.conn.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            self._reload()
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._in_tx = False

    def last(self, meter_id: str) -> LastReading | None:
        return self._last.get(meter_id)

    def fold(self, reading: Reading, owner: str) -> None:
        """Add the energy since the meter's previous reading to its hourly rows (in a transaction).

        The sequence guard has already refused counters that run backwards
        without FLAG_COUNTER_RESET; after a reset the new registers are the
        energy measured since the reset.
        """
        assert self._in_tx, "fold() must run inside transaction()"
        previous = self._last.get(reading.meter_id)
        if previous is not None:
            if reading.counter_reset:
                d_import, d_export = reading.import_wh, reading.export_wh
            else:
                d_import = reading.import_wh - previous.import_wh
                d_export = reading.export_wh - previous.export_wh
            shares = split_interval(previous.time, reading.time, d_import, d_export)
            if shares:
                self.conn.executemany(
                    "INSERT INTO hourly_energy VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (hour, meter_id) DO UPDATE SET "
                    "import_wh = import_wh + excluded.import_wh, "
                    "export_wh = export_wh + excluded.export_wh",
                    [
                        (s.hour, reading.meter_id, owner, reading.source, s.import_wh, s.export_wh)
                        for s in shares
                    ],
                )
        last = LastReading(reading.seq, reading.time, reading.import_wh, reading.export_wh)
        self.conn.execute(
            "INSERT OR REPLACE INTO meter_last VALUES (?, ?, ?, ?, ?)",
            (reading.meter_id, last.seq, last.time, last.import_wh, last.export_wh),
        )
        self._last[reading.meter_id] = last

    def add_outbox(self, topic: str, payload: bytes) -> None:
        """Queue a gateway reading for publication (in a transaction); bounded, drops counted."""
        assert self._in_tx, "add_outbox() must run inside transaction()"
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

    def close(self) -> None:
        self.conn.close()


class StoreView:
    """Queries and outbox acknowledgements from other threads, each through its own connection."""

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

    def last(self, meter_id: str) -> LastReading | None:
        row = (
            self._conn()
            .execute(
                "SELECT seq, time, import_wh, export_wh FROM meter_last WHERE meter_id = ?",
                (meter_id,),
            )
            .fetchone()
        )
        return LastReading(*row) if row else None

    def outbox(self, limit: int = 1000) -> list[tuple[int, str, bytes]]:
        return (
            self._conn()
            .execute("SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,))
            .fetchall()
        )

    def delete_outbox(self, row_id: int) -> None:
        self._conn().execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
