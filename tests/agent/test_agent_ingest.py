"""The ingest path in-process: verify, guard and hourly energy commit together, exactly once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from agent_site import BoardMeter

from edge_agent.energy import HOUR_S
from edge_agent.ingest import Ingest, IngestCounts, Outcome
from edge_agent.store import AgentStore, StoreView
from meterchain.keys import PrivateKey
from meterchain.reading import FLAG_CLOCK_NOT_SYNCED, FLAG_COUNTER_RESET, MAX_TIME
from meterchain.registry import Registry
from meterchain.sequence import SequenceGuard

T0 = 1_700_000_000 - 1_700_000_000 % HOUR_S


@pytest.fixture
def board() -> BoardMeter:
    return BoardMeter("mg1-load", PrivateKey.generate(), "mg1", "load", "")


@pytest.fixture
def setup(tmp_path: Path, board: BoardMeter) -> tuple[Ingest, IngestCounts, StoreView]:
    registry = Registry()
    registry.add(board.meter_id, board.key.public_key(), board.owner, board.source)
    store = AgentStore(tmp_path / "agent.sqlite")
    counts = IngestCounts()
    ingest = Ingest(
        store, registry, SequenceGuard(store.conn), observer=counts, clock=lambda: T0 + 10 * HOUR_S
    )
    return ingest, counts, StoreView(tmp_path / "agent.sqlite")


def _energy(view: StoreView) -> dict[int, tuple[int, int]]:
    return {row.hour: (row.import_wh, row.export_wh) for row in view.hourly()}


def test_energy_is_folded_per_hour_from_register_deltas(setup, board) -> None:
    ingest, counts, view = setup
    results = ingest.process_batch(
        [
            board.reading(T0 + 1800, 1000),  # baseline
            board.reading(T0 + 3600 + 1800, 1600),  # 600 Wh over two half hours
            board.reading(T0 + 2 * 3600, 1700),
        ]
    )
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 3
    assert _energy(view) == {T0: (300, 0), T0 + HOUR_S: (400, 0)}
    assert counts.accepted_n == 3


def test_unsynced_clock_times_are_not_trusted_for_hours(setup, board) -> None:
    """Time 0, then 2099, from an unsynced board: one interval at arrival, not 1.1M hours."""
    ingest, _, view = setup
    unsynced = FLAG_CLOCK_NOT_SYNCED
    results = ingest.process_batch(
        [board.reading(0, 100, flags=unsynced), board.reading(MAX_TIME - 1, 160, flags=unsynced)]
    )
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 2
    # both arrived at the agent's clock (T0 + 10 h): the 60 Wh go into that hour
    assert _energy(view) == {T0 + 10 * HOUR_S: (60, 0)}


def test_duplicates_change_nothing_and_rejections_are_counted(setup, board) -> None:
    ingest, counts, view = setup
    first = board.reading(T0, 100)
    second = board.reading(T0 + 60, 150)
    ingest.process_batch([first, second])
    before = _energy(view)
    forged = bytearray(board.reading(T0 + 120, 170))
    forged[-1] ^= 1
    other_key = BoardMeter("mg1-load", PrivateKey.generate(), "mg1", "load", "")
    results = ingest.process_batch(
        [
            second,  # MQTT re-delivery: byte-identical
            board.reading(T0 + 90, 999, seq=2),  # same seq, other content: a replay
            bytes(forged),
            other_key.reading(T0 + 130, 180, seq=9),  # signed by a key not registered
            BoardMeter("mg9-x", PrivateKey.generate(), "mg9", "load", "").reading(T0, 1),
            board.reading(T0 + 200, 120, seq=3),  # counter runs backwards, right after seq 2
            b"\xd2\x84\x43",  # truncated COSE_Sign1
        ]
    )
    assert [(r.outcome, r.reason) for r in results] == [
        (Outcome.DUPLICATE, "duplicate"),
        (Outcome.REJECTED, "replayed"),
        (Outcome.REJECTED, "bad_signature"),
        (Outcome.REJECTED, "bad_signature"),
        (Outcome.REJECTED, "unknown_meter"),
        (Outcome.REJECTED, "counter_backwards"),
        (Outcome.REJECTED, "malformed_cbor"),
    ]
    assert _energy(view) == before == {T0: (50, 0)}
    assert counts.duplicate_n == 1
    assert counts.rejected_by_reason == {
        "replayed": 1,
        "bad_signature": 2,
        "unknown_meter": 1,
        "counter_backwards": 1,
        "malformed_cbor": 1,
    }


def test_counter_reset_counts_energy_since_the_reset(setup, board) -> None:
    ingest, _, view = setup
    ingest.process_batch([board.reading(T0, 5000), board.reading(T0 + 60, 5100)])
    results = ingest.process_batch([board.reading(T0 + 120, 30, flags=FLAG_COUNTER_RESET)])
    assert results[0].outcome is Outcome.ACCEPTED
    assert _energy(view) == {T0: (130, 0)}


def test_a_failed_commit_leaves_guard_and_energy_untouched(setup, board) -> None:
    ingest, _, view = setup
    ingest.process_batch([board.reading(T0, 0), board.reading(T0 + 60, 10)])
    ingest.store.conn.execute(
        "CREATE TRIGGER boom BEFORE UPDATE ON hourly_energy "
        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    reading = board.reading(T0 + 120, 20)
    with pytest.raises(sqlite3.Error):
        ingest.process_batch([reading])
    assert _energy(view) == {T0: (10, 0)}
    ingest.store.conn.execute("DROP TRIGGER boom")
    # The guard did not record it either: the re-delivery is accepted, not a duplicate.
    assert ingest.process(reading).outcome is Outcome.ACCEPTED
    assert _energy(view) == {T0: (20, 0)}


def test_gateway_signs_modbus_samples_and_refuses_impossible_ones(tmp_path: Path) -> None:
    from edge_agent.gateway import gateway_key
    from edge_agent.modbus import MeterSample
    from edge_agent.worker import GatewayIdentity, IngestWorker
    from meterchain.reading import FLAG_GATEWAY_ATTESTED, verify

    node_key = PrivateKey.generate()
    registry = Registry()
    registry.add("mg1-sdm", gateway_key(node_key, "m1", "mg1-sdm").public_key(), "mg1", "load")
    store = AgentStore(tmp_path / "agent.sqlite")
    counts = IngestCounts()
    ingest = Ingest(
        store, registry, SequenceGuard(store.conn), observer=counts, clock=lambda: T0 + HOUR_S
    )
    worker = IngestWorker(ingest, gateway=GatewayIdentity(node_key, "m1", "mg1", publish=True))
    worker.start()
    try:
        first = worker.submit_sample("mg1-sdm", "load", T0, MeterSample(5000, 0, 900)).result(10)
        glitch = worker.submit_sample(
            "mg1-sdm", "load", T0 + 10, MeterSample(5001, 0, 20_000_000)
        ).result(10)
        second = worker.submit_sample("mg1-sdm", "load", T0 + 20, MeterSample(5010, 0, 800)).result(
            10
        )
        swapped = worker.submit_sample("mg1-sdm", "load", T0 + 30, MeterSample(7, 0, 800)).result(
            10
        )
    finally:
        worker.stop()
    assert first.outcome is Outcome.ACCEPTED and second.outcome is Outcome.ACCEPTED
    assert (glitch.outcome, glitch.reason) == (Outcome.REJECTED, "field_out_of_range")
    assert worker.failure is None, "a meter glitch must not stop the writer"
    assert second.reading is not None and second.reading.seq == 2
    assert second.reading.flags & FLAG_GATEWAY_ATTESTED
    # A meter replaced by a fresh one: registers restart, attested as a counter reset.
    assert swapped.outcome is Outcome.ACCEPTED and swapped.reading is not None
    assert swapped.reading.counter_reset
    view = StoreView(tmp_path / "agent.sqlite")
    assert _energy(view) == {T0: (10 + 7, 0)}
    outbox = view.outbox()
    assert [verify(payload, registry).seq for _, _, payload in outbox] == [1, 2, 3]
    assert {topic for _, topic, _ in outbox} == {"mc/m1/c/mg1/gw/mg1-sdm"}
    assert counts.rejected_by_reason == {"field_out_of_range": 1}


# -- end-to-end delivery: watermarks, gaps, refusals for good -----------------------------


class Acks:
    """What the ingest would publish, and a settable monotonic clock."""

    def __init__(self) -> None:
        self.published: list[dict[str, int]] = []
        self.now = 1000.0

    def __call__(self, watermarks: dict[str, int]) -> None:
        self.published.append(dict(watermarks))


@pytest.fixture
def acked(tmp_path: Path, board: BoardMeter) -> tuple[Ingest, IngestCounts, StoreView, Acks]:
    registry = Registry()
    registry.add(board.meter_id, board.key.public_key(), board.owner, board.source)
    other = BoardMeter("mg2-load", PrivateKey.from_secret(77), "mg2", "load", "")
    registry.add(other.meter_id, other.key.public_key(), other.owner, other.source)
    store = AgentStore(tmp_path / "agent.sqlite")
    counts, acks = IngestCounts(), Acks()
    ingest = Ingest(
        store,
        registry,
        SequenceGuard(store.conn),
        observer=counts,
        clock=lambda: T0 + 10 * HOUR_S,
        acknowledge="mg1",
        gap_hold_s=60,
        monotonic=lambda: acks.now,
        on_watermarks=acks,
    )
    return ingest, counts, StoreView(tmp_path / "agent.sqlite"), acks


def _send(ingest: Ingest, board: BoardMeter, *payloads: bytes, sender: str = "") -> list[Outcome]:
    senders = [sender or board.meter_id] * len(payloads)
    results = ingest.process_batch(list(payloads), senders=senders)
    return [r.outcome for r in results]


def test_watermark_covers_only_what_is_committed_without_a_gap(acked, board) -> None:
    ingest, counts, view, acks = acked
    r1, r2, r3, r4, r5 = (board.reading(T0 + 60 * i, 100 + i) for i in range(5))
    assert _send(ingest, board, r1, r2) == [Outcome.ACCEPTED] * 2
    assert acks.published == [{"mg1-load": 2}]
    assert view.watermarks() == {"mg1-load": 2}
    # r3 was lost at the broker: r4 and r5 arrive above a gap and are held back.
    assert _send(ingest, board, r4, r5) == [Outcome.DEFERRED] * 2
    assert acks.published[-1] == {"mg1-load": 2}, "the board must keep r3, r4 and r5"
    assert _energy(view) == {T0: (1, 0)} and counts.deferred_n == 2
    # The board rewinds to watermark + 1: everything lands, each once.
    assert _send(ingest, board, r3, r4, r5) == [Outcome.ACCEPTED] * 3
    assert acks.published[-1] == {"mg1-load": 5} and view.watermarks() == {"mg1-load": 5}
    assert _send(ingest, board, r4) == [Outcome.DUPLICATE]
    assert acks.published[-1] == {"mg1-load": 5}, "a resend is acknowledged again"
    assert _energy(view) == {T0: (4, 0)} and counts.accepted_n == 5


def test_refusals_for_good_are_handled_logged_and_acknowledged(acked, board) -> None:
    ingest, counts, view, acks = acked
    _send(ingest, board, board.reading(T0, 500), board.reading(T0 + 60, 600))
    # backwards right after the last accepted reading (after a gap it would be a restart
    # whose flagged reading was lost: meterchain.sequence)
    backwards = board.reading(T0 + 180, 10)
    forged = bytearray(board.reading(T0 + 120, 700))
    forged[-1] ^= 1
    outcomes = _send(ingest, board, backwards, bytes(forged))
    assert outcomes == [Outcome.REJECTED, Outcome.REJECTED]
    assert view.watermarks() == {"mg1-load": 4} and acks.published[-1] == {"mg1-load": 4}
    log = view.rejections()
    assert [(r.meter_id, r.seq, r.reason, r.sender) for r in log] == [
        ("mg1-load", 3, "counter_backwards", "mg1-load"),
        ("mg1-load", 4, "bad_signature", "mg1-load"),
    ]
    assert log[0].payload == backwards and log[1].payload == bytes(forged)
    assert _energy(view) == {T0: (100, 0)}


def test_what_may_change_later_or_names_another_sender_is_not_acknowledged(acked, board) -> None:
    ingest, _, view, acks = acked
    _send(ingest, board, board.reading(T0, 1))
    future = board.reading(T0 + 11 * HOUR_S, 2)  # an hour beyond the agent's clock
    assert _send(ingest, board, future) == [Outcome.REJECTED]
    forged = bytearray(board.reading(T0 + 60, 3, seq=2))
    forged[-1] ^= 1
    # Published on another meter's topic: it cannot speak for mg1-load's sequence.
    assert _send(ingest, board, bytes(forged), sender="mg1-other") == [Outcome.REJECTED]
    assert view.watermarks() == {"mg1-load": 1}
    assert [(r.reason, r.sender) for r in view.rejections()] == [
        ("clock_skew", "mg1-load"),
        ("bad_signature", "mg1-other"),
    ]
    assert all(published == {"mg1-load": 1} for published in acks.published)


def test_a_real_gap_is_accepted_once_it_outlasts_the_hold(acked, board) -> None:
    ingest, _, view, acks = acked
    board.seq = 10  # a board that thinned its spool: 1..10 and 12 are gone for good
    r11, r13 = board.reading(T0, 5), board.reading(T0 + 60, 6, seq=13)
    r14 = board.reading(T0 + 120, 7, seq=14)
    assert _send(ingest, board, r11, r13, r14) == [Outcome.DEFERRED] * 3
    acks.now += 59
    assert _send(ingest, board, r11, r13, r14) == [Outcome.DEFERRED] * 3
    acks.now += 1
    # Nothing below 11 came in a minute of resends: accepted, and the next gap with it.
    assert _send(ingest, board, r11, r13, r14) == [Outcome.ACCEPTED] * 3
    assert view.watermarks() == {"mg1-load": 14}
    assert acks.published[-1] == {"mg1-load": 14}


def test_a_gap_below_a_known_reading_is_never_skipped(acked, board) -> None:
    ingest, _, view, acks = acked
    r1, r3, r5 = (board.reading(T0 + 60 * i, i, seq=i) for i in (1, 3, 5))
    _send(ingest, board, r1)
    assert _send(ingest, board, r3, r5) == [Outcome.DEFERRED] * 2
    acks.now += 3600
    # r3 is lost again on this pass, but it exists: r5 must wait for it.
    assert _send(ingest, board, r5) == [Outcome.DEFERRED]
    assert _send(ingest, board, r3, r5) == [Outcome.ACCEPTED] * 2
    assert view.watermarks() == {"mg1-load": 5}


def test_another_microgrids_meter_is_neither_held_nor_acknowledged(acked) -> None:
    ingest, _, view, acks = acked
    other = BoardMeter("mg2-load", PrivateKey.from_secret(77), "mg2", "load", "")
    assert _send(ingest, other, other.reading(T0, 1, seq=7)) == [Outcome.ACCEPTED]
    assert view.watermarks() == {} and acks.published == []


def test_a_failed_commit_acknowledges_nothing(acked, board) -> None:
    ingest, _, view, acks = acked
    _send(ingest, board, board.reading(T0, 0))
    ingest.store.conn.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON hourly_energy "
        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    second = board.reading(T0 + 60, 10)
    with pytest.raises(sqlite3.Error):
        _send(ingest, board, second)
    assert view.watermarks() == {"mg1-load": 1} and acks.published == [{"mg1-load": 1}]
    ingest.store.conn.execute("DROP TRIGGER boom")
    assert _send(ingest, board, second) == [Outcome.ACCEPTED]
    assert acks.published[-1] == {"mg1-load": 2}


def test_claimed_identity_reads_only_a_canonical_cose_sign1(board) -> None:
    from cbor2 import CBORTag

    from edge_agent.ingest import claimed_identity
    from meterchain import codec

    good = board.reading(T0, 1, seq=42)
    assert claimed_identity(good) == ("mg1-load", 42)
    protected, unprotected, _, signature = codec.decode(good, tags=frozenset({18})).value

    def wrapped(fields: dict) -> bytes:
        inner = [protected, dict(unprotected), codec.encode(fields), signature]
        return codec.encode(CBORTag(18, inner))

    assert claimed_identity(wrapped({1: "m", 2: 7})) == ("m", 7)
    for bad in (
        b"",
        b"\xd2\x84\x43",  # truncated
        good + b"\x00",  # trailing byte
        codec.encode([protected, {}, b"", signature]),  # untagged
        codec.encode({1: "mg1-load", 2: 42}),  # a bare payload
        wrapped({1: "m", 2: "7"}),
        wrapped({1: "m", 2: -1}),
        wrapped({1: b"m", 2: 7}),
        wrapped({2: 7}),
    ):
        assert claimed_identity(bad) is None, bad


def test_the_rejection_log_is_bounded_in_rows_and_bytes(acked, board) -> None:
    ingest, _, view, _ = acked
    ingest.store.rejection_limit = 3
    huge = b"\xd2" + b"\x00" * 1_000_000
    for _ in range(5):
        _send(ingest, board, huge)
    log = view.rejections()
    assert len(log) == 3 and ingest.store.rejections_dropped == 2
    assert all(r.reason == "not_cose_sign1" and len(r.payload) == 4096 for r in log)


def test_a_meter_accepted_before_acknowledgements_starts_from_its_last_seq(tmp_path, board) -> None:
    registry = Registry()
    registry.add(board.meter_id, board.key.public_key(), board.owner, board.source)
    store = AgentStore(tmp_path / "agent.sqlite")
    guard = SequenceGuard(store.conn)
    plain = Ingest(store, registry, guard, clock=lambda: T0 + HOUR_S)
    plain.process_batch([board.reading(T0 + i, i) for i in range(3)])  # no acknowledgements
    acks = Acks()
    upgraded = Ingest(
        store, registry, guard, clock=lambda: T0 + HOUR_S, acknowledge="mg1", on_watermarks=acks
    )
    assert upgraded.process(board.reading(T0 + 10, 10)).outcome is Outcome.ACCEPTED
    assert acks.published == [{"mg1-load": 4}]


def test_per_meter_metric_series_stay_bounded() -> None:
    from prometheus_client import generate_latest

    from edge_agent.metrics import AgentMetrics
    from meterchain.reading import Reading

    now = T0 + HOUR_S
    metrics = AgentMetrics(clock=lambda: now, max_meter_series=100)
    for i in range(10_000):
        reading = Reading(f"mg1-m{i:05d}", 1, T0 + i % 600, 0, 0, 0, 0, "load", b"", b"")
        metrics.accepted(reading, "mg1")
    text = generate_latest(metrics.registry).decode()
    assert text.count("meterchain_agent_last_reading_age_seconds{") == 100
    assert 'meterchain_agent_readings_accepted_total{meter="_other"} 9900.0' in text
    assert "meterchain_agent_oldest_reading_age_seconds 3600.0" in text
    assert len(text) < 50_000


@pytest.fixture
def verify_calls(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Counts the ingest path's signature checks (one entry a `reading.verify` call)."""
    import edge_agent.ingest as ingest_module

    calls: list[int] = []
    real_verify = ingest_module.verify

    def counting_verify(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "verify", counting_verify)
    return calls


def test_a_resent_reading_is_not_verified_again_but_a_changed_one_is(acked, board, verify_calls):
    ingest, _, _, _ = acked
    calls = verify_calls
    reading = board.reading(T0, 5)
    assert _send(ingest, board, reading) == [Outcome.ACCEPTED]
    assert _send(ingest, board, reading, reading) == [Outcome.DUPLICATE] * 2
    assert len(calls) == 1
    forged = bytearray(reading)
    forged[-1] ^= 1
    assert _send(ingest, board, bytes(forged)) == [Outcome.REJECTED]
    assert len(calls) == 2


def test_the_verified_cache_forgets_the_oldest_first(acked, board, verify_calls, monkeypatch):
    """Bounded: at the limit the oldest reading is verified again, the newer ones are not."""
    import edge_agent.ingest as ingest_module

    ingest, _, _, _ = acked
    monkeypatch.setattr(ingest_module, "VERIFIED_CACHE", 3)
    calls = verify_calls
    readings = [board.reading(T0 + 60 * k, 5 + k) for k in range(5)]
    for reading in readings:
        ingest.check(reading)
    assert len(calls) == 5 and len(ingest._verified) == 3
    for reading in readings[2:]:  # still known: no new check
        ingest.check(reading)
    assert len(calls) == 5
    ingest.check(readings[0])  # forgotten: checked again, and the oldest kept one goes
    assert len(calls) == 6 and len(ingest._verified) == 3
    ingest.check(readings[2])
    assert len(calls) == 7


def _registry(*boards: BoardMeter) -> Registry:
    registry = Registry()
    for b in boards:
        registry.add(b.meter_id, b.key.public_key(), b.owner, b.source)
    return registry


def test_a_registry_swap_takes_effect_for_readings_checked_before_it(acked, board) -> None:
    """The agent's reload: a new meter is taken up, and what was checked against the old
    registry but commits after the swap is judged by the new one.

    Worst case for the swap: the readings were verified (and cached) against the
    old entries and reach `commit` only after it.
    """
    ingest, counts, view, acks = acked
    newcomer = BoardMeter("mg1-new", PrivateKey.generate(), "mg1", "pv", "")
    early = newcomer.reading(T0, 10)
    assert _send(ingest, newcomer, early) == [Outcome.REJECTED]  # unknown: not final
    assert view.watermarks() == {}
    assert _send(ingest, board, board.reading(T0, 1)) == [Outcome.ACCEPTED]
    signed = [board.reading(T0 + 60 * k, 1 + k) for k in (1, 2)]
    in_flight = [ingest.check(payload) for payload in signed]
    rekeyed = BoardMeter(board.meter_id, PrivateKey.generate(), board.owner, board.source, "")
    rekeyed.seq = board.seq
    other = BoardMeter("mg2-load", PrivateKey.from_secret(77), "mg2", "load", "")
    changed = ingest.set_registry(_registry(rekeyed, newcomer, other))
    assert changed == {board.meter_id}
    # Checked against the old key, committed after the swap: the old signature no longer counts.
    results = ingest.commit(in_flight, senders=[board.meter_id] * 2)
    assert [(r.outcome, r.reason) for r in results] == [(Outcome.REJECTED, "bad_signature")] * 2
    # Their resends (verified and cached before the swap) and new old-key readings too.
    assert _send(ingest, board, *signed) == [Outcome.REJECTED] * 2
    assert _send(ingest, board, board.reading(T0 + 180, 4)) == [Outcome.REJECTED]
    assert _send(ingest, rekeyed, rekeyed.reading(T0 + 240, 5)) == [Outcome.ACCEPTED]
    # The newcomer's resend (the board kept it: it was never acknowledged) is accepted.
    assert _send(ingest, newcomer, early) == [Outcome.ACCEPTED]
    assert view.watermarks()["mg1-new"] == 1
    # A meter removed while its readings are on their way: not final, not acknowledged,
    # and the commit does not fail (the writer would stop the agent).
    in_flight = [ingest.check(newcomer.reading(T0 + 60, 11))]
    assert ingest.set_registry(_registry(rekeyed, other)) == {"mg1-new"}
    (result,) = ingest.commit(in_flight, senders=["mg1-new"])
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "unknown_meter")
    assert view.watermarks()["mg1-new"] == 1
    assert counts.accepted_n == 3
