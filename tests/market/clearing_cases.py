"""Small hand-built market cases for the clearing, verification and settlement tests."""

from __future__ import annotations

from meterchain.market.clearing import ClearingRequest
from meterchain.market.model import GasTurbine, GreenLoss, Market, Microgrid, Storage, TradeRequest

# Prices in minor units per kWh (10 000 minor units = 1 currency unit).
RETAIL = 8_000
FEED_IN = 2_500
FEE = 500
C_LOSS = 4_000


def microgrid(
    mg_id: str,
    renewable: int | tuple[int, ...],
    load: int | tuple[int, ...],
    green: int | tuple[int, ...],
    *,
    retail: int | tuple[int, ...] = RETAIL,
    loss: int = C_LOSS,
    gas: GasTurbine | None = None,
    storage: Storage | None = None,
    import_limit: int | None = None,
) -> Microgrid:
    """A microgrid from scalars (one period) or tuples (one value per period)."""

    def series(x: int | tuple[int, ...]) -> tuple[int, ...]:
        return x if isinstance(x, tuple) else (x,)

    ren = series(renewable)
    periods = len(ren)

    def fit(x: int | tuple[int, ...]) -> tuple[int, ...]:
        s = series(x)
        return s * periods if len(s) == 1 else s

    return Microgrid(
        id=mg_id,
        renewable_w=ren,
        load_w=fit(load),
        green_demand_w=fit(green),
        retail_price_per_kwh=fit(retail),
        feed_in_tariff_per_kwh=FEED_IN,
        green_loss=GreenLoss.linear(loss),
        gas=gas,
        storage=storage,
        grid_import_limit_w=import_limit,
    )


def request(
    *mgs: Microgrid,
    first_period: int = 10,
    deposit: int = 0,
    executed_periods: int = 1,
    market: Market | None = None,
) -> ClearingRequest:
    return ClearingRequest(
        market or Market(wheeling_fee_per_kwh=FEE),
        first_period,
        tuple(TradeRequest(mg, deposit) for mg in mgs),
        executed_periods,
    )


def two_microgrids(deposit: int = 0) -> ClearingRequest:
    """Seller a: 100 kW green, 50 kW load (20 green); buyer b: no renewables, 80 kW load (60 green).

    Worked on paper in test_clearing.test_two_microgrids_by_hand.
    """
    return request(
        microgrid("a", 100_000, 50_000, 20_000),
        microgrid("b", 0, 80_000, 60_000),
        deposit=deposit,
    )
