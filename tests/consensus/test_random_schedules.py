"""10,000+ seeded random schedules: safety, the liveness bound and catch-up under faults.

Each schedule (see `scenarios.random_scenario`) draws n in {3, 4, 5, 7}, a
delta, two overlapping rounds (a clearing then a settlement), up to
(n-1)//2 faulty nodes, each a lying backup, a tampering or equivocating
primary, a crash (with or without restart), a node that loses incoming
messages, or Twins (two copies of one node and key, each talking to a
per-round random half of the others), plus replays of old messages and
faulty senders choosing their own timing. Fixed seeds run every time; fresh
seeds add new ground each run. A failure prints the seed and the schedule;
`python -m tests.consensus.test_random_schedules SEED` replays one.

Most schedules sign with the simulator-only keyed hash (same interface,
about 2x faster); a block of schedules runs with real P-256 signatures.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys

from tests.consensus.scenarios import PropertyViolation, build, check, random_scenario

FIXED_SEEDS = range(0, 8_000)
FRESH_SEEDS = 2_000
REAL_P256_SEEDS = range(100_000, 100_300)


def _run(batch: tuple[list[int], bool]) -> list[str]:
    seeds, real = batch
    failures = []
    for seed in seeds:
        try:
            check(build(random_scenario(seed, real_signatures=real)))
        except PropertyViolation as exc:
            failures.append(str(exc))
        except Exception as exc:  # a crash inside a node is a failure too; keep the seed
            failures.append(f"seed={seed} real_signatures={real}: {type(exc).__name__}: {exc}")
    return failures


def _run_all(seeds: list[int], real: bool) -> list[str]:
    workers = min(2, os.cpu_count() or 1)
    chunks = [(seeds[i::16], real) for i in range(16)]
    if workers == 1:
        return [f for chunk in chunks for f in _run(chunk)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return [f for part in pool.map(_run, chunks) for f in part]


def _report(failures: list[str]) -> str:
    return f"{len(failures)} schedule(s) failed:\n" + "\n".join(failures[:10])


def test_fixed_and_fresh_schedules() -> None:
    fresh_base = random.SystemRandom().randrange(10**6, 10**9)
    seeds = [*FIXED_SEEDS, *range(fresh_base, fresh_base + FRESH_SEEDS)]
    print(f"fresh seeds: {fresh_base}..{fresh_base + FRESH_SEEDS - 1}")
    failures = _run_all(seeds, real=False)
    assert not failures, _report(failures)


def test_schedules_with_real_p256_signatures() -> None:
    failures = _run_all(list(REAL_P256_SEEDS), real=True)
    assert not failures, _report(failures)


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
