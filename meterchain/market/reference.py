"""The reference market day (four microgrids) and a seeded N-microgrid case generator.

`reference_case()` is the day the tests, the demo and the benchmarks use:

* mg1-campus -- short of green power: modest rooftop PV, a large daytime load
  70 % of which must be green, a gas turbine and a battery;
* mg2-hospital -- short of green power: a small wind turbine, a steady load of
  which 80 % must be green (high loss coefficient), a gas turbine;
* mg3-solar-park -- surplus: a large PV plant, a small load, a battery;
* mg4-wind-farm -- surplus: wind strongest at night, a small gas turbine and a
  battery.

Prices are one time-of-use tariff (valley 0.35, shoulder 0.75, peak 1.15
currency/kWh), a feed-in tariff of 0.25 and a wheeling fee of 0.05 per kWh.
Green power is scarce: the buyers' green demand exceeds the sellers' green
surplus in most hours, so sellers sell nearly all of it and a forecast error
shows up as a shortfall. Forecast errors are seeded (`LeadTimeForecast`), so
every run sees the same.

`synthetic_request(n, seed)` builds a one-window clearing request for n
microgrids (mixed surplus/short, some with storage or gas) for the benchmark;
`synthetic_case(n, seed)` the same as a full `DayCase`.
"""

from __future__ import annotations

import math
import random

from meterchain.market.clearing import ClearingRequest
from meterchain.market.model import GasTurbine, GreenLoss, Market, Storage
from meterchain.market.rolling import (
    DayCase,
    LeadTimeForecast,
    MicrogridDay,
    compare_rolling_vs_day_ahead,
)

HOURS = 24
VALLEY, SHOULDER, PEAK = 3_500, 7_500, 11_500  # minor units per kWh
FEED_IN = 2_500
WHEELING = 500
REFERENCE_SEED = 20_240_611


def time_of_use() -> tuple[int, ...]:
    """Retail price per hour: valley 23-07, peak 10-15 and 18-21, shoulder otherwise."""
    prices = []
    for h in range(HOURS):
        if h < 7 or h == 23:
            prices.append(VALLEY)
        elif 10 <= h < 15 or 18 <= h < 21:
            prices.append(PEAK)
        else:
            prices.append(SHOULDER)
    return tuple(prices)


def _solar(peak_w: int, sunrise: float = 6.0, sunset: float = 18.5) -> tuple[int, ...]:
    out = []
    for h in range(HOURS):
        mid = h + 0.5
        x = (mid - sunrise) / (sunset - sunrise)
        out.append(round(peak_w * math.sin(math.pi * x) ** 1.5) if 0 < x < 1 else 0)
    return tuple(out)


def _wind(mean_w: int, swing: float, phase_h: float) -> tuple[int, ...]:
    return tuple(
        max(0, round(mean_w * (1 + swing * math.cos(2 * math.pi * (h - phase_h) / HOURS))))
        for h in range(HOURS)
    )


def _load(base_w: int, day_w: int, evening_w: int) -> tuple[int, ...]:
    out = []
    for h in range(HOURS):
        day = math.exp(-((((h + 0.5) - 13.0) / 4.0) ** 2))
        evening = math.exp(-((((h + 0.5) - 19.5) / 2.0) ** 2))
        out.append(round(base_w + day_w * day + evening_w * evening))
    return tuple(out)


def _share(load: tuple[int, ...], pct: int) -> tuple[int, ...]:
    return tuple(x * pct // 100 for x in load)


def reference_microgrids() -> tuple[MicrogridDay, ...]:
    tou = time_of_use()
    campus_load = _load(150_000, 250_000, 60_000)
    hospital_load = _load(220_000, 60_000, 40_000)
    park_load = _load(60_000, 40_000, 30_000)
    farm_load = _load(50_000, 20_000, 50_000)
    return (
        MicrogridDay(
            id="mg1-campus",
            renewable_w=_solar(120_000),
            load_w=campus_load,
            green_demand_w=_share(campus_load, 70),
            retail_price_per_kwh=tou,
            feed_in_tariff_per_kwh=FEED_IN,
            green_loss=GreenLoss.linear(5_000),
            gas=GasTurbine(a_per_mw2h=2_000_000, b_per_kwh=4_500, p_max_w=250_000),
            storage=Storage(
                charge_max_w=80_000,
                discharge_max_w=80_000,
                efficiency_ppm=950_000,
                e_min_wh=20_000,
                e_max_wh=200_000,
                soc_wh=100_000,
                e_final_min_wh=100_000,
            ),
            deposit=50_000,
        ),
        MicrogridDay(
            id="mg2-hospital",
            renewable_w=_wind(40_000, 0.4, 2.0),
            load_w=hospital_load,
            green_demand_w=_share(hospital_load, 80),
            retail_price_per_kwh=tou,
            feed_in_tariff_per_kwh=FEED_IN,
            green_loss=GreenLoss.linear(6_000),
            gas=GasTurbine(a_per_mw2h=3_000_000, b_per_kwh=5_000, p_max_w=200_000),
            deposit=50_000,
        ),
        MicrogridDay(
            id="mg3-solar-park",
            renewable_w=_solar(400_000),
            load_w=park_load,
            green_demand_w=_share(park_load, 30),
            retail_price_per_kwh=tou,
            feed_in_tariff_per_kwh=FEED_IN,
            green_loss=GreenLoss.linear(3_000),
            storage=Storage(
                charge_max_w=150_000,
                discharge_max_w=150_000,
                efficiency_ppm=950_000,
                e_min_wh=50_000,
                e_max_wh=500_000,
                soc_wh=150_000,
                e_final_min_wh=150_000,
            ),
            deposit=50_000,
        ),
        MicrogridDay(
            id="mg4-wind-farm",
            renewable_w=_wind(200_000, 0.5, 3.0),
            load_w=farm_load,
            green_demand_w=_share(farm_load, 30),
            retail_price_per_kwh=tou,
            feed_in_tariff_per_kwh=FEED_IN,
            green_loss=GreenLoss.linear(3_000),
            gas=GasTurbine(a_per_mw2h=2_500_000, b_per_kwh=5_500, p_max_w=100_000),
            storage=Storage(
                charge_max_w=60_000,
                discharge_max_w=60_000,
                efficiency_ppm=940_000,
                e_min_wh=10_000,
                e_max_wh=150_000,
                soc_wh=50_000,
                e_final_min_wh=50_000,
            ),
            deposit=50_000,
        ),
    )


def reference_market() -> Market:
    return Market(wheeling_fee_per_kwh=WHEELING, min_deposit=10_000)


def reference_case(seed: int = REFERENCE_SEED) -> DayCase:
    """The four-microgrid reference day with seeded forecast errors."""
    return DayCase(reference_market(), reference_microgrids(), LeadTimeForecast(seed))


def _synthetic_microgrid(rng: random.Random, k: int, tou: tuple[int, ...]) -> MicrogridDay:
    kind = rng.choice(("solar", "wind", "short", "short"))
    peak_load = rng.randint(50_000, 500_000)
    load = _load(peak_load * 4 // 10, peak_load * 5 // 10, peak_load * 2 // 10)
    if kind == "solar":
        ren = _solar(rng.randint(peak_load, 3 * peak_load))
    elif kind == "wind":
        ren = _wind(
            rng.randint(peak_load // 2, 2 * peak_load), rng.uniform(0.2, 0.6), rng.uniform(0, 24)
        )
    else:
        ren = _solar(rng.randint(0, peak_load // 3))
    gas = None
    if rng.random() < 0.6:
        gas = GasTurbine(
            a_per_mw2h=rng.randint(1_000_000, 5_000_000),
            b_per_kwh=rng.randint(4_000, 6_000),
            p_max_w=rng.randint(peak_load // 4, peak_load),
        )
    storage = None
    if rng.random() < 0.5:
        capacity = rng.randint(peak_load // 2, 2 * peak_load)
        storage = Storage(
            charge_max_w=capacity // 3,
            discharge_max_w=capacity // 3,
            efficiency_ppm=rng.randint(920_000, 970_000),
            e_min_wh=capacity // 10,
            e_max_wh=capacity,
            soc_wh=capacity // 2,
            e_final_min_wh=capacity // 2,
        )
    return MicrogridDay(
        id=f"mg{k:05d}",
        renewable_w=ren,
        load_w=load,
        green_demand_w=_share(load, rng.randint(20, 70)),
        retail_price_per_kwh=tou,
        feed_in_tariff_per_kwh=FEED_IN,
        green_loss=GreenLoss.linear(rng.randint(2_000, 8_000)),
        gas=gas,
        storage=storage,
        deposit=10_000,
    )


def synthetic_case(n: int, seed: int = 1) -> DayCase:
    """A seeded day with ``n`` microgrids of mixed kinds (benchmarks, property tests)."""
    rng = random.Random(seed)
    tou = time_of_use()
    mgs = tuple(_synthetic_microgrid(rng, k, tou) for k in range(n))
    return DayCase(reference_market(), mgs, LeadTimeForecast(seed))


def synthetic_request(n: int, seed: int = 1, periods: int = HOURS) -> ClearingRequest:
    """The first clearing request (window of ``periods`` hours) of `synthetic_case`."""
    case = synthetic_case(n, seed)
    return case.request(HOURS - periods, None)


def reference_request(first: int = 0) -> ClearingRequest:
    """The reference day's clearing request made just before hour ``first`` (start of day SOC)."""
    return reference_case().request(first, None)


__all__ = [
    "compare_rolling_vs_day_ahead",
    "reference_case",
    "reference_market",
    "reference_microgrids",
    "reference_request",
    "synthetic_case",
    "synthetic_request",
    "time_of_use",
]
