"""Microgrid model (M1, M1a) validation, exact costs, and the shared rounding of `units`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from clearing_cases import microgrid
from hypothesis import given, settings
from hypothesis import strategies as st

from meterchain.errors import MeterChainError
from meterchain.market.errors import InvalidModel, MarketError
from meterchain.market.model import (
    Dispatch,
    GasTurbine,
    GreenLoss,
    Market,
    Microgrid,
    Storage,
    green_deficit_wh,
    period_cost_e12,
)
from meterchain.market.units import (
    COST_SCALE,
    MONEY_SCALE,
    div_round,
    energy_money,
    price_per_kwh,
    split_pro_rata,
    to_ints_cumulative,
    to_ints_with_total,
)


def _storage(**over: int) -> dict[str, int | None]:
    data: dict[str, int | None] = {
        "charge_max_w": 50_000,
        "discharge_max_w": 50_000,
        "efficiency_ppm": 950_000,
        "e_min_wh": 10_000,
        "e_max_wh": 100_000,
        "soc_wh": 50_000,
        "e_final_min_wh": None,
    }
    data.update(over)
    return data


def _mg_dict(**over: object) -> dict[str, object]:
    data = microgrid("mg2", (10_000, 0), (20_000, 30_000), (5_000, 10_000)).to_dict()
    data.update(over)
    return data


def test_round_trip_through_canonical_dict() -> None:
    mg = microgrid(
        "mg1",
        (1_000, 2_000),
        (3_000, 4_000),
        (1_000, 1_000),
        gas=GasTurbine(a_per_mw2h=2_000_000, b_per_kwh=4_500, p_max_w=100_000),
        storage=Storage(**_storage()),  # type: ignore[arg-type]
        import_limit=500_000,
    )
    assert Microgrid.from_dict(mg.to_dict()) == mg
    assert Market.from_dict(Market(500).to_dict()) == Market(500)


def test_storage_bounds_error_names_microgrid_and_field() -> None:
    bad = _mg_dict(storage=_storage(e_min_wh=200, e_max_wh=100, soc_wh=150))
    with pytest.raises(InvalidModel) as err:
        Microgrid.from_dict(bad)
    assert str(err.value) == "microgrid mg2: storage.e_max_wh (100) < e_min_wh (200)"
    assert err.value.field == "storage.e_max_wh"
    assert isinstance(err.value, MarketError) and isinstance(err.value, MeterChainError)


def test_direct_construction_names_the_field() -> None:
    with pytest.raises(InvalidModel, match=r"^storage\.e_max_wh \(100\) < e_min_wh \(200\)$"):
        Storage(50, 50, 950_000, 200, 100, 150)
    with pytest.raises(InvalidModel, match=r"storage\.soc_wh \(5\) outside"):
        Storage(50, 50, 950_000, 10, 100, 5)
    with pytest.raises(InvalidModel, match=r"gas\.p_max_w \(10\) < p_min_w \(20\)"):
        GasTurbine(1, 1, p_max_w=10, p_min_w=20)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"green_demand_w": [5_000, 40_000]},
            r"microgrid mg2: green_demand_w\[1\] \(40000\) > load_w\[1\]",
        ),
        (
            {"retail_price_per_kwh": [8_000, 2_500]},
            r"retail_price_per_kwh\[1\] \(2500\) <= feed_in",
        ),
        ({"load_w": [1, 2, 3]}, r"microgrid mg2: load_w has 3 periods but renewable_w has 2"),
        (
            {"renewable_w": [1.5, 0]},
            r"microgrid mg2: renewable_w\[0\] must be an integer, got float",
        ),
        ({"renewable_w": [-1, 0]}, r"renewable_w\[0\] \(-1\) < 0"),
        ({"feed_in_tariff_per_kwh": True}, r"feed_in_tariff_per_kwh must be an integer, got bool"),
        ({"grid_import_limit_w": -5}, r"microgrid mg2: grid_import_limit_w \(-5\) < 0"),
        (
            {"gas": {"a_per_mw2h": 1, "b_per_kwh": 1, "p_min_w": 0}},
            r"microgrid mg2: gas\.p_max_w is missing",
        ),
        ({"storage": _storage(efficiency_ppm=0)}, r"storage\.efficiency_ppm \(0\) < 1"),
        (
            {"storage": _storage(e_final_min_wh=200_000)},
            r"storage\.e_final_min_wh \(200000\) > e_max_wh",
        ),
        (
            {"green_loss": [[1000, 5000], [None, 3000]]},
            r"segments\[1\]\.slope_per_kwh \(3000\) < previous",
        ),
        (
            {"green_loss": [[1000, 5000]]},
            r"green_loss\.segments\[0\]\.width_wh of the last piece must be null",
        ),
        ({"id": "@grid"}, r"microgrid: id \('@grid'\) must be"),
        ({"colour": "green"}, r"microgrid\.colour is not a known field"),
    ],
)
def test_bad_parameters_name_the_field(over: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidModel, match=message):
        Microgrid.from_dict(_mg_dict(**over))


def test_market_errors_name_the_field() -> None:
    with pytest.raises(InvalidModel, match=r"^market: flow_wear_per_mw2h \(0\) < 1$"):
        Market(500, flow_wear_per_mw2h=0)
    with pytest.raises(InvalidModel, match=r"market: deposit_forfeit_below_pct \(101\) > 100"):
        Market(500, deposit_forfeit_below_pct=101)


def test_piecewise_green_loss_is_exact() -> None:
    loss = GreenLoss(((10_000, 2_000), (5_000, 4_000), (None, 9_000)))
    assert loss.coefficient_per_kwh == 2_000
    # 10 kWh at 2000 + 5 kWh at 4000 + 2 kWh at 9000 minor units per kWh
    assert loss.cost_e3(17_000) == (10_000 * 2_000 + 5_000 * 4_000 + 2_000 * 9_000)
    assert loss.cost_e3(0) == 0 and loss.cost_e3(-5) == 0
    assert GreenLoss.linear(4_000).cost_e3(1_500) == 6_000_000  # 1.5 kWh * 4000 = 6000 minor


def test_period_cost_by_hand() -> None:
    """Gas 100 kW (a = 2 minor/kW^2h, b = 4500/kWh), 30 kW import at 8000, 10 kW bought (fee 500),
    10 kW green short at 4000, wear 0.05 minor/kW^2h on gas and purchase."""
    mg = microgrid(
        "m",
        0,
        140_000,
        20_000,
        gas=GasTurbine(a_per_mw2h=2_000_000, b_per_kwh=4_500, p_max_w=200_000),
    )
    d = Dispatch(gas_w=100_000, grid_w=30_000, buy_w=10_000)
    market = Market(wheeling_fee_per_kwh=500, flow_wear_per_mw2h=50_000)
    expected_minor = (
        2 * 100**2  # a P^2 = 20 000
        + 4_500 * 100  # b P = 450 000
        + 0.05 * (100**2 + 10**2)  # wear = 505
        + 8_000 * 30  # import = 240 000
        + 250 * 10  # half wheeling fee = 2 500
        + 4_000 * 10  # green deficit 20 - 10 kW = 40 000
    )
    assert period_cost_e12(mg, market, 0, d) == round(expected_minor * COST_SCALE)
    assert green_deficit_wh(mg, 0, d) == 10_000
    # exporting 1 kWh earns the feed-in tariff of 2500 minor units
    exported = period_cost_e12(mg, market, 0, Dispatch(grid_w=-1_000))
    assert exported - period_cost_e12(mg, market, 0, Dispatch()) == -2_500 * COST_SCALE


def test_units_round_half_even_exactly() -> None:
    assert MONEY_SCALE == 10_000
    assert [div_round(n, 2) for n in (1, 3, 5, -1, -3)] == [0, 2, 2, 0, -2]
    assert div_round(7, -2) == -4
    assert energy_money(1_500, 3) == 4  # 4.5 -> 4
    assert energy_money(2_500, 3) == 8  # 7.5 -> 8
    assert price_per_kwh(462_500, 60_000) == 7_708
    with pytest.raises(ValueError):
        price_per_kwh(1, 0)


def test_rounding_keeps_totals_and_caps() -> None:
    assert to_ints_with_total([0.4, 0.4, 0.4, 1.8], 3) == [1, 0, 0, 2]
    assert to_ints_with_total([1.5, 1.5], 3) == [2, 1]  # ties go to the lower index
    assert to_ints_with_total([2.0, 0.9], 3, caps=[2, 5]) == [2, 1]
    assert to_ints_with_total([2.6, 2.6], 4) == [2, 2]
    assert split_pro_rata(10, [1, 1, 1]) == [4, 3, 3]
    assert split_pro_rata(0, [0, 0]) == [0, 0]
    with pytest.raises(ValueError, match="not reachable"):
        to_ints_with_total([0.5, 0.5], 3, caps=[1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        to_ints_with_total([math.nan, 1.0], 1)
    flows = np.array([[0.4, 0.4, 0.4, 0.4, 0.4]])
    rounded = to_ints_cumulative(flows)
    assert rounded.sum() == 2 and np.all(np.abs(np.cumsum(rounded) - np.cumsum(flows)) <= 0.5)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.floats(0, 1e6, allow_nan=False), st.sampled_from([0.0, 0.5, 1.5, 2.25])),
            st.one_of(st.none(), st.integers(0, 10**6)),
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(-40, 40),
    st.booleans(),
)
def test_largest_remainder_rounding_keeps_the_total_the_caps_and_the_order(
    entries: list[tuple[float, int | None]], shift: int, capped: bool
) -> None:
    """Each entry is its floor (capped) plus or minus at most one unit, the total is exact,
    and the units go to the largest fractional parts (taken from the smallest), ties to the
    lower index: the pool rounding at 10,000 microgrids (numpy) keeps this order."""
    values = [v for v, _ in entries]
    caps = [c if c is not None else 10**7 for _, c in entries] if capped else None
    floors = [
        math.floor(v) if caps is None else min(math.floor(v), caps[k]) for k, v in enumerate(values)
    ]
    total = round(sum(values)) + shift
    try:
        out = to_ints_with_total(np.array(values), total, caps)
    except ValueError:
        missing = total - sum(floors)
        room = [k for k in range(len(values)) if caps is None or floors[k] < caps[k]]
        assert missing > len(room) or -missing > sum(f > 0 for f in floors)
        return
    assert sum(out) == total and all(isinstance(v, int) for v in out)
    frac = [v - f for v, f in zip(values, floors, strict=True)]
    moved = [o - f for o, f in zip(out, floors, strict=True)]
    step = 1 if total >= sum(floors) else -1
    assert all(m in (0, step) for m in moved)
    if caps is not None:
        assert all(o <= c for o, c in zip(out, caps, strict=True))

    def eligible(k: int) -> bool:
        if step == 1:
            return caps is None or floors[k] < caps[k]
        return floors[k] > 0

    got = [k for k, m in enumerate(moved) if m]
    passed = [k for k, m in enumerate(moved) if not m and eligible(k)]
    # every entry that got a unit ranks before every eligible one that did not
    key = (lambda k: (-frac[k], k)) if step == 1 else (lambda k: (frac[k], k))
    assert all(key(a) < key(b) for a in got for b in passed)
