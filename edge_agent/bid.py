"""From forecast to bid: the microgrid's M1 model for the next window, as an SC1 trade request.

Rolling clearing (M2): in period v the agent bids for v+1 .. the end of the
UTC day, so the window shrinks from 24 hours (bidding for 00:00) to 1 (for
23:00); only the first hour is executed. The storage enters each window
with the energy the previous executed hour left it with.
"""

from __future__ import annotations

from dataclasses import replace

from edge_agent.config import MarketSection, MicrogridSection
from edge_agent.energy import HOUR_S
from edge_agent.forecast import Forecast
from meterchain.market.model import (
    GasTurbine,
    GreenLoss,
    Market,
    Microgrid,
    Storage,
    TradeRequest,
)


def window_periods(first_hour: int) -> int:
    """Hours from `first_hour` (Unix s, on an hour) to the end of its UTC day (24 .. 1)."""
    return 24 - (first_hour // HOUR_S) % 24


def build_market(section: MarketSection) -> Market:
    return Market(
        wheeling_fee_per_kwh=section.wheeling_fee_per_kwh,
        flow_wear_per_mw2h=section.flow_wear_per_mw2h,
        min_deposit=section.min_deposit,
    )


def build_assets(section: MicrogridSection) -> tuple[GasTurbine | None, Storage | None]:
    """The gas turbine and storage of the microgrid (raises InvalidModel naming the field)."""
    gas = storage = None
    if section.gas is not None:
        g = section.gas
        gas = GasTurbine(g.a_per_mw2h, g.b_per_kwh, g.p_max_w, g.p_min_w)
    if section.storage is not None:
        s = section.storage
        storage = Storage(
            s.charge_max_w, s.discharge_max_w, s.efficiency_ppm, s.e_min_wh, s.e_max_wh, s.soc_wh
        )
    return gas, storage


def build_microgrid(
    microgrid_id: str, section: MicrogridSection, forecast: Forecast, soc_wh: int | None = None
) -> Microgrid:
    """The M1 model of the window `forecast` covers (raises InvalidModel naming the field).

    Green demand is `green_share_pct` of the forecast load, rounded down
    (integer W); retail prices are taken for the window's hours of day.
    """
    first = (forecast.first_hour // HOUR_S) % 24
    prices = tuple(
        section.retail_price_per_kwh[(first + k) % 24] for k in range(forecast.periods)
    )
    gas, storage = build_assets(section)
    if storage is not None and soc_wh is not None:
        storage = replace(storage, soc_wh=min(max(soc_wh, storage.e_min_wh), storage.e_max_wh))
    return Microgrid(
        id=microgrid_id,
        renewable_w=forecast.renewable_w,
        load_w=forecast.load_w,
        green_demand_w=tuple(load * section.green_share_pct // 100 for load in forecast.load_w),
        retail_price_per_kwh=prices,
        feed_in_tariff_per_kwh=section.feed_in_tariff_per_kwh,
        green_loss=GreenLoss.linear(section.green_loss_per_kwh),
        gas=gas,
        storage=storage,
        grid_import_limit_w=section.grid_import_limit_w or None,
    )


def trade_request(
    microgrid_id: str, section: MicrogridSection, forecast: Forecast, soc_wh: int | None = None
) -> TradeRequest:
    """The SC1 request the agent submits for the window: its model plus its deposit."""
    return TradeRequest(build_microgrid(microgrid_id, section, forecast, soc_wh), section.deposit)
