"""kill -9 during a block commit never leaves a partial block, on SQLite and on PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ledger_world import build_world

from meterchain.ledger.chain import verify_store
from meterchain.ledger.store import open_store

CHILD = Path(__file__).resolve().parent / "crash_child.py"
STEPS = ("begin", "block", "txs", "readings", "inbox", "committed")


def _child(url: str, step: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), url, step, str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _table_counts(url: str) -> dict[str, int]:
    with open_store(url) as store:
        return {
            t: int(store._execute(f"SELECT COUNT(*) FROM {t}")[0][0])
            for t in ("blocks", "txs", "readings", "inbox")
        }


def test_sigkill_at_every_commit_step_leaves_all_or_nothing(ledger_url: str) -> None:
    world = build_world(open_store(ledger_url))
    head = world.store.head()
    assert head is not None
    world.store.close()
    before = _table_counts(ledger_url)
    for step in STEPS:
        child = _child(ledger_url, step, 1)
        _, err = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, err
        with open_store(ledger_url) as store:
            verify_store(store)  # whatever survived is a valid ledger
            now = store.head()
        counts = _table_counts(ledger_url)
        if step == "committed":
            # Killed after COMMIT returned: the block is whole and durable.
            assert now is not None and now[0] == head[0] + 1
            assert counts["readings"] == before["readings"] + 24
            assert counts["inbox"] == 0
        else:
            assert now == head, step
            assert {k: counts[k] for k in ("blocks", "txs", "readings")} == {
                k: before[k] for k in ("blocks", "txs", "readings")
            }, step
            # The ingested readings are durable even though their block died.
            assert counts["inbox"] == 24, step
    # A clean run afterwards commits the next block on top of whatever is there.
    done = _child(ledger_url, "none", 1)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    with open_store(ledger_url) as store:
        _, report = verify_store(store)
    assert report.blocks == head[0] + 3


def test_sigkill_from_outside_at_a_random_moment(ledger_url: str) -> None:
    world = build_world(open_store(ledger_url))
    world.store.close()
    child = _child(ledger_url, "none", 200)
    assert child.stdout is not None
    # Let it commit a few blocks, then kill it in the middle of whatever it is doing.
    for _ in range(3):
        line = child.stdout.readline()
        assert line.startswith("committed"), child.stderr.read() if child.stderr else ""
    time.sleep(0.05)
    child.kill()
    child.wait(timeout=30)
    with open_store(ledger_url) as store:
        _, report = verify_store(store)
        counts = _table_counts(ledger_url)
    assert report.blocks >= 11
    # Every stored reading belongs to a whole, verified block.
    assert counts["readings"] == report.readings


@pytest.mark.parametrize("step", ["txs"])
def test_a_crashed_commit_can_be_redone(ledger_url: str, step: str) -> None:
    world = build_world(open_store(ledger_url))
    world.store.close()
    child = _child(ledger_url, step, 1)
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL
    again = _child(ledger_url, "none", 1)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    with open_store(ledger_url) as store:
        _, report = verify_store(store)
        assert store.inbox_readings() == []
    assert report.readings == 48 + 24
