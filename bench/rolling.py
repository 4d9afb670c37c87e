"""`meterchain bench rolling`: whole market days of rolling clearing, and how much of the optimum
they reach.

Each day is a seeded `synthetic_case` (6 microgrids, 24 hours) cleared hour by
hour exactly as the market runs it (`rolling.run_day`: clear the rest of the
day, execute and settle the first hour, carry the storage energy on), twice:

* with perfect forecasts: the share of the full-day optimum saving it
  reaches. The optimum is one clearing of all 24 hours on the actual profiles
  (sum of C_non_i minus sum of C_i); the rolling saving is the sum of C_non_i
  of that clearing minus what the executed hours really cost, plus the
  planning cost of ending the day below a storage target. Target: >= 99 %.
* with the seeded lead-time forecast errors of the day: whether the day
  clears every hour (a day that raises anywhere counts as failed).

Anchor, in the same run: the full-day optimum solved once per day (one
24-hour clearing); ``days_per_second`` counts whole rolling days (24
clearings, settlements and executions each). Days: 20 in a normal run, 5 with
``--quick``, ``MC_BENCH_ROLLING_DAYS`` overrides (the README's before/after
count uses 200).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

MICROGRIDS = 6
FIRST_SEED = 1
TARGET_SHARE = 0.99


def optimum_share(seed: int, microgrids: int = MICROGRIDS) -> tuple[float, int, int]:
    """(rolling saving / full-day optimum saving, optimum, rolling saving) with perfect forecasts.

    Money minor units. Raises whatever the clearing raises.
    """
    from meterchain.market.clearing import clear
    from meterchain.market.model import target_shortfall_e12
    from meterchain.market.reference import synthetic_case
    from meterchain.market.rolling import LeadTimeForecast, run_day
    from meterchain.market.units import COST_SCALE, div_round

    case = synthetic_case(microgrids, seed)
    case = replace(case, forecast=LeadTimeForecast(seed, 0, 0, 0, 0))
    full = clear(case.request(0, None))
    optimum = sum(full.standalone_cost) - sum(full.cooperative_cost)
    day = run_day(case, "rolling")
    spent = 0
    for hour in day.hours:
        if hour.executed is not None:
            spent += sum(hour.executed.cost)
    last = day.hours[-1]
    if last.executed is not None:
        models = {mg.id: mg for mg in last.request.microgrids}
        for mg_id, d in zip(last.result.microgrids, last.executed.dispatch, strict=True):
            spent += div_round(target_shortfall_e12(models[mg_id], d.soc_wh), COST_SCALE)
    saving = sum(full.standalone_cost) - spent
    return (saving / optimum if optimum > 0 else 1.0), optimum, saving


def clears_with_forecast_errors(seed: int, microgrids: int = MICROGRIDS) -> str | None:
    """None if the seeded day with forecast errors clears every hour, else why it failed."""
    from meterchain.market.reference import synthetic_case
    from meterchain.market.rolling import run_day

    try:
        run_day(synthetic_case(microgrids, seed), "rolling")
    except Exception as exc:  # noqa: BLE001 - any failure of a day is what is counted
        return f"{type(exc).__name__}: {exc}"[:160]
    return None


def run(quick: bool) -> dict[str, Any]:
    days = int(os.environ.get("MC_BENCH_ROLLING_DAYS", 5 if quick else 20))
    seeds = range(FIRST_SEED, FIRST_SEED + days)
    shares: list[float] = []
    failed: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in seeds:
        try:
            share, _, _ = optimum_share(seed)
            shares.append(share)
        except Exception as exc:  # noqa: BLE001
            failed.append({"seed": seed, "forecast": "perfect", "error": str(exc)[:160]})
    perfect_s = time.perf_counter() - start
    start = time.perf_counter()
    for seed in seeds:
        why = clears_with_forecast_errors(seed)
        if why is not None:
            failed.append({"seed": seed, "forecast": "errors", "error": why})
    errors_s = time.perf_counter() - start
    from meterchain.market.clearing import clear
    from meterchain.market.reference import synthetic_case

    start = time.perf_counter()
    for seed in seeds:
        clear(synthetic_case(MICROGRIDS, seed).request(0, None))
    anchor_s = time.perf_counter() - start
    return {
        "microgrids": MICROGRIDS,
        "days": days,
        "failed_days_perfect_forecast": sum(f["forecast"] == "perfect" for f in failed),
        "failed_days_forecast_errors": sum(f["forecast"] == "errors" for f in failed),
        "days_per_second": round(days / errors_s, 2),
        "perfect_forecast_days_per_second": round(days / perfect_s, 2) if shares else None,
        "anchor_full_day_clearings_per_second": round(days / anchor_s, 2),
        "ratio": round((days / errors_s) / (days / anchor_s), 3),
        "optimum_share_min": round(min(shares), 5) if shares else None,
        "optimum_share_mean": round(sum(shares) / len(shares), 5) if shares else None,
        "target_share": TARGET_SHARE,
        "meets_target": bool(shares) and min(shares) >= TARGET_SHARE and not failed,
        "failures": failed[:10],
    }
