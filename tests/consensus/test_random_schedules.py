"""20,000 seeded adversarial schedules per run: agreement, one finality certificate, the bound.

Each schedule (see `scenarios.random_scenario`) draws n in {3, 4, 5, 7}, a
delta, two overlapping rounds (a clearing then a settlement), up to
(n-1)//2 faulty nodes -- mostly the adaptive coalition of `adversary`
(point to point, timed to land on a victim's deadline +-1 ms, withholding,
up to three signed variants per view, double votes, bundled evidence, lying
statuses, selective forwarding, floods), the rest lying backups, tampering or
equivocating primaries, crashes with and without restart, nodes that lose
messages, or Twins -- replays of old messages, and a scheduler that picks
every correct-to-correct delay within delta (uniformly, at the extremes, to
land on the receiver's next deadline, or slow around one victim). Fixed seeds
run every time, fresh seeds add new ground each run; the campaign is split
into parametrised chunks, each run on two processes, and a failure prints its
seeds. `MC_CONSENSUS_SCHEDULES=N` runs N instead of 20,000 (a bigger campaign
outside CI); `python -m tests.consensus.test_random_schedules SEED` replays
one with its trace.

Most schedules sign with the simulator-only keyed hash (same interface,
about 2x faster); a block of schedules runs with real P-256 signatures.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.consensus.scenarios import PropertyViolation, build, check, random_scenario

SCHEDULES = int(os.environ.get("MC_CONSENSUS_SCHEDULES", "20000"))
FRESH_SHARE = 10  # one schedule in ten is a fresh seed
CHUNKS = 10
REAL_P256_SEEDS = range(100_000, 100_300)
FRESH_BASE = random.SystemRandom().randrange(10**6, 10**9)


def run_all(items: Sequence[Any], one: Callable[[Any], str | None]) -> list[str]:
    """`one(item)` for every item on two processes; the failure messages."""
    workers = min(2, os.cpu_count() or 1)
    if workers == 1:
        return [f for f in map(one, items) if f]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return [f for f in pool.map(one, items, chunksize=25) if f]


def _seed(item: tuple[int, bool]) -> str | None:
    seed, real = item
    try:
        check(build(random_scenario(seed, real_signatures=real)))
    except PropertyViolation as exc:
        return str(exc)
    except Exception as exc:  # a crash inside a node is a failure too; keep the seed
        return f"seed={seed} real_signatures={real}: {type(exc).__name__}: {exc}"
    return None


def report(failures: list[str], total: int) -> str:
    return f"{len(failures)} of {total} schedule(s) failed:\n" + "\n".join(failures[:10])


def chunk_seeds(chunk: int) -> list[int]:
    fixed = SCHEDULES - SCHEDULES // FRESH_SHARE
    fresh = range(FRESH_BASE, FRESH_BASE + SCHEDULES // FRESH_SHARE)
    return [*range(fixed), *fresh][chunk::CHUNKS]


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_adversarial_schedules(chunk: int) -> None:
    seeds = chunk_seeds(chunk)
    print(f"fresh seeds from {FRESH_BASE}; this chunk: {len(seeds)} schedules")
    failures = run_all([(s, False) for s in seeds], _seed)
    assert not failures, report(failures, len(seeds))


def test_schedules_with_real_p256_signatures() -> None:
    failures = run_all([(s, True) for s in REAL_P256_SEEDS], _seed)
    assert not failures, report(failures, len(REAL_P256_SEEDS))


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        scenario = random_scenario(int(arg))
        print(scenario.describe())
        built = build(scenario)
        built.sim.trace = []
        try:
            print(check(built))
        finally:
            print("\n".join(built.sim.trace))
