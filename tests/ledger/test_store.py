"""Both stores behave alike: idempotent ingest and commit, conflicts refused, nothing partial."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from ledger_world import H0, T0, build_world, hour_readings

from meterchain.ledger.chain import verify_store
from meterchain.ledger.sandbox import Chain, Sandbox, reading_batch
from meterchain.ledger.store import LedgerConflict, StoreError, open_store


def _fresh(url: str) -> Chain:
    sb = Sandbox()
    chain = Chain(sb, open_store(url))
    chain.genesis(T0, [sb.participant("mg1", "microgrid", T0)])
    chain.commit([sb.meter("pv1", "mg1", "pv", T0)], T0 + 1)
    return chain


def test_same_reading_twice_is_stored_once(ledger_url: str) -> None:
    chain = _fresh(ledger_url)
    sb, store = chain.sandbox, chain.store
    rs = [sb.reading("pv1", s, T0 + 60 * s, 0, 100 * s, "pv") for s in range(1, 6)]
    first = store.ingest_readings(rs)
    again = store.ingest_readings(rs + rs[:2])
    assert (first.new, first.duplicate, first.conflicts) == (5, 0, [])
    assert (again.new, again.duplicate, again.conflicts) == (0, 7, [])
    assert [r.digest for r in store.inbox_readings()] == [r.digest for r in rs]
    # Once in a block, a re-delivered reading is still recognised and not queued again.
    chain.commit_readings(store.inbox_readings(), T0 + 3600)
    assert store.inbox_readings() == []
    late = store.ingest_readings(rs[:3])
    assert (late.new, late.duplicate) == (0, 3)
    assert store.reading_count() == 5
    store.close()


def test_a_different_reading_with_a_taken_sequence_is_refused(ledger_url: str) -> None:
    chain = _fresh(ledger_url)
    sb, store = chain.sandbox, chain.store
    store.ingest_readings([sb.reading("pv1", 7, T0 + 60, 0, 100, "pv")])
    forged = sb.reading("pv1", 7, T0 + 61, 0, 999, "pv")
    result = store.ingest_readings([forged])
    assert result.new == 0
    assert result.conflicts == ["meter pv1 seq 7: a different reading has this sequence"]
    assert [r.export_wh for r in store.inbox_readings()] == [100]
    store.close()


def test_same_block_twice_is_a_no_op_and_a_rival_block_is_refused(ledger_url: str) -> None:
    chain = _fresh(ledger_url)
    sb, store = chain.sandbox, chain.store
    rs = [sb.reading("pv1", s, T0 + 60 * s, 0, 100 * s, "pv") for s in range(1, 4)]
    block = chain.commit_readings(rs, T0 + 3600)
    tx, ordered = reading_batch(H0, rs)
    assert store.append(block, {0: ordered}) is False
    assert store.reading_count() == 3
    rival = sb.seal(
        type(block).build(
            market="m1", height=block.height, prev=block.header.prev, time=block.header.time + 1,
            round=0, proposer="aggregator", txs=block.txs,
        )
    )  # fmt: skip
    with pytest.raises(LedgerConflict, match=f"block {block.height}: another block"):
        store.append(rival, {0: ordered})
    gap = sb.seal(
        type(block).build(
            market="m1", height=block.height + 2, prev=block.hash, time=block.header.time,
            round=0, proposer="aggregator", txs=[],
        )
    )  # fmt: skip
    with pytest.raises(LedgerConflict, match="does not extend the head"):
        store.append(gap)
    verify_store(store)
    store.close()


def test_a_reading_committed_twice_rolls_back_the_whole_block(ledger_url: str) -> None:
    chain = _fresh(ledger_url)
    sb, store = chain.sandbox, chain.store
    rs = [sb.reading("pv1", s, T0 + 60 * s, 0, 100 * s, "pv") for s in range(1, 4)]
    chain.commit_readings(rs, T0 + 3600)
    head = store.head()
    tx, ordered = reading_batch(H0, rs)
    # A block that skips the state checks and re-commits the same readings.
    block = sb.seal(chain.build([tx], T0 + 3700))
    with pytest.raises(LedgerConflict, match="already committed"):
        store.append(block, {0: ordered})
    assert store.head() == head
    assert store.reading_count() == 3
    verify_store(store)
    store.close()


def test_a_block_without_a_quorum_certificate_is_not_stored(ledger_url: str) -> None:
    chain = _fresh(ledger_url)
    block = chain.build([], T0 + 5)
    with pytest.raises(LedgerConflict, match="without a QC"):
        chain.store.append(block)
    chain.store.close()


def test_world_reopens_and_verifies(ledger_url: str) -> None:
    world = build_world(open_store(ledger_url))
    head = world.store.head()
    world.store.close()
    with open_store(ledger_url) as store:
        assert store.head() == head
        state, report = verify_store(store)
        assert report.blocks == head[0] + 1 if head else 0
        assert report.readings == 48 and report.signatures_checked == 48
        assert state is not None and state.orders["o2"].status == "vetoed"


def test_pending_transactions_wait_once(ledger_url: str) -> None:
    chain = _fresh(ledger_url)
    sb, store = chain.sandbox, chain.store
    tx = sb.participant("mg9", "consumer", T0 + 5)
    assert store.submit_tx(tx, T0 + 5) is True
    assert store.submit_tx(tx, T0 + 6) is False
    assert [t.hash for t in store.pending_txs()] == [tx.hash]
    chain.commit(store.pending_txs(), T0 + 10)
    assert store.pending_txs() == []
    assert store.submit_tx(tx, T0 + 11) is False
    store.close()


def test_read_only_tools_never_turn_a_database_into_a_ledger(ledger_url: str, capsys) -> None:
    from meterchain.ledger.cli import main as ledger_main

    with pytest.raises(StoreError, match="not a MeterChain ledger"):
        open_store(ledger_url, create=False)
    if "://" not in ledger_url:
        import sqlite3

        sqlite3.connect(ledger_url).close()  # an empty file that exists
        assert ledger_main(["verify", ledger_url]) == 2
        assert "not a MeterChain ledger" in capsys.readouterr().err
    with open_store(ledger_url) as store:  # creating is explicit
        assert store.head() is None
    with open_store(ledger_url, create=False) as store:
        assert store.head() is None


def test_unopenable_ledgers_say_why(tmp_path) -> None:
    with pytest.raises(StoreError, match="cannot open SQLite ledger"):
        open_store(str(tmp_path / "missing-dir" / "ledger.db"))
    with pytest.raises(StoreError, match="cannot open PostgreSQL ledger"):
        open_store(f"postgresql://nobody@/none?host={tmp_path}&port=1")


def test_hour_readings_are_all_in_their_hour() -> None:
    rs = hour_readings(Sandbox(), H0 + 3, 1)
    assert {r.hour for r in rs} == {H0 + 3}


def test_a_new_ledger_opened_while_another_connection_creates_it_waits(tmp_path) -> None:
    """While one connection is in the middle of creating the file, another that opens it
    waits its turn (SQLite answers "database is locked" at once to the switch to WAL;
    the aggregator and a reader racing at start-up saw that) and finds one ledger."""
    path = tmp_path / "ledger.db"
    creator = sqlite3.connect(path, isolation_level=None)
    creator.execute("BEGIN IMMEDIATE")
    creator.execute("CREATE TABLE half_made (x)")
    opened: list[object] = []

    def open_it() -> None:
        try:
            with open_store(str(path)) as store:
                opened.append(store.head())
        except StoreError as exc:
            opened.append(exc)

    opener = threading.Thread(target=open_it)
    opener.start()
    time.sleep(0.3)
    assert not opened, f"the open did not wait for the creator to finish: {opened}"
    creator.execute("COMMIT")
    creator.close()
    opener.join(35)
    assert opened == [None], f"the open failed: {opened}"  # a ledger, still empty

