"""Small runs of `bench ingest-e2e`: real broker, agent process, fleets, overload; nothing lost."""

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
    # What the fleets offered over the sustained phase, counted at its end (a timeline
    # sampled every half second would leave out up to a quarter of this 2 s phase).
    assert 0.98 * plan.rate <= result["offered_sustained_achieved_per_second"] <= plan.rate


def test_a_broker_dropping_readings_in_an_overload_loses_nothing() -> None:
    # The agent freezes for 1 s as the 2x overload starts; Mosquitto sends each of its
    # sessions 10 readings, queues 50 more and drops the rest silently. Only the
    # end-to-end acknowledgement saves them: the boards keep what is not acknowledged
    # and resend it (after 1 s here).
    plan = Plan(
        meters=10,
        rate=300,
        sustain_s=1,
        overload_s=1,
        drain_s=60,
        t0=hour_start(int(time.time())) - 6 * HOUR_S,
        ack_timeout_s=1,
        broker_inflight=10,
        broker_queue=50,
        agent_stall_s=1,
    )
    result = measure(plan)
    assert result["broker_drop_notices"] > 0, "the broker dropped nothing: no overload"
    assert result["resent"] > 0
    assert result["lost"] == 0 and result["pending_on_boards_at_end"] == 0
    assert result["readings_committed"] == result["readings_produced"] >= 850
