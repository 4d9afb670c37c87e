"""M19 violation monitoring: indicators, the versioned scoring model, planted abusers found.

The seeded campaign runs 40 seeds in `make test`; MC_MONITOR_SEEDS=N runs N
(the README's figures: seeds 0-199 calibrate, seeds 1000-1999 are held out).
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

from meterchain.market import monitoring as mon
from tests.market.monitoring_cases import ABUSERS, seeded_market

SEEDS = int(os.environ.get("MC_MONITOR_SEEDS", "40"))


def test_planted_abusers_are_flagged_and_honest_participants_are_not() -> None:
    flagged = planted = false_pos = honest = 0
    for seed in range(1000, 1000 + SEEDS):
        report = mon.monitor(seeded_market(seed))
        for s in report.scores:
            if s.participant in ABUSERS:
                planted += 1
                if s.suspect:
                    flagged += 1
                    assert s.reasons[0] == ABUSERS[s.participant], (seed, s)
            else:
                honest += 1
                false_pos += s.suspect
    assert flagged / planted >= 0.97, (flagged, planted)
    assert false_pos / honest <= 0.01, (false_pos, honest)


def _activity(**kw: object) -> mon.Activity:
    return mon.Activity(0, 10, **kw)  # type: ignore[arg-type]


def test_indicators_by_hand() -> None:
    trades = [mon.TradeRow(h, "s", "b", 10_000, 5_000, 10_000) for h in range(6)]
    trades += [mon.TradeRow(h, "s", "b", 10_000, 5_000, 7_000) for h in range(6, 9)]  # 30 % short
    trades += [mon.TradeRow(9, "s", "b", 10_000, 5_000, 8_000)]  # 20 % short: within tolerance
    # Hour 2 gets four more ordinary trades and one far from the median: an outlier.
    trades += [mon.TradeRow(2, f"o{k}", "b", 1_000, 5_000 + 10 * k, 1_000) for k in range(4)]
    trades += [mon.TradeRow(2, "s", "o9", 1_000, 9_000, 1_000)]
    # A round trip between unrelated accounts in hour 3.
    trades += [mon.TradeRow(3, "p", "q", 4_000, 5_000, 4_000)]
    trades += [mon.TradeRow(3, "q", "p", 3_000, 5_000, 3_000)]
    activity = _activity(
        trades=tuple(trades),
        capacity=(mon.CapacityRow(1, "s", 10_000, 4_000), mon.CapacityRow(2, "s", 0, 0)),
        payments=(mon.PaymentRow(1, "b", 1_000, 900), mon.PaymentRow(2, "b", 3_000, 3_000)),
    )
    values = mon.indicator_values(activity, mon.CURRENT)
    s_values, s_events = values["s"]
    # deviation: 3 of s's 11 sales short by more than 20 %; events = sales.
    assert s_values[0] == 3 * 1000 // 11 and s_events[0] == 11
    # price outlier: hour 2 has 6 trades, median 5 000; s's 9 000 is one of its two there.
    assert s_values[2] == 500 and s_events[2] == 2
    assert s_values[4] == 600 and s_events[4] == 1  # withheld 6 of 10 kWh; empty rows ignored
    b_values, b_events = values["b"]
    assert b_values[3] == 100 * 1000 // 4_000 and b_events[3] == 2  # 100 of 4 000 unpaid
    # wash: p traded 7 kWh, the 3 kWh loop counts on both legs (6 kWh) for both sides.
    assert values["p"][0][1] == 6_000 * 1000 // 7_000 == values["q"][0][1]


def test_related_accounts_count_as_wash_and_min_events_protects_newcomers() -> None:
    trades = tuple(mon.TradeRow(h, "a", "b", 5_000, 5_000, 5_000) for h in range(5))
    related = _activity(trades=trades, related=(("a", "b"),))
    report = mon.monitor(related)
    a = next(s for s in report.scores if s.participant == "a")
    assert a.values[1] == 1000
    assert not a.suspect  # 5 trades < min_events (6): not enough to accuse anyone
    more = _activity(trades=trades + (trades[0],), related=(("b", "a"),))
    a = next(s for s in mon.monitor(more).scores if s.participant == "a")
    assert a.suspect and a.reasons == ("wash",)


def test_report_does_not_depend_on_row_order() -> None:
    activity = seeded_market(7, hours=24)
    shuffled = list(activity.trades)
    random.Random(1).shuffle(shuffled)
    other = replace(activity, trades=tuple(shuffled), capacity=activity.capacity[::-1])
    assert mon.monitor(other) == mon.monitor(activity)


def test_model_is_versioned_and_never_silently_retrained() -> None:
    model = mon.CURRENT
    assert mon.model_for(model.version, model.digest) is model
    tuned = replace(model, threshold=model.threshold - 1)
    assert tuned.digest != model.digest
    with pytest.raises(mon.MonitoringError, match="needs a new version"):
        mon.model_for(tuned.version, tuned.digest)
    with pytest.raises(mon.MonitoringError, match="unknown monitoring model"):
        mon.model_for("m19-v0", model.digest)
    with pytest.raises(mon.MonitoringError, match="ramps must be"):
        replace(model, ramps=model.ramps[:-1])


def test_a_node_re_runs_a_recorded_report() -> None:
    activity = seeded_market(3, hours=48)
    recorded = mon.monitor(activity).suspect_dict()
    assert recorded["suspects"], "the seeded market has suspects"
    mon.check_report(activity, recorded)
    forged = dict(recorded, suspects=recorded["suspects"][1:])
    with pytest.raises(mon.MonitoringError, match="differs"):
        mon.check_report(activity, forged)
    with pytest.raises(mon.MonitoringError, match="unknown monitoring model"):
        mon.check_report(activity, dict(recorded, model="mine"))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"trades": (mon.TradeRow(1, "a", "b", 5, 1, 6),)}, "delivered 6 Wh > contracted 5 Wh"),
        ({"trades": (mon.TradeRow(1, "a", "a", 5, 1, 5),)}, "parties must differ"),
        ({"trades": (mon.TradeRow(11, "a", "b", 5, 1, 5),)}, "outside the window"),
        ({"trades": (mon.TradeRow(1, "a", "b", -5, 1, 0),)}, "energy_wh must be an integer"),
        ({"payments": (mon.PaymentRow(1, "", 1, 1),)}, "non-empty id"),
        ({"capacity": (mon.CapacityRow(1, "a", 1.5, 1),)}, "spare_wh"),
        ({"related": (("a", "a"),)}, "two different ids"),
        ({"trades": ("a->b 5 Wh",)}, "tuple of TradeRow records"),
        ({"capacity": [mon.CapacityRow(1, "a", 1, 1)]}, "tuple of CapacityRow records"),
    ],
)
def test_bad_activity_is_refused(kw: dict, match: str) -> None:
    with pytest.raises(mon.MonitoringError, match=match):
        _activity(**kw)
    with pytest.raises(mon.MonitoringError, match="empty"):
        mon.Activity(5, 5)
