"""A small run of `bench ingest-e2e`: real broker, agent process, fleets, overload; nothing lost."""

from __future__ import annotations

import time

from bench.ingest_e2e import Plan, measure
from edge_agent.energy import HOUR_S, hour_start


def test_a_small_end_to_end_run_loses_nothing() -> None:
    plan = Plan(
        meters=50,
        rate=200,
        sustain_s=2,
        overload_s=1,
        drain_s=60,
        t0=hour_start(int(time.time())) - 6 * HOUR_S,
    )
    result = measure(plan)
    assert result["zero_lost"] and result["lost"] == 0
    assert result["pending_on_boards_at_end"] == 0
    assert result["readings_committed"] == result["readings_produced"] > 300
    assert result["scrape_bytes"] > 0 and result["raw_verify_per_second"] > 0
