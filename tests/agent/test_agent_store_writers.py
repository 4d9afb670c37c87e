"""Writers of one agent database (the agent, its ingest workers) queue on its write lock."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from edge_agent.store import AgentStore

HOUR = 1_700_000_000 // 3600 * 3600


def _lock_is_free(db: Path) -> bool:
    with open(db.with_name(db.name + ".writelock"), "a+b") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe, fcntl.LOCK_UN)
        return True


def test_two_writers_interleave_every_transaction_without_a_lock_error(tmp_path: Path) -> None:
    db = tmp_path / "agent.sqlite"
    stores = [AgentStore(db), AgentStore(db)]  # two connections, like two worker processes
    errors: list[BaseException] = []

    def write(store: AgentStore, meter: str) -> None:
        try:
            for _ in range(200):
                with store.transaction():
                    store.fold(meter, "mg1", "load", HOUR, HOUR + 60, 1, 0)
        except BaseException as exc:  # a "database is locked" would land here
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, f"m{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rows = dict(stores[0].conn.execute("SELECT meter_id, import_wh FROM hourly_energy"))
    assert rows == {"m0": 200, "m1": 200}
    assert _lock_is_free(db)
    for s in stores:
        s.close()


def test_the_other_writer_waits_until_commit_and_a_failed_transaction_frees_the_lock(
    tmp_path: Path,
) -> None:
    db = tmp_path / "agent.sqlite"
    first, second = AgentStore(db), AgentStore(db)
    entered = threading.Event()
    with first.transaction():
        first.fold("m0", "mg1", "load", HOUR, HOUR + 60, 5, 0)
        assert not _lock_is_free(db)

        def other() -> None:
            with second.transaction():
                entered.set()

        waiter = threading.Thread(target=other)
        waiter.start()
        assert not entered.wait(0.3)  # held while the first writer's transaction is open
    waiter.join(10)
    assert entered.is_set()
    with pytest.raises(RuntimeError), first.transaction():
        first.fold("m0", "mg1", "load", HOUR, HOUR + 60, 7, 0)
        raise RuntimeError("the store failed mid-batch")
    assert _lock_is_free(db)
    assert list(second.conn.execute("SELECT import_wh FROM hourly_energy")) == [(5,)]
    first.close()
    second.close()
