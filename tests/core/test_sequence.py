"""SequenceGuard: replays, reordering, counters running backwards, restarts, batches, sharing."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent.energy import split_interval
from meterchain import errors, reading
from meterchain.keys import PrivateKey
from meterchain.reading import (
    FLAG_CLOCK_NOT_SYNCED,
    FLAG_COUNTER_RESET,
    MAX_TIME,
    MIN_SYNCED_TIME,
    Reading,
)
from meterchain.registry import Registry
from meterchain.sequence import MAX_SPREAD_S, Admission, SequenceGuard, SequenceStateError

from .conftest import DEFAULTS, LOAD_KEY, LOAD_METER, PV_KEY, PV_METER, T0, open_together

Make = Callable[..., Reading]


@pytest.fixture
def make(registry: Registry) -> Make:
    """`make(seq, import_wh=..., ...)`: a verified PV reading (LOAD meter with `load=True`)."""

    def build(seq: int, *, load: bool = False, **fields: Any) -> Reading:
        values = {**DEFAULTS, "seq": seq, "time": T0 + 60 * seq, **fields}
        if load:
            values.update(meter_id=LOAD_METER, source="load")
        signed = reading.sign_reading(LOAD_KEY if load else PV_KEY, **values)
        return reading.verify(signed, registry)

    return build


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[SequenceGuard]:
    with SequenceGuard(tmp_path / "seq.db") as opened:
        yield opened


def _tables(path: Path) -> list[tuple[Any, ...]]:
    """Every stored row, through an independent connection."""
    with sqlite3.connect(path) as db:
        state = db.execute("SELECT * FROM meter_state ORDER BY meter_id").fetchall()
        accepted = db.execute("SELECT * FROM accepted ORDER BY meter_id, seq").fetchall()
    return state + accepted


def _refused(guard: SequenceGuard, r: Reading, cls: type[errors.RejectedReading]) -> str:
    with pytest.raises(errors.RejectedReading) as info:
        guard.check_and_accept(r)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    return str(info.value)


def test_first_reading_then_contiguous_then_gap(guard: SequenceGuard, make: Make) -> None:
    first = guard.check_and_accept(make(10, import_wh=1000, export_wh=50))
    assert first == Admission(PV_METER, 10, True, 0, False, None, None, False, None, T0 + 600)
    nxt = guard.check_and_accept(make(11, import_wh=1250, export_wh=50))
    assert (nxt.first, nxt.gap, nxt.import_delta_wh, nxt.export_delta_wh) == (False, 0, 250, 0)
    # The board thinned its spool: 12..14 never arrive. Allowed, and reported.
    gap = guard.check_and_accept(make(15, import_wh=1900, export_wh=60))
    assert (gap.gap, gap.import_delta_wh, gap.export_delta_wh) == (3, 650, 10)
    state = guard.state(PV_METER)
    assert state is not None and (state.seq, state.import_wh, state.export_wh) == (15, 1900, 60)
    assert state.time == T0 + 60 * 15


def test_meters_are_independent(guard: SequenceGuard, make: Make) -> None:
    guard.check_and_accept(make(100))
    assert guard.check_and_accept(make(1, load=True)).first
    assert guard.state(LOAD_METER).seq == 1  # type: ignore[union-attr]
    assert guard.state("never-seen") is None


def test_byte_identical_copy_is_a_duplicate(guard: SequenceGuard, make: Make) -> None:
    r = make(7)
    guard.check_and_accept(r)
    with pytest.raises(errors.DuplicateReading) as info:
        guard.check_and_accept(r)
    assert info.value.duplicate and info.value.reason == "duplicate"
    assert isinstance(info.value, errors.ReplayedReading)
    assert "already accepted (byte-identical copy)" in str(info.value)


def test_same_seq_with_other_content_is_a_replay(guard: SequenceGuard, make: Make) -> None:
    guard.check_and_accept(make(7, import_wh=500))
    with pytest.raises(errors.ReplayedReading) as info:
        guard.check_and_accept(make(7, import_wh=999))
    assert type(info.value) is errors.ReplayedReading and not info.value.duplicate
    assert info.value.reason == "replayed"
    assert "seq 7: already accepted with different content" in str(info.value)


def test_older_accepted_reading_redelivered_is_still_a_duplicate(
    guard: SequenceGuard, make: Make
) -> None:
    old = make(5)
    guard.check_and_accept(old)
    guard.check_and_accept(make(6))
    with pytest.raises(errors.DuplicateReading):
        guard.check_and_accept(old)


def test_seq_below_last_never_accepted_is_out_of_order(guard: SequenceGuard, make: Make) -> None:
    guard.check_and_accept(make(5))
    guard.check_and_accept(make(9))
    message = _refused(guard, make(7), errors.OutOfOrder)
    assert "seq 7: below the last accepted seq 9 and never accepted" in message


def test_below_the_window_is_out_of_order(tmp_path: Path, make: Make) -> None:
    with SequenceGuard(tmp_path / "w.db", window=4) as guard:
        first = make(1)
        for seq in (1, 2, 3, 4, 5, 6):
            guard.check_and_accept(make(seq) if seq != 1 else first)
        message = _refused(guard, first, errors.OutOfOrder)
        assert "older than the 4-seq replay window" in message
        assert guard.accepted_seqs() == {first.meter_id: [3, 4, 5, 6]}


@pytest.mark.parametrize("register", ["import_wh", "export_wh"])
def test_counter_running_backwards_is_refused(
    guard: SequenceGuard, make: Make, register: str
) -> None:
    guard.check_and_accept(make(1, import_wh=5000, export_wh=700))
    lower = {"import_wh": 5000, "export_wh": 700, register: 4999 if register == "import_wh" else 1}
    message = _refused(guard, make(2, **lower), errors.CounterBackwards)
    assert f"{register} " in message and "without the counter-reset flag or a gap" in message
    assert guard.state(PV_METER).seq == 1  # type: ignore[union-attr]


def test_counter_reset_flag_admits_lower_registers(guard: SequenceGuard, make: Make) -> None:
    guard.check_and_accept(make(1, import_wh=5000, export_wh=700))
    admitted = guard.check_and_accept(make(2, import_wh=3, export_wh=0, flags=FLAG_COUNTER_RESET))
    assert admitted.counter_reset and admitted.import_reset and admitted.export_reset
    # what a restarted register holds was measured since the restart
    assert (admitted.import_delta_wh, admitted.export_delta_wh) == (3, 0)
    assert guard.state(PV_METER).import_wh == 3  # type: ignore[union-attr]
    # Counting resumes from the new baseline.
    assert guard.check_and_accept(make(3, import_wh=10, export_wh=0)).import_delta_wh == 7


def test_each_register_is_judged_on_its_own(guard: SequenceGuard, make: Make) -> None:
    """Only export restarted: import keeps its plain difference (it was booked whole)."""
    guard.check_and_accept(make(1, import_wh=5_000_000, export_wh=900))
    admitted = guard.check_and_accept(
        make(2, import_wh=5_000_100, export_wh=300, flags=FLAG_COUNTER_RESET)
    )
    assert (admitted.import_reset, admitted.export_reset) == (False, True)
    assert (admitted.import_delta_wh, admitted.export_delta_wh) == (100, 300)


def test_a_lost_flagged_reading_does_not_stall_the_meter(guard: SequenceGuard, make: Make) -> None:
    """The flagged reading (seq 2) never arrives: seq 3 follows a gap, so a lower register
    is a restart, not a forgery; without a gap it stays refused."""
    guard.check_and_accept(make(1, import_wh=5000, export_wh=700))
    admitted = guard.check_and_accept(make(3, import_wh=40, export_wh=720))
    assert admitted.gap == 1 and admitted.import_reset and not admitted.export_reset
    assert (admitted.import_delta_wh, admitted.export_delta_wh) == (40, 20)
    assert guard.check_and_accept(make(4, import_wh=50, export_wh=720)).import_delta_wh == 10
    _refused(guard, make(5, import_wh=49, export_wh=720), errors.CounterBackwards)


def test_clock_step_back_is_accepted_and_noted(guard: SequenceGuard, make: Make) -> None:
    guard.check_and_accept(make(1, time=T0 + 600))
    assert guard.check_and_accept(make(2, time=T0 + 300)).time_backwards


def test_full_uint64_range(guard: SequenceGuard, make: Make) -> None:
    top = 2**64 - 1
    guard.check_and_accept(make(top - 1, import_wh=top - 5, export_wh=top, time=T0))
    admitted = guard.check_and_accept(make(top, import_wh=top, export_wh=top, time=T0))
    assert (admitted.gap, admitted.import_delta_wh) == (0, 5)
    # Same sequence number, other bytes (signatures are deterministic, so change a field).
    again = make(top - 1, import_wh=top - 5, export_wh=top, time=T0 + 1)
    _refused(guard, again, errors.ReplayedReading)
    _refused(guard, make(2**63, import_wh=top, export_wh=top, time=T0), errors.OutOfOrder)
    assert guard.state(PV_METER).seq == top  # type: ignore[union-attr]


def test_rejections_leave_stored_state_intact(
    guard: SequenceGuard, make: Make, tmp_path: Path
) -> None:
    accepted = [make(seq, import_wh=1000 + seq) for seq in (3, 4, 8)]
    for r in accepted:
        guard.check_and_accept(r)
    before = _tables(tmp_path / "seq.db")
    for bad, cls in (
        (accepted[1], errors.DuplicateReading),
        (make(8, import_wh=5), errors.ReplayedReading),
        (make(6), errors.OutOfOrder),
        (make(9, import_wh=10), errors.CounterBackwards),
    ):
        _refused(guard, bad, cls)
    assert _tables(tmp_path / "seq.db") == before


def test_check_reports_without_recording(guard: SequenceGuard, make: Make, tmp_path: Path) -> None:
    guard.check_and_accept(make(1))
    before = _tables(tmp_path / "seq.db")
    assert guard.check(make(3)).gap == 1
    assert _tables(tmp_path / "seq.db") == before
    with pytest.raises(errors.OutOfOrder):
        guard.check(make(0))
    assert guard.accept(make(3)).gap == 1  # accept == check_and_accept


def test_state_survives_a_restart_and_replays_stay_refused(tmp_path: Path, make: Make) -> None:
    path = tmp_path / "seq.db"
    r4, r5 = make(4, import_wh=1900), make(5, import_wh=2000)
    with SequenceGuard(path) as guard:
        guard.check_and_accept(r4)
        guard.check_and_accept(r5)
    with SequenceGuard(path) as reopened:
        state = reopened.state(PV_METER)
        assert state is not None and (state.seq, state.import_wh) == (5, 2000)
        assert state.digest == r5.digest
        with pytest.raises(errors.DuplicateReading):
            reopened.check_and_accept(r5)
        _refused(reopened, r4, errors.DuplicateReading)
        # The same fields signed again give the same bytes (RFC 6979): a duplicate.
        _refused(reopened, make(4, import_wh=1900), errors.DuplicateReading)
        # An old sequence number with other content is a replay.
        _refused(reopened, make(4, import_wh=1901), errors.ReplayedReading)
        _refused(reopened, make(6, import_wh=1), errors.CounterBackwards)
        assert reopened.check_and_accept(make(6, import_wh=2100)).import_delta_wh == 100


def test_batch_is_one_transaction_with_per_reading_outcomes(
    guard: SequenceGuard, make: Make
) -> None:
    r1, r2 = make(1), make(2, import_wh=DEFAULTS["import_wh"] + 10)
    outcomes = guard.check_and_accept_many([r1, r2, r2, make(1, import_wh=0), make(3, load=True)])
    assert isinstance(outcomes[0], Admission) and outcomes[0].first
    assert isinstance(outcomes[1], Admission) and outcomes[1].import_delta_wh == 10
    assert isinstance(outcomes[2], errors.DuplicateReading)  # the batch sees its own rows
    assert type(outcomes[3]) is errors.ReplayedReading
    assert isinstance(outcomes[4], Admission) and outcomes[4].meter_id == LOAD_METER
    assert guard.state(PV_METER).seq == 2  # type: ignore[union-attr]


def test_concurrent_threads_accept_each_reading_once(guard: SequenceGuard, make: Make) -> None:
    readings = [make(seq, import_wh=seq) for seq in range(1, 9)]
    results: list[str] = []
    lock = threading.Lock()

    def submit(r: Reading) -> None:
        try:
            guard.check_and_accept(r)
            outcome = f"ok {r.seq}"
        except errors.RejectedReading as exc:
            outcome = exc.reason
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=submit, args=(r,)) for r in readings * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = [r for r in results if r.startswith("ok")]
    # Whatever the interleaving: no seq accepted twice, never an error other than a refusal.
    assert len(accepted) == len(set(accepted)) and set(results) - set(accepted) <= {
        "duplicate",
        "out_of_order",
    }
    assert guard.state(PV_METER).seq == max(int(a.split()[1]) for a in accepted)  # type: ignore[union-attr]


# --- sharing the caller's connection and transaction -------------------------------------


def _shared(tmp_path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(tmp_path / "agent.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE energy (meter_id TEXT, wh INTEGER)")
    return db


def test_admit_commits_with_the_callers_rows(tmp_path: Path, make: Make) -> None:
    db = _shared(tmp_path)
    guard = SequenceGuard(db)
    db.execute("BEGIN IMMEDIATE")
    guard.admit(make(1))
    db.execute("INSERT INTO energy VALUES (?, ?)", (PV_METER, 5))
    db.execute("COMMIT")
    db.execute("BEGIN IMMEDIATE")
    guard.admit(make(2))
    db.execute("ROLLBACK")  # the caller's failure undoes the guard's step too
    assert guard.state(PV_METER).seq == 1  # type: ignore[union-attr]
    guard.close()  # leaves the caller's connection open
    assert db.execute("SELECT count(*) FROM energy").fetchone() == (1,)
    reopened = SequenceGuard(tmp_path / "agent.db")
    assert reopened.state(PV_METER).seq == 1  # type: ignore[union-attr]
    reopened.close()
    db.close()


def test_admit_refusal_writes_nothing_into_the_callers_transaction(
    tmp_path: Path, make: Make
) -> None:
    db = _shared(tmp_path)
    guard = SequenceGuard(db)
    r = make(1)
    db.execute("BEGIN IMMEDIATE")
    guard.admit(r)
    with pytest.raises(errors.DuplicateReading):
        guard.admit(r)
    db.execute("COMMIT")
    assert guard.state(PV_METER).seq == 1  # type: ignore[union-attr]
    db.close()


def test_transaction_discipline_is_enforced(tmp_path: Path, make: Make) -> None:
    db = _shared(tmp_path)
    guard = SequenceGuard(db)
    with pytest.raises(SequenceStateError, match="needs the caller's open transaction"):
        guard.admit(make(1))
    db.execute("BEGIN IMMEDIATE")
    with pytest.raises(SequenceStateError, match="already open"):
        guard.check_and_accept(make(1))
    assert guard.check(make(1)).first  # reads inside the caller's transaction
    db.execute("ROLLBACK")
    db.close()


def test_shared_connection_must_use_explicit_transactions(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "implicit.db")  # default: implicit BEGIN before writes
    with pytest.raises(SequenceStateError, match="isolation_level=None"):
        SequenceGuard(db)
    db.close()


def test_unreadable_state_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "seq.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SequenceStateError, match="cannot open sequence state"):
        SequenceGuard(path)
    with pytest.raises(ValueError, match="window"):
        SequenceGuard(tmp_path / "ok.db", window=0)


# --- the in-memory state cache never outvotes the database --------------------------------


def test_another_connection_committing_invalidates_the_cache(tmp_path: Path, make: Make) -> None:
    path = tmp_path / "seq.db"
    with SequenceGuard(path) as first, SequenceGuard(path) as second:
        first.check_and_accept(make(1))  # first now caches seq 1
        second.check_and_accept(make(2, import_wh=DEFAULTS["import_wh"] + 5))
        # first must see seq 2 in the file, not its cached seq 1.
        _refused(first, make(2, import_wh=DEFAULTS["import_wh"] + 9), errors.ReplayedReading)
        _refused(first, make(3, import_wh=DEFAULTS["import_wh"] + 1), errors.CounterBackwards)
        assert first.check_and_accept(make(3, import_wh=DEFAULTS["import_wh"] + 8)).gap == 0


def test_rolled_back_batch_is_not_remembered(tmp_path: Path, make: Make) -> None:
    db = _shared(tmp_path)
    guard = SequenceGuard(db)
    db.execute("BEGIN IMMEDIATE")
    guard.admit_many([make(1)])
    db.execute("COMMIT")
    guard.committed()
    db.execute("BEGIN IMMEDIATE")
    outcomes = guard.admit_many([make(2), make(3)])
    assert all(isinstance(o, Admission) for o in outcomes)
    db.execute("ROLLBACK")  # nobody calls committed(): seq 2 and 3 never happened
    db.execute("BEGIN IMMEDIATE")
    (again,) = guard.admit_many([make(2)])
    db.execute("COMMIT")
    guard.committed()
    assert isinstance(again, Admission) and again.gap == 0 and again.previous_time == T0 + 60
    db.close()


def test_batch_pruning_matches_one_reading_at_a_time(tmp_path: Path, make: Make) -> None:
    # With a 4-seq window, accepting 7 forgets 1 and 2, and 8 forgets 4: within one
    # batch those are out of order, exactly as in separate transactions.
    batch = [make(1), make(2), make(7), make(2), make(3), make(1), make(8), make(4), make(7)]

    def kinds(outcomes: list[Admission | errors.RejectedReading]) -> list[str]:
        return [o.reason if isinstance(o, errors.RejectedReading) else "ok" for o in outcomes]

    with SequenceGuard(tmp_path / "a.db", window=4) as batched:
        together = kinds(batched.check_and_accept_many(batch))
        rows_batched = _tables(tmp_path / "a.db")
    with SequenceGuard(tmp_path / "b.db", window=4) as single:
        apart = kinds([single.check_and_accept_many([r])[0] for r in batch])
        rows_single = _tables(tmp_path / "b.db")
    expected = ["ok"] * 3 + ["out_of_order"] * 3 + ["ok", "out_of_order", "duplicate"]
    assert together == apart == expected
    assert rows_batched == rows_single


# --- time rules --------------------------------------------------------------------------


def test_unsynced_readings_are_booked_when_received(guard: SequenceGuard, make: Make) -> None:
    """Two unsynced readings claiming 1970 and 2099: booked at their arrival, one hour."""
    unsynced = FLAG_CLOCK_NOT_SYNCED
    first = guard.check_and_accept(make(1, time=0, flags=unsynced), received=T0)
    assert first.time == T0
    late = make(2, time=MAX_TIME - 1, import_wh=DEFAULTS["import_wh"] + 50, flags=unsynced)
    second = guard.check_and_accept(late, received=T0 + 60)
    assert (second.previous_time, second.time, second.import_delta_wh) == (T0, T0 + 60, 50)
    # received earlier than the last booking (a slow node): never before the last booking
    more = DEFAULTS["import_wh"] + 50
    third = guard.check_and_accept(
        make(3, time=5, import_wh=more, flags=unsynced), received=T0 - 999
    )
    assert (third.previous_time, third.time) == (T0 + 60, T0 + 60)
    # no arrival time given: booked at the previous booking time, never at its own
    fourth = make(4, time=7, import_wh=more, flags=unsynced)
    assert guard.check_and_accept(fourth).time == T0 + 60
    # a synced reading is booked at its own (verified) time
    assert guard.check_and_accept(make(5, time=T0 + 3600, import_wh=more)).time == T0 + 3600


def test_one_interval_spreads_over_at_most_31_days(guard: SequenceGuard, make: Make) -> None:
    guard.check_and_accept(make(1, time=MIN_SYNCED_TIME))
    years_later = guard.check_and_accept(make(2, time=MIN_SYNCED_TIME + 10 * 365 * 86400))
    assert years_later.time - years_later.previous_time == MAX_SPREAD_S  # type: ignore[operator]
    hours = split_interval(years_later.previous_time, years_later.time, 10**9, 0)  # type: ignore[arg-type]
    assert len(hours) <= MAX_SPREAD_S // 3600 + 1
    assert sum(h.import_wh for h in hours) == 10**9  # placed, never dropped


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 5000),  # import Wh measured in the interval
            st.integers(0, 5000),  # export Wh
            st.sampled_from(["", "", "import", "export", "both"]),  # registers that restart
            st.booleans(),  # the reading is lost (thinned on the board or refused)
        ),
        min_size=1,
        max_size=25,
    )
)
def test_booked_energy_equals_true_energy_across_resets_and_losses(
    tmp_path_factory: pytest.TempPathFactory, make: Make, steps: list[tuple[int, int, str, bool]]
) -> None:
    """Registers restart (from 0) at the start of an interval that follows a delivered
    reading, like a meter swapped between two samples; the flagged reading itself may be
    lost. Booked energy per register equals what the meter measured. (A restart inside a
    span of lost readings loses the energy counted before it on the meter itself: only a
    board that continues its registers across restarts can carry that, see the README.)"""
    guard = SequenceGuard(tmp_path_factory.mktemp("seq") / "s.db")
    start = 10**9
    registers = {"import": start, "export": start}
    guard.check_and_accept(make(1, import_wh=start, export_wh=start))
    true = {"import": 0, "export": 0}
    booked = {"import": 0, "export": 0}
    flag_pending = previous_lost = False
    delivered = dict(registers)  # the registers of the last delivered reading
    restarted: set[str] = set()  # since the last delivered reading
    for seq, (d_import, d_export, restart, lost) in enumerate(steps, start=2):
        flag = flag_pending
        measured = {"import": d_import, "export": d_export}
        for name in ("import", "export") if restart == "both" else (restart,) if restart else ():
            # Only a restart that leaves the register lower is one anybody can see (the
            # board flags exactly those); one that counts past the old value is invisible.
            if not previous_lost and measured[name] < registers[name]:
                registers[name] = 0
                restarted.add(name)
                flag = True
        registers["import"] += d_import
        registers["export"] += d_export
        true["import"] += d_import
        true["export"] += d_export
        previous_lost = lost
        if lost:  # the energy stays in the cumulative registers for the next reading
            flag_pending = False  # the board flags only the sample right after the restart
            continue
        flag_pending = False
        # ... and after lost readings, still lower when the next reading gets through
        assume(all(registers[name] < delivered[name] for name in restarted))
        restarted.clear()
        reading = make(
            seq,
            import_wh=registers["import"],
            export_wh=registers["export"],
            flags=FLAG_COUNTER_RESET if flag else 0,
        )
        admitted = guard.check_and_accept(reading)
        booked["import"] += admitted.import_delta_wh  # type: ignore[operator]
        booked["export"] += admitted.export_delta_wh  # type: ignore[operator]
        delivered = dict(registers)
    for d_import, d_export, _, lost in reversed(steps):
        if not lost:
            break
        # measured after the last delivered reading: booked with the next one to arrive
        true["import"] -= d_import
        true["export"] -= d_export
    assert booked == true
    guard.close()


def test_two_writers_on_one_file_see_each_others_meters_in_big_batches(tmp_path: Path) -> None:
    """Ingest workers share one database: after the other's commit a batch re-reads its meters.

    More meters than one state query takes (`_QUERY_IDS`), so the chunked
    re-read is crossed; a stale state would accept the other writer's
    readings again (a duplicate key) or miss its replays.
    """
    registry = Registry()
    meters = [f"mg1-m{i:04d}" for i in range(1_100)]
    keys = {m: PrivateKey.from_secret(0x5E9 + i) for i, m in enumerate(meters)}
    for meter_id, key in keys.items():
        registry.add(meter_id, key.public_key(), "mg1", "load")

    def signed(meter_id: str, seq: int, import_wh: int) -> Reading:
        values = {**DEFAULTS, "meter_id": meter_id, "source": "load", "seq": seq,
                  "time": T0 + 60 * seq, "import_wh": import_wh}  # fmt: skip
        return reading.verify(reading.sign_reading(keys[meter_id], **values), registry)

    path = tmp_path / "seq.db"
    with SequenceGuard(path) as first, SequenceGuard(path) as second:
        assert all(type(o) is Admission for o in first.check_and_accept_many(
            [signed(m, 1, 1_000) for m in meters]))  # fmt: skip
        by_second = [signed(m, 2, 1_010) for m in meters[::2]]
        assert all(type(o) is Admission for o in second.check_and_accept_many(by_second))
        # The first writer's cache still says seq 1 for every meter.
        outcomes = first.check_and_accept_many(
            [
                *by_second,
                *(signed(m, 2, 1_020) for m in meters[1::2]),
                *(signed(m, 2, 1_030) for m in meters[::2]),
            ]  # fmt: skip
        )
    half = len(meters[::2])
    duplicates, accepted, replays = outcomes[:half], outcomes[half:-half], outcomes[-half:]
    assert all(type(o) is errors.DuplicateReading for o in duplicates)
    assert all(type(o) is Admission and o.gap == 0 for o in accepted)
    assert all(type(o) is errors.ReplayedReading for o in replays)


# --- where the window's digests live: the state's ring and `accepted` ----------------


def _model_outcomes(
    ops: list[tuple[int, int]], digest: Callable[[int, int], bytes], window: int
) -> tuple[list[str], list[int]]:
    """The module docstring's rules on a dict: each outcome, and the seqs left in the window."""
    accepted: dict[int, bytes] = {}
    last: int | None = None
    outcomes = []
    for seq, variant in ops:
        mine = digest(seq, variant)
        if last is None or seq > last:
            accepted[seq] = mine
            last = seq
            accepted = {s: d for s, d in accepted.items() if s > last - window}
            outcomes.append("ok")
        elif accepted.get(seq) == mine:
            outcomes.append("duplicate")
        elif seq in accepted:
            outcomes.append("replayed")
        else:
            outcomes.append("out_of_order")
    return outcomes, sorted(accepted)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(st.tuples(st.integers(1, 48), st.integers(0, 1)), min_size=1, max_size=70),
    window=st.sampled_from([1, 2, 5, 7, 1024]),
    recent=st.sampled_from([1, 3, 16]),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=20),
    reopen=st.booleans(),
)
def test_ring_and_table_refuse_exactly_as_one_table_of_every_digest(
    tmp_path_factory: pytest.TempPathFactory,
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
    ops: list[tuple[int, int]],
    window: int,
    recent: int,
    cuts: list[int],
    reopen: bool,
) -> None:
    """An attacker's mix of new, resent, altered and stale seqs, in batches of any size.

    Whatever the ring's size, the window, where batches are cut and whether
    the guard is reopened between them, every outcome and every seq still
    held must be what a single table of every accepted digest gives.
    """
    from meterchain import sequence

    monkeypatch.setattr(sequence, "RECENT", recent)
    cache: dict[tuple[int, int], Reading] = {}

    def signed(seq: int, variant: int) -> Reading:
        if (seq, variant) not in cache:  # altered content: another power value, same seq
            cache[(seq, variant)] = make(seq, power_w=100 + variant, import_wh=1_000 + seq)
        return cache[(seq, variant)]

    expected, held = _model_outcomes(ops, lambda s, v: signed(s, v).digest, window)
    path = tmp_path_factory.mktemp("ring") / "seq.db"
    guard = SequenceGuard(path, window=window)
    got: list[str] = []
    i = 0
    for cut in cuts * (len(ops) // len(cuts) + 1):
        if i >= len(ops):
            break
        batch = [signed(*op) for op in ops[i : i + cut]]
        got += [o.reason if isinstance(o, errors.RejectedReading) else "ok"
                for o in guard.check_and_accept_many(batch)]  # fmt: skip
        i += cut
        if reopen:
            guard.close()
            guard = SequenceGuard(path, window=window)
    assert got == expected
    assert guard.accepted_seqs().get(PV_METER, []) == held
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        assert sequence.window_seqs(db, window).get(PV_METER, []) == held
        # Nothing kept below the window beyond one ring's worth of stragglers.
        rows = db.execute("SELECT count(*) FROM accepted").fetchone()[0]
    assert rows <= min(window, max(s for s, _ in ops)) + recent
    guard.close()


def _as_version_1(path: Path) -> None:
    """Rewrite a guard file as version 1 wrote it: every ring entry a row, no ring column."""
    with sqlite3.connect(path) as db:
        for meter_id, recent in db.execute("SELECT meter_id, recent FROM meter_state").fetchall():
            for k in range(0, len(recent), 40):
                seq = int.from_bytes(recent[k : k + 8], "big")
                db.execute(
                    "INSERT INTO accepted VALUES (?, ?, ?)",
                    (meter_id, f"{seq:020d}", recent[k + 8 : k + 40]),
                )
        db.execute("ALTER TABLE meter_state DROP COLUMN recent")
        db.execute("UPDATE sequence_guard_schema SET version = 1")


def test_a_version_1_file_is_migrated_and_keeps_refusing_its_replays(
    tmp_path: Path, make: Make
) -> None:
    """A file written before the ring (every digest in `accepted`) opens, migrates, still knows."""
    path = tmp_path / "seq.db"
    with SequenceGuard(path) as guard:
        guard.check_and_accept_many([make(s, import_wh=1_000 + s) for s in range(1, 6)])
    _as_version_1(path)
    with SequenceGuard(path) as guard:
        assert isinstance(guard.check_and_accept_many([make(3, import_wh=1_003)])[0],
                          errors.DuplicateReading)  # fmt: skip
        replay = make(2, import_wh=1_002, power_w=7)
        assert isinstance(guard.check_and_accept_many([replay])[0], errors.ReplayedReading)
        for s in range(6, 40):
            assert isinstance(guard.check_and_accept(make(s, import_wh=1_000 + s)), Admission)
        assert guard.accepted_seqs() == {PV_METER: list(range(1, 40))}
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM sequence_guard_schema").fetchall() == [(2,)]


def test_a_newer_schema_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "seq.db"
    SequenceGuard(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE sequence_guard_schema SET version = 3")
    with pytest.raises(SequenceStateError, match="schema 3, this build reads 2"):
        SequenceGuard(path)


def test_processes_opening_a_version_1_file_together_migrate_it_once(
    tmp_path: Path, make: Make
) -> None:
    path = tmp_path / "seq.db"
    with SequenceGuard(path) as guard:
        guard.check_and_accept(make(1))
    _as_version_1(path)
    failures = open_together(lambda p: SequenceGuard(p).close(), path, openers=4)
    assert failures == []
    with SequenceGuard(path) as guard:
        assert isinstance(guard.check_and_accept_many([make(1)])[0], errors.DuplicateReading)
