"""Rolling clearing over a day (M2) and the day-ahead baseline it is compared with (M5).

A `DayCase` holds each microgrid's parameters and its *actual* hourly profiles
(renewables, load, green demand), plus a `LeadTimeForecast` that says what the
microgrid would have forecast for hour t when asked ``lead`` hours ahead.

* ``run_day(case, "rolling")``: in period v (v = -1 .. 22) every microgrid
  submits its model for hours v+1 .. 23 with the forecasts it has then (lead 1
  for the hour about to be executed); the market clears the window, only hour
  v+1 is executed and settled against the actual values, and the storage energy
  after that hour is carried into the next window. T shrinks 24 -> 1.
* ``run_day(case, "day_ahead")``: one clearing of all 24 hours with the
  forecasts available before the day (lead t+1 for hour t); every hour is
  executed from that plan.
* ``compare_rolling_vs_day_ahead(case, scenarios=8)``: both runs under the
  same forecast errors, over several seeded forecast-error days; deviation
  penalties (M5 shortfall payments) as integer money.

Execution model: gas turbines and storage follow the executed dispatch; the
grid absorbs every deviation of renewables and load, which is what the meters
then show.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

from meterchain.market.clearing import (
    DEFAULT_SOLVER,
    ClearingRequest,
    ClearingResult,
    ExecutedHour,
    clear,
)
from meterchain.market.errors import InvalidModel
from meterchain.market.model import (
    Dispatch,
    GasTurbine,
    GreenLoss,
    Market,
    Microgrid,
    Storage,
    TradeRequest,
)
from meterchain.market.settlement import MeteredHour, Settlement, metered_from_dispatch, settle

Mode = Literal["rolling", "day_ahead"]
_NORMAL = NormalDist()


@dataclass(frozen=True)
class MicrogridDay:
    """A microgrid over one day: parameters and actual hourly profiles (W, one value per hour).

    ``storage.soc_wh`` is the energy at the start of the day.
    """

    id: str
    renewable_w: tuple[int, ...]
    load_w: tuple[int, ...]
    green_demand_w: tuple[int, ...]
    retail_price_per_kwh: tuple[int, ...]
    feed_in_tariff_per_kwh: int
    green_loss: GreenLoss
    gas: GasTurbine | None = None
    storage: Storage | None = None
    grid_import_limit_w: int | None = None
    deposit: int = 0

    def __post_init__(self) -> None:
        # Validate by building the full-day model once: same rules, same messages.
        self.model(0, self.renewable_w, self.load_w, self.green_demand_w, None)

    @property
    def hours(self) -> int:
        return len(self.renewable_w)

    def model(
        self,
        first: int,
        renewable_w: tuple[int, ...],
        load_w: tuple[int, ...],
        green_demand_w: tuple[int, ...],
        soc_wh: int | None,
    ) -> Microgrid:
        """The `Microgrid` for hours first.. with the given (forecast) series and carried energy."""
        storage = self.storage
        if storage is not None and soc_wh is not None:
            storage = replace(storage, soc_wh=min(max(soc_wh, storage.e_min_wh), storage.e_max_wh))
        return Microgrid(
            id=self.id,
            renewable_w=tuple(renewable_w),
            load_w=tuple(load_w),
            green_demand_w=tuple(green_demand_w),
            retail_price_per_kwh=tuple(self.retail_price_per_kwh[first : first + len(renewable_w)]),
            feed_in_tariff_per_kwh=self.feed_in_tariff_per_kwh,
            green_loss=self.green_loss,
            gas=self.gas,
            storage=storage,
            grid_import_limit_w=self.grid_import_limit_w,
        )


@lru_cache(maxsize=1 << 16)
def _z(seed: int, mg_id: str, quantity: str, hour: int, k: int) -> float:
    """A standard normal draw fixed by its coordinates (stateless, the same in every process)."""
    digest = hashlib.sha256(f"{seed}|{mg_id}|{quantity}|{hour}|{k}".encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
    return max(-4.0, min(4.0, _NORMAL.inv_cdf(u)))


@dataclass(frozen=True)
class LeadTimeForecast:
    """Seeded forecast errors that grow with lead time, nested like real information flow.

    The relative error of the forecast for hour t made ``lead`` hours ahead is
    sum_{k=1..lead} sigma_k z_k with independent standard normal z_k fixed by
    (seed, microgrid, quantity, hour, k): sigma_1 = ``*_first_ppm`` (what is
    unknowable one hour ahead), sigma_k = ``*_step_ppm`` for k >= 2. A later
    forecast of the same hour shares the shorter-lead part of the error, as a
    real forecast does. Green demand keeps its actual share of the load.
    """

    seed: int
    renewable_first_ppm: int = 80_000
    renewable_step_ppm: int = 25_000
    load_first_ppm: int = 30_000
    load_step_ppm: int = 10_000

    def error_ppm(self, mg_id: str, quantity: str, hour: int, lead: int) -> int:
        if lead < 1:
            raise ValueError("a forecast needs a lead time of at least one hour")
        if quantity == "renewable":
            first, step = self.renewable_first_ppm, self.renewable_step_ppm
        else:
            first, step = self.load_first_ppm, self.load_step_ppm
        total = first * _z(self.seed, mg_id, quantity, hour, 1)
        for k in range(2, lead + 1):
            total += step * _z(self.seed, mg_id, quantity, hour, k)
        return round(total)

    def predict(self, mg: MicrogridDay, hour: int, lead: int) -> tuple[int, int, int]:
        """(renewable W, load W, green demand W) forecast for ``hour`` made ``lead`` hours ahead."""
        r_act, l_act, g_act = mg.renewable_w[hour], mg.load_w[hour], mg.green_demand_w[hour]
        r = max(0, round(r_act * (1 + self.error_ppm(mg.id, "renewable", hour, lead) / 1e6)))
        load = max(0, round(l_act * (1 + self.error_ppm(mg.id, "load", hour, lead) / 1e6)))
        green = min(load, (load * g_act) // l_act) if l_act else 0
        return r, load, green


@dataclass(frozen=True)
class DayCase:
    """A market day: rules, microgrids with actual profiles, and their forecasts."""

    market: Market
    microgrids: tuple[MicrogridDay, ...]
    forecast: LeadTimeForecast

    def __post_init__(self) -> None:
        hours = {mg.hours for mg in self.microgrids}
        if len(hours) != 1:
            raise InvalidModel("day case", "microgrids", "must all cover the same hours")

    @property
    def hours(self) -> int:
        return self.microgrids[0].hours

    def request(
        self, first: int, soc: dict[str, int] | None, executed_periods: int = 1
    ) -> ClearingRequest:
        """The clearing request made just before hour ``first`` for hours first..end of day."""
        requests = []
        for mg in self.microgrids:
            ren, load, green = [], [], []
            for hour in range(first, self.hours):
                r, lo, g = self.forecast.predict(mg, hour, hour - first + 1)
                ren.append(r)
                load.append(lo)
                green.append(g)
            model = mg.model(
                first,
                tuple(ren),
                tuple(load),
                tuple(green),
                None if soc is None else soc.get(mg.id),
            )
            requests.append(TradeRequest(model, mg.deposit))
        return ClearingRequest(self.market, first, tuple(requests), executed_periods)


@dataclass(frozen=True)
class HourOutcome:
    """One executed hour: the clearing it came from, the meters and the settlement."""

    request: ClearingRequest
    result: ClearingResult
    executed: ExecutedHour | None  # None when every microgrid was left out of the clearing
    metered: tuple[MeteredHour, ...]
    settlement: Settlement


@dataclass(frozen=True)
class DayOutcome:
    mode: str
    hours: tuple[HourOutcome, ...]

    @property
    def penalty_total(self) -> int:
        """M5 deviation penalties over the day, money minor units."""
        return sum(h.settlement.penalty_total for h in self.hours)

    @property
    def short_wh(self) -> int:
        return sum(h.settlement.short_wh for h in self.hours)

    @property
    def traded_wh(self) -> int:
        return sum(t.energy_wh for h in self.hours if h.executed for t in h.executed.trades)

    def microgrid_net_payments(self) -> int:
        """Money the microgrids paid out, net, over the day (minor units)."""
        ids = {mg for h in self.hours for mg in h.request.ids}
        return -sum(
            bal
            for h in self.hours
            for party, bal in h.settlement.balances().items()
            if party in ids
        )


def _meter(case: DayCase, hour: int, result: ClearingResult, k: int = 0) -> list[MeteredHour]:
    """Meters of every microgrid in the executed hour ``k`` of ``result``; a microgrid left
    out of the clearing runs no gas or storage (the grid covers it)."""
    executed = result.executed[k] if result.executed else None
    rows = {} if executed is None else dict(zip(result.microgrids, executed.dispatch, strict=True))
    out = []
    for mg in case.microgrids:
        d = rows.get(mg.id, Dispatch())
        mg_id = mg.id
        out.append(
            metered_from_dispatch(
                mg_id,
                d.gas_w,
                d.charge_w,
                d.discharge_w,
                mg.renewable_w[hour],
                mg.green_demand_w[hour],
                mg.load_w[hour],
            )
        )
    return out


def run_day(case: DayCase, mode: Mode = "rolling", *, solver: str = DEFAULT_SOLVER) -> DayOutcome:
    """Clear, execute and settle every hour of ``case`` in ``mode`` (see module doc)."""
    hours: list[HourOutcome] = []
    if mode == "rolling":
        soc: dict[str, int] | None = None
        for first in range(case.hours):
            request = case.request(first, soc)
            result = clear(request, solver=solver)
            metered = _meter(case, first, result)
            settlement = settle(request, result, metered)
            executed = result.executed[0] if result.executed else None
            hours.append(HourOutcome(request, result, executed, tuple(metered), settlement))
            if executed is not None:
                soc = {**(soc or {}), **{
                    mg_id: d.soc_wh
                    for mg_id, d in zip(result.microgrids, executed.dispatch, strict=True)
                }}  # fmt: skip
    elif mode == "day_ahead":
        request = case.request(0, None, executed_periods=case.hours)
        result = clear(request, solver=solver)
        for k, executed in enumerate(result.executed):
            metered = _meter(case, executed.period, result, k)
            settlement = settle(request, result, metered, period=executed.period)
            hours.append(HourOutcome(request, result, executed, tuple(metered), settlement))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return DayOutcome(mode, tuple(hours))


def compare_rolling_vs_day_ahead(
    case: DayCase, *, scenarios: int = 8, solver: str = DEFAULT_SOLVER
) -> dict[str, object]:
    """Deviation penalties of rolling vs day-ahead clearing under the same forecast errors.

    Both runs see the same forecast errors. Penalties depend on a day's draws
    (a seller's shortfall needs its renewables to fall below the cleared
    sale), so the comparison covers ``scenarios`` days: the case's forecast
    seed and the next ``scenarios - 1`` seeds. Totals are money minor units
    and Wh over all those days; ``days`` lists each day's pair of penalties;
    ``reduction_pct`` is how much lower the rolling total is (display only).
    """
    if scenarios < 1:
        raise ValueError("scenarios must be at least 1")
    totals: dict[str, int] = {
        f"{mode}_{what}": 0
        for mode in ("rolling", "day_ahead")
        for what in ("penalty", "short_wh", "traded_wh")
    }
    days = []
    for k in range(scenarios):
        day_case = replace(case, forecast=replace(case.forecast, seed=case.forecast.seed + k))
        outcomes = {
            mode: run_day(day_case, mode, solver=solver) for mode in ("rolling", "day_ahead")
        }
        for mode, outcome in outcomes.items():
            totals[f"{mode}_penalty"] += outcome.penalty_total
            totals[f"{mode}_short_wh"] += outcome.short_wh
            totals[f"{mode}_traded_wh"] += outcome.traded_wh
        days.append(
            {
                "seed": day_case.forecast.seed,
                "rolling_penalty": outcomes["rolling"].penalty_total,
                "day_ahead_penalty": outcomes["day_ahead"].penalty_total,
            }
        )
    da_pen = totals["day_ahead_penalty"]
    reduction = (
        0.0 if da_pen == 0 else round(100 * (da_pen - totals["rolling_penalty"]) / da_pen, 1)
    )
    return {
        **totals,
        "reduction_pct": reduction,
        "scenarios": scenarios,
        "rolling_lower_days": sum(d["rolling_penalty"] < d["day_ahead_penalty"] for d in days),
        "days": days,
    }
