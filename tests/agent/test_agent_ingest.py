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
from meterchain.reading import FLAG_COUNTER_RESET
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
            board.reading(T0 + 200, 120),  # counter runs backwards
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
