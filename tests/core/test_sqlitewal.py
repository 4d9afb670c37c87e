"""`use_wal`: a new SQLite file switched to WAL while another connection is creating it."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.store import AgentStore
from meterchain.ledger.store import open_store
from meterchain.sequence import SequenceGuard
from meterchain.sqlitewal import use_wal

from .conftest import open_together


def _half_made(path: Path) -> sqlite3.Connection:
    """A connection in the middle of creating `path` (its write lock held, not committed)."""
    creator = sqlite3.connect(path, isolation_level=None)
    creator.execute("BEGIN IMMEDIATE")
    creator.execute("CREATE TABLE half_made (x)")
    return creator


def test_the_switch_waits_for_the_creator_then_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    creator = _half_made(path)
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    modes: list[str] = []
    switcher = threading.Thread(target=lambda: modes.append(use_wal(other, 30.0)))
    switcher.start()
    time.sleep(0.3)
    assert not modes, "the switch did not wait for the creator"
    creator.execute("COMMIT")
    switcher.join(10)
    assert modes == ["wal"]
    assert other.execute("SELECT count(*) FROM half_made").fetchone() == (0,)


def test_the_switch_gives_up_after_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    creator = _half_made(path)
    other = sqlite3.connect(path, isolation_level=None)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(other, 0.2)
    assert time.monotonic() - started >= 0.2
    creator.execute("ROLLBACK")


def _open_together(open_file: Callable[[Path], object], folder: Path) -> None:
    """Three threads open each of 40 new files at the same moment; none may fail."""
    for i in range(40):
        failures = open_together(open_file, folder / f"new{i}.sqlite")
        assert not failures, failures


def test_an_agent_and_its_workers_open_a_new_state_file_together(tmp_path: Path) -> None:
    _open_together(lambda path: SequenceGuard(AgentStore(path).conn), tmp_path)


def test_services_open_a_new_ledger_together(tmp_path: Path) -> None:
    _open_together(lambda path: open_store(str(path)).close(), tmp_path)
