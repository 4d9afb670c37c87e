"""Per-meter sequence guard: no replayed or reordered readings, no registers running backwards.

`verify` proves a reading is authentic; this proves it is new. For each meter
the guard keeps, in SQLite (WAL, synchronous=FULL), the last accepted sequence
number, time and energy registers, plus the digests of the accepted readings
in a recent window of sequence numbers. For a verified reading:

- seq already accepted, byte-identical  -> DuplicateReading (a ReplayedReading
  with `duplicate = True`: an MQTT QoS 1 re-delivery, which ingest acknowledges
  as done);
- seq already accepted, other bytes     -> ReplayedReading;
- seq below the last accepted, never accepted (or older than the window)
                                        -> OutOfOrder;
- a register below the last accepted one -> CounterBackwards, unless the
  reading carries FLAG_COUNTER_RESET or follows a gap in seq (the flagged
  reading may be the one that was lost: thinned on the board, or refused
  here); then that register restarted, and what it holds now is the energy
  measured since the restart. Each register is judged on its own: one that
  did not run backwards keeps its plain difference, flag or not;
- otherwise admitted. Gaps in seq are allowed (the board thins its spool when
  it overflows) and reported as `Admission.gap`.

Time rules (what `Admission.previous_time` .. `Admission.time` books energy
into): a reading from a synced clock is booked at its own time, which
`meterchain.reading.verify` bounds (2020 .. 2100, and at most
`max_clock_ahead_s` ahead of the verifier when it is given its clock). A
reading whose board says its clock is not synced is booked at the time it
was received (`received`, the ingesting node's clock), never at the time it
claims, and never before the meter's previous booking time; without
`received` it is booked at the previous booking time. One interval spreads
over at most MAX_SPREAD_S (31 days): the energy of a longer one is booked
into its last 31 days, so no reading can make a writer touch more than 745
hourly rows. Energy is never dropped by these rules, only placed.

`check_and_accept` checks and records in one IMMEDIATE transaction and returns
only after the commit reached the disk, so an acknowledgement sent after it
can never be for a reading a crash forgets. A service that stores more per
reading (the edge agent's energy rows) hands the guard its own connection
and calls `admit` inside its transaction instead, so both commit together.
A rejected reading changes nothing.

Thread-safe: one connection behind one lock. Several processes may share a
file; SQLite's write lock (taken at BEGIN IMMEDIATE) serializes them. With a
shared connection the caller's transaction discipline applies.

Where the window's digests live: the last RECENT accepted readings of a meter
ride in its `meter_state` row (`recent`: 8-byte big-endian seq + 32-byte
digest each, oldest first), and spill as one run of rows into `accepted` when
the next reading finds the ring full, dropping that meter's rows older than
the window there. A batch then dirties about one page per meter instead of
two (its state row and its `accepted` leaf), and each meter's `accepted` run
is written RECENT rows at a time into one place. Rows below the window that
were not dropped yet are never consulted: what is older than the last
accepted seq minus the window is treated as gone, exactly as if each
acceptance had deleted it at once.

Per-meter state is cached in memory, but the database stays the source of
truth: a state enters the cache only after the transaction that wrote or read
it committed (`committed()`; the guard's own transactions call it), the
cache is dropped whenever another connection committed in between (SQLite's
`data_version`, read inside the write transaction), and a write transaction
checks that before using it. One guard per connection: two guards writing
through one connection would not see each other's changes in their caches.

Unsigned 64-bit values are stored as 20-digit zero-padded decimal text:
SQLite integers are signed 64-bit, and padded text keeps the numeric order
(used to prune the window) while staying readable in the sqlite3 shell.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from meterchain.errors import (
    CounterBackwards,
    DuplicateReading,
    MeterChainError,
    OutOfOrder,
    RejectedReading,
    ReplayedReading,
)
from meterchain.reading import FLAG_COUNTER_RESET, Reading
from meterchain.sqlitewal import use_wal
from meterchain.sqlrows import execute_rows

SCHEMA_VERSION = 2  # 2: meter_state.recent (version 1 files are migrated when opened)
DEFAULT_WINDOW = 1024
RECENT = 16  # accepted digests a state row carries before they spill to `accepted`; 16 keeps
# the row (about 130 + 16 x 40 bytes) inside its page (SQLite keeps up to ~1,000 bytes of
# a 4 KB page's cell local; 24 entries overflowed and cost more than they saved)
_ENTRY = 40  # bytes per `recent` entry: seq (8, big-endian) + SHA-256 digest (32)
# The longest interval (s) one reading's energy is spread over: 31 days, 745 hourly rows.
MAX_SPREAD_S = 31 * 24 * 3600
_BUSY_TIMEOUT_MS = 5000
_QUERY_IDS = 500  # meter ids per IN (...) query (SQLite allows 999 parameters at least)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sequence_guard_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meter_state (
    meter_id  TEXT PRIMARY KEY,
    seq       TEXT NOT NULL,
    time      TEXT NOT NULL,
    import_wh TEXT NOT NULL,
    export_wh TEXT NOT NULL,
    digest    BLOB NOT NULL,
    recent    BLOB NOT NULL DEFAULT x''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accepted (
    meter_id TEXT NOT NULL,
    seq      TEXT NOT NULL,
    digest   BLOB NOT NULL,
    PRIMARY KEY (meter_id, seq)
) WITHOUT ROWID;
"""


class SequenceStateError(MeterChainError):
    """The guard's SQLite file cannot be opened, read or written; the message names it."""


@dataclass(frozen=True)
class MeterState:
    """The last accepted reading of a meter, as the guard remembers it (Wh, Unix seconds).

    `recent` holds the (seq, digest) entries of its latest accepted readings not yet
    spilled to the `accepted` table, this one last (see the module docstring).
    """

    meter_id: str
    seq: int
    time: int
    import_wh: int
    export_wh: int
    digest: bytes
    recent: bytes = field(default=b"", repr=False)

    def recent_digest(self, seq: int) -> bytes | None:
        """The digest `recent` holds for `seq`, or None."""
        key = seq.to_bytes(8, "big")
        for i in range(0, len(self.recent), _ENTRY):
            if self.recent[i : i + 8] == key:
                return self.recent[i + 8 : i + _ENTRY]
        return None

    def recent_entries(self) -> list[tuple[int, bytes]]:
        """`recent` as (seq, digest) pairs, oldest first."""
        return _ring_entries(self.recent)


def _ring_entries(recent: bytes) -> list[tuple[int, bytes]]:
    """A `recent` ring as (seq, digest) pairs, oldest first."""
    return [
        (int.from_bytes(recent[i : i + 8], "big"), recent[i + 8 : i + _ENTRY])
        for i in range(0, len(recent), _ENTRY)
    ]


@dataclass(frozen=True)
class Admission:
    """What accepting a reading means relative to the meter's last accepted one.

    `gap` counts the sequence numbers skipped (0 when contiguous or first).
    The deltas are the energy (Wh) since the last accepted reading, register by
    register (for a register that restarted, its new value); None only for a
    meter's first reading. `import_reset` / `export_reset` say which register
    restarted, `counter_reset` that one did. `previous_time` .. `time` is the
    interval the energy is booked into (see the module's time rules);
    `time_backwards` notes a clock step back (accepted: the cumulative
    registers, not the clock, carry the energy).
    """

    meter_id: str
    seq: int
    first: bool
    gap: int
    counter_reset: bool
    import_delta_wh: int | None
    export_delta_wh: int | None
    time_backwards: bool
    previous_time: int | None = None  # start of the booking interval (None for the first)
    time: int | None = None  # end of the booking interval: when this reading's energy ends
    import_reset: bool = False
    export_reset: bool = False


def _u64(value: int) -> str:
    return f"{value:020d}"


class SequenceGuard:
    """The per-meter sequence and register state in SQLite; see the module docstring."""

    def __init__(
        self, db: str | Path | sqlite3.Connection, *, window: int = DEFAULT_WINDOW
    ) -> None:
        """Open (creating if needed) the guard's tables in a file, or in a caller's connection.

        With a path the guard owns its connection (WAL, synchronous=FULL) and its
        transactions. With an open `sqlite3.Connection` (isolation_level=None)
        the guard's tables live beside the caller's, and `admit` records inside
        the caller's transaction, so the guard advances atomically with whatever
        else the caller stores for the reading.
        """
        if window < 1:
            raise ValueError("window must be at least 1 sequence number")
        self.window = window
        self._lock = threading.Lock()
        # States known committed, valid while the connection's data_version is
        # `_cache_version`; `_pending` holds what the open transaction wrote or
        # read, promoted by `committed()` and discarded otherwise.
        self._cache: dict[str, MeterState] = {}
        self._cache_version: int | None = None
        self._pending: dict[str, MeterState] = {}
        self._owns_connection = not isinstance(db, sqlite3.Connection)
        try:
            if isinstance(db, sqlite3.Connection):
                if db.isolation_level is not None:
                    # Python's implicit BEGIN would leave the guard's writes in a
                    # transaction nobody commits.
                    raise SequenceStateError(
                        "a shared connection needs isolation_level=None (explicit transactions)"
                    )
                self._db = db
                self.path = Path(db.execute("PRAGMA database_list").fetchone()[2] or ":memory:")
            else:
                self.path = Path(db)
                self._db = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=5.0
                )
                self._configure()
            self._create_schema()
        except (sqlite3.Error, SequenceStateError) as exc:
            if self._owns_connection and hasattr(self, "_db"):
                self._db.close()
            if isinstance(exc, SequenceStateError):
                raise
            raise SequenceStateError(f"{db}: cannot open sequence state: {exc}") from exc

    def _configure(self) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = use_wal(self._db, _BUSY_TIMEOUT_MS / 1000)
        if mode != "wal":
            raise SequenceStateError(f"{self.path}: cannot switch to WAL (journal mode {mode})")
        # FULL: a commit is on disk when it returns (NORMAL may lose the last
        # commits on power loss, i.e. readings already acknowledged).
        self._db.execute("PRAGMA synchronous = FULL")

    def _create_schema(self) -> None:
        # The tables carry their own version row: user_version belongs to whoever
        # owns a shared database file. One write transaction, so two processes
        # opening a new (or version 1) file create (or migrate) it once.
        own = not self._db.in_transaction
        if own:
            self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            row = self._db.execute("SELECT version FROM sequence_guard_schema").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO sequence_guard_schema (version) VALUES (?)", (SCHEMA_VERSION,)
                )
            elif row[0] == 1:
                # Version 1 kept every digest in `accepted`: an empty ring reads the same.
                self._db.execute(
                    "ALTER TABLE meter_state ADD COLUMN recent BLOB NOT NULL DEFAULT x''"
                )
                self._db.execute("UPDATE sequence_guard_schema SET version = ?", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise SequenceStateError(
                    f"{self.path}: sequence state schema {row[0]}, "
                    f"this build reads {SCHEMA_VERSION}"
                )
        except BaseException:
            if own and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        if own:
            self._db.execute("COMMIT")

    # --- queries -------------------------------------------------------------------

    def state(self, meter_id: str) -> MeterState | None:
        """The last accepted reading of `meter_id`, or None if none was ever accepted."""
        with self._lock, self._transaction("DEFERRED"):
            return self._state(meter_id)

    def accepted_seqs(self, meter_id: str | None = None) -> dict[str, list[int]]:
        """Per meter (or just `meter_id`): the accepted seqs inside the replay window, ascending."""
        with self._lock, self._transaction("DEFERRED"):
            return window_seqs(self._db, self.window, meter_id)

    def check(self, reading: Reading, *, received: int | None = None) -> Admission:
        """What `check_and_accept` would do now, without recording anything."""
        # A read transaction, so both lookups see one snapshot even while
        # another process writes.
        with self._lock, self._transaction("DEFERRED"):
            return self._admit(reading, self._state(reading.meter_id), {}, received)

    # --- recording -----------------------------------------------------------------

    def check_and_accept(self, reading: Reading, *, received: int | None = None) -> Admission:
        """Check and record `reading` in one transaction, durable when this returns.

        Raises a RejectedReading subclass (and records nothing) if the reading
        is a replay, out of order, or has registers running backwards.
        `received` (Unix s) is when it arrived: the booking time of a reading
        from an unsynced clock.
        """
        with self._lock:
            with self._transaction():
                (outcome,) = self._admit_many((reading,), received)
            self._promote()
        if isinstance(outcome, RejectedReading):
            raise outcome
        return outcome

    def admit(self, reading: Reading, *, received: int | None = None) -> Admission:
        """Check and record `reading` inside the caller's open transaction.

        For a guard sharing the caller's connection: the caller's COMMIT makes
        the admission durable together with its own rows; a rejection raises
        before anything is written, so the transaction stays clean.
        """
        (outcome,) = self.admit_many((reading,), received=received)
        if isinstance(outcome, RejectedReading):
            raise outcome
        return outcome

    def admit_many(
        self, readings: Iterable[Reading], *, received: int | None = None
    ) -> list[Admission | RejectedReading]:
        """`admit` each reading in the caller's open transaction; each outcome in input order.

        Later readings are checked against earlier ones of the same batch, and
        the rows are written with one statement per table. The caller should
        hold the write lock (BEGIN IMMEDIATE) and call `committed()` after its
        COMMIT succeeds, which lets the next batch use the states from memory.
        """
        with self._lock:
            if not self._db.in_transaction:
                raise SequenceStateError(
                    f"{self.path}: admit() needs the caller's open transaction; "
                    "use check_and_accept() to let the guard commit"
                )
            try:
                return self._admit_many(readings, received)
            except sqlite3.Error as exc:
                raise self._store_error("access", exc) from exc

    def committed(self) -> None:
        """Tell the guard the caller's transaction holding its last `admit`s committed."""
        with self._lock:
            self._promote()

    # `check` then `accept` is safe: accept re-checks inside its own transaction,
    # so a reading that became stale in between is refused, never stored.
    accept = check_and_accept

    def check_and_accept_many(
        self, readings: Iterable[Reading], *, received: int | None = None
    ) -> list[Admission | RejectedReading]:
        """Admit a batch in one transaction (one disk sync); each outcome in input order.

        Later readings are checked against earlier ones of the same batch, so a
        batch behaves exactly like the same calls to `check_and_accept` in order.
        """
        with self._lock:
            with self._transaction():
                outcomes = self._admit_many(readings, received)
            self._promote()
        return outcomes

    def close(self) -> None:
        """Close the guard's own connection (a shared one stays with its owner)."""
        with self._lock:
            if self._owns_connection:
                self._db.close()

    def __enter__(self) -> SequenceGuard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals (caller holds the lock) -----------------------------------------

    @contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[None]:
        """BEGIN mode ... COMMIT, or ROLLBACK on any error; SQLite errors become ours.

        A read (DEFERRED) inside a caller's open transaction just reads there.
        """
        if self._db.in_transaction:
            if mode != "DEFERRED":
                raise SequenceStateError(
                    f"{self.path}: a transaction is already open on this connection; "
                    "record with admit() inside it"
                )
            try:
                yield
            except sqlite3.Error as exc:
                raise self._store_error("access", exc) from exc
            return
        try:
            self._db.execute(f"BEGIN {mode}")
        except sqlite3.Error as exc:
            raise self._store_error("lock", exc) from exc
        try:
            yield
        except sqlite3.Error as exc:
            self._rollback()
            raise self._store_error("access", exc) from exc
        except BaseException:
            self._rollback()
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise self._store_error("commit", exc) from exc

    def _rollback(self) -> None:
        self._pending.clear()
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _store_error(self, action: str, exc: sqlite3.Error) -> SequenceStateError:
        return SequenceStateError(f"{self.path}: cannot {action} sequence state: {exc}")

    def _states(self, meter_ids: set[str]) -> dict[str, MeterState]:
        """The stored states of `meter_ids` (meters never accepted have none)."""
        ids = sorted(meter_ids)
        found: dict[str, MeterState] = {}
        for i in range(0, len(ids), _QUERY_IDS):
            chunk = ids[i : i + _QUERY_IDS]
            rows = self._db.execute(
                "SELECT meter_id, seq, time, import_wh, export_wh, digest, recent "
                f"FROM meter_state WHERE meter_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            for meter_id, seq, time, import_wh, export_wh, digest, recent in rows:
                found[meter_id] = MeterState(
                    meter_id, int(seq), int(time), int(import_wh), int(export_wh), digest, recent
                )
        return found

    def _state(self, meter_id: str) -> MeterState | None:
        return self._states({meter_id}).get(meter_id)

    def _promote(self) -> None:
        self._cache.update(self._pending)
        self._pending.clear()

    def _admit_many(
        self, readings: Iterable[Reading], received: int | None = None
    ) -> list[Admission | RejectedReading]:
        """Check and record a batch in the open transaction (caller holds the lock)."""
        # States pending from a call whose commit nobody confirmed may have been
        # rolled back: forget them, the database knows.
        self._pending.clear()
        # A real read first pins this transaction's snapshot, so the version read
        # next describes the data the batch writes over (and a later write fails
        # rather than builds on a stale snapshot).
        self._db.execute("SELECT version FROM sequence_guard_schema").fetchone()
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        if version != self._cache_version:  # another connection committed
            self._cache.clear()
            self._cache_version = version
        pending = self._pending
        readings = list(readings)
        # Every meter of the batch is looked up here, in a few queries (after another
        # writer's commit emptied the cache, not one query per reading); a meter left
        # out of the cache then has no stored state.
        unknown = {r.meter_id for r in readings} - self._cache.keys()
        if unknown:
            self._cache.update(self._states(unknown))
        spilled: dict[tuple[str, int], bytes] = {}  # ring entries this batch moves to `accepted`
        outcomes: list[Admission | RejectedReading] = []
        ring_bytes = RECENT * _ENTRY
        for reading in readings:
            meter_id = reading.meter_id
            last = pending.get(meter_id) or self._cache.get(meter_id)
            try:
                admission = self._admit(reading, last, spilled, received)
            except RejectedReading as exc:
                if last is not None:
                    pending[meter_id] = last
                outcomes.append(exc)
                continue
            assert admission.time is not None
            entry = reading.seq.to_bytes(8, "big") + reading.digest
            if last is None:
                recent = entry
            elif len(last.recent) < ring_bytes:
                recent = last.recent + entry
            else:
                for seq, digest in last.recent_entries():
                    if seq > reading.seq - self.window:  # older ones are gone already
                        spilled[(meter_id, seq)] = digest
                recent = entry
            pending[meter_id] = MeterState(
                meter_id,
                reading.seq,
                admission.time,
                reading.import_wh,
                reading.export_wh,
                reading.digest,
                recent,
            )
            outcomes.append(admission)
        written = [m for m, o in zip(readings, outcomes, strict=True) if isinstance(o, Admission)]
        if written:
            self._record({r.meter_id for r in written}, spilled)
        return outcomes

    def _admit(
        self,
        reading: Reading,
        last: MeterState | None,
        spilled: dict[tuple[str, int], bytes],
        received: int | None,
    ) -> Admission:
        reset_flag = bool(reading.flags & FLAG_COUNTER_RESET)
        if last is None:
            booked = reading.time if received is None or reading.clock_synced else received
            return Admission(
                reading.meter_id, reading.seq, True, 0, reset_flag, None, None, False, None, booked
            )
        if reading.seq <= last.seq:
            self._refuse_old_seq(reading, last, spilled)
        gap = reading.seq - last.seq - 1
        import_reset = reading.import_wh < last.import_wh
        export_reset = reading.export_wh < last.export_wh
        if (import_reset or export_reset) and not reset_flag and not gap:
            backwards = [
                f"{name} {new} < {old}"
                for name, new, old in (
                    ("import_wh", reading.import_wh, last.import_wh),
                    ("export_wh", reading.export_wh, last.export_wh),
                )
                if new < old
            ]
            raise CounterBackwards(
                f"meter {reading.meter_id!r} seq {reading.seq}: {', '.join(backwards)} "
                f"(last accepted seq {last.seq}) without the counter-reset flag or a gap"
            )
        if reading.clock_synced:
            booked = reading.time
        else:
            booked = last.time if received is None else max(received, last.time)
        return Admission(
            reading.meter_id,
            reading.seq,
            False,
            gap,
            import_reset or export_reset,
            reading.import_wh if import_reset else reading.import_wh - last.import_wh,
            reading.export_wh if export_reset else reading.export_wh - last.export_wh,
            booked < last.time,
            max(last.time, booked - MAX_SPREAD_S),
            booked,
            import_reset,
            export_reset,
        )

    def _accepted_digest(
        self, reading: Reading, last: MeterState, spilled: dict[tuple[str, int], bytes]
    ) -> bytes | None:
        """The digest accepted for the reading's seq (below `last.seq`), or None.

        Looks in the state's ring, then in what this batch spilled and has not
        written yet, then in `accepted`. Below the window nothing counts, even
        a row not dropped yet.
        """
        if reading.seq <= last.seq - self.window:
            return None
        digest = last.recent_digest(reading.seq)
        if digest is not None:
            return digest
        digest = spilled.get((reading.meter_id, reading.seq))
        if digest is not None:
            return digest
        row = self._db.execute(
            "SELECT digest FROM accepted WHERE meter_id = ? AND seq = ?",
            (reading.meter_id, _u64(reading.seq)),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _refuse_old_seq(
        self, reading: Reading, last: MeterState, spilled: dict[tuple[str, int], bytes]
    ) -> NoReturn:
        accepted = self._accepted_digest(reading, last, spilled)
        where = f"meter {reading.meter_id!r} seq {reading.seq}"
        if accepted is not None:
            if accepted == reading.digest:
                raise DuplicateReading(f"{where}: already accepted (byte-identical copy)")
            raise ReplayedReading(
                f"{where}: already accepted with different content "
                f"(digest {accepted.hex()[:16]}, this one {reading.digest.hex()[:16]})"
            )
        if reading.seq <= last.seq - self.window:
            raise OutOfOrder(
                f"{where}: below the last accepted seq {last.seq} and older than the "
                f"{self.window}-seq replay window"
            )
        raise OutOfOrder(f"{where}: below the last accepted seq {last.seq} and never accepted")

    def _record(self, meters: set[str], spilled: dict[tuple[str, int], bytes]) -> None:
        """Write a batch's admissions: the states of `meters`, then the spilled ring entries."""
        pending = self._pending
        execute_rows(
            self._db,
            "INSERT INTO meter_state (meter_id, seq, time, import_wh, export_wh, digest, recent)",
            [
                (
                    state.meter_id,
                    _u64(state.seq),
                    _u64(state.time),
                    _u64(state.import_wh),
                    _u64(state.export_wh),
                    state.digest,
                    state.recent,
                )
                for state in (pending[m] for m in meters)
            ],
            "ON CONFLICT (meter_id) DO UPDATE SET "
            "seq = excluded.seq, time = excluded.time, import_wh = excluded.import_wh, "
            "export_wh = excluded.export_wh, digest = excluded.digest, recent = excluded.recent",
        )
        if not spilled:
            return
        execute_rows(
            self._db,
            "INSERT INTO accepted (meter_id, seq, digest)",
            [(meter_id, _u64(seq), digest) for (meter_id, seq), digest in spilled.items()],
        )
        # What fell out of the window, for the meters whose runs this batch wrote to.
        self._db.executemany(
            "DELETE FROM accepted WHERE meter_id = ? AND seq <= ?",
            [
                (meter_id, _u64(pending[meter_id].seq - self.window))
                for meter_id in {m for m, _ in spilled}
                if pending[meter_id].seq >= self.window
            ],
        )


def window_seqs(
    db: sqlite3.Connection, window: int = DEFAULT_WINDOW, meter_id: str | None = None
) -> dict[str, list[int]]:
    """Per meter (or just `meter_id`): the accepted seqs inside the replay window, ascending.

    Reads the guard's tables through any connection, a read-only one too (for
    tools and tests that look at a live agent's file): the `accepted` rows plus
    the states' rings, without the rows below the window not dropped yet.
    """
    where, args = ("WHERE meter_id = ?", (meter_id,)) if meter_id is not None else ("", ())
    held: dict[str, list[int]] = {}
    floors: dict[str, int] = {}
    for meter, seq, recent in db.execute(
        f"SELECT meter_id, seq, recent FROM meter_state {where}", args
    ):
        floors[meter] = int(seq) - window
        held[meter] = [s for s, _ in _ring_entries(recent) if s > floors[meter]]
    for meter, seq in db.execute(f"SELECT meter_id, seq FROM accepted {where}", args):
        if int(seq) > floors.get(meter, -1):
            held.setdefault(meter, []).append(int(seq))
    return {meter: sorted(seqs) for meter, seqs in held.items()}
