"""SC2 settlement (M5, M6): deliveries, penalties, fees, deposits; money is always conserved."""

from __future__ import annotations

import pytest
from clearing_cases import microgrid, request, two_microgrids
from hypothesis import given, settings
from hypothesis import strategies as st

from meterchain.market.clearing import ClearingRequest, ClearingResult, clear
from meterchain.market.errors import SettlementError
from meterchain.market.model import GRID_COMPANY, RESERVE
from meterchain.market.settlement import (
    MeteredHour,
    metered_from_dispatch,
    parties_sum,
    settle,
)
from meterchain.market.units import split_pro_rata

DEPOSIT = 1_000


@pytest.fixture(scope="module")
def pair() -> tuple[ClearingRequest, ClearingResult]:
    """a sells b 60 kWh for 315 000 (5250 per kWh) plus a 147 500 bargaining transfer."""
    req = two_microgrids(deposit=DEPOSIT)
    return req, clear(req)


def _meters(a_green: int, b_green: int = 0) -> list[MeteredHour]:
    """Meters when gas/storage follow the plan (none here) and the grid absorbs deviations."""
    return [
        metered_from_dispatch("a", 0, 0, 0, a_green, 20_000, 50_000),
        metered_from_dispatch("b", 0, 0, 0, b_green, 60_000, 80_000),
    ]


def _entries(settlement) -> list[tuple[str, str, int, str]]:  # type: ignore[no-untyped-def]
    return [(e.payer, e.payee, e.amount, e.reason) for e in settlement.entries]


def test_full_delivery_by_hand(pair: tuple[ClearingRequest, ClearingResult]) -> None:
    req, result = pair
    s = settle(req, result, _meters(100_000))
    assert _entries(s) == [
        ("a", RESERVE, 1_000, "deposit"),
        ("b", RESERVE, 1_000, "deposit"),
        ("b", "a", 315_000, "energy"),
        ("a", GRID_COMPANY, 15_000, "wheeling"),  # 60 kWh * 500 / 2
        ("b", GRID_COMPANY, 15_000, "wheeling"),
        ("b", "a", 147_500, "bargaining-transfer"),
        ("a", GRID_COMPANY, 80_000, "retail"),  # a imports 10 kWh for its own grey load
        ("b", GRID_COMPANY, 160_000, "retail"),  # b imports the other 20 kWh at 8000
        (RESERVE, "a", 1_000, "deposit-refund"),
        (RESERVE, "b", 1_000, "deposit-refund"),
    ]
    assert s.balances() == {"a": 367_500, "b": -637_500, GRID_COMPANY: 270_000, RESERVE: 0}
    assert parties_sum(s) == 0 and s.penalty_total == 0 and s.forfeited == ()
    # a's money outcome is its bargained final cost (95 180 - 462 500) less the wear term (180)
    hour = result.executed[0]
    assert -s.balances()["a"] == hour.final_cost(0) - 180


def test_shortfall_pays_loss_and_price_gap(pair: tuple[ClearingRequest, ClearingResult]) -> None:
    """a generates 70 kWh: 20 serve its green demand, 50 reach b, 10 are short.
    b pays 315 000 * 50/60 = 262 500; a pays b 10 kWh * (4000 + 8000 - 5250) = 67 500.
    The bargaining transfer is paid as cleared: the penalty already makes b whole."""
    req, result = pair
    s = settle(req, result, _meters(70_000))
    assert [(d.cleared_wh, d.delivered_wh, d.short_wh) for d in s.deliveries] == [
        (60_000, 50_000, 10_000)
    ]
    entries = _entries(s)
    assert ("b", "a", 262_500, "energy") in entries
    assert ("a", "b", 67_500, "shortfall") in entries
    assert ("b", "a", 147_500, "bargaining-transfer") in entries
    assert ("a", GRID_COMPANY, 12_500, "wheeling") in entries
    # a exported 20 kWh but delivered 50: it bought 30 kWh from the grid
    assert ("a", GRID_COMPANY, 240_000, "retail") in entries
    assert s.penalty_total == 67_500 and s.short_wh == 10_000
    assert parties_sum(s) == 0 and s.forfeited == ()


def test_deposit_forfeited_below_half_delivery(
    pair: tuple[ClearingRequest, ClearingResult],
) -> None:
    req, result = pair
    s = settle(req, result, _meters(45_000))  # 25 of 60 kWh delivered
    assert s.forfeited == ("a",)
    assert (RESERVE, "a", DEPOSIT, "deposit-refund") not in _entries(s)
    assert s.balances()[RESERVE] == DEPOSIT
    assert parties_sum(s) == 0


def test_seller_delivers_pro_rata_to_several_buyers() -> None:
    req = request(
        microgrid("b0", 0, 50_000, 30_000),
        microgrid("b1", 0, 70_000, 45_000, loss=6_000),
        microgrid("s", 120_000, 40_000, 20_000),
    )
    result = clear(req)
    trades = result.executed[0].trades
    assert {t.buyer for t in trades} == {"b0", "b1"} and {t.seller for t in trades} == {"s"}
    meters = [
        metered_from_dispatch("b0", 0, 0, 0, 0, 30_000, 50_000),
        metered_from_dispatch("b1", 0, 0, 0, 0, 45_000, 70_000),
        metered_from_dispatch("s", 0, 0, 0, 20_000 + 33_333, 20_000, 40_000),
    ]
    s = settle(req, result, meters)
    cleared = [d.cleared_wh for d in s.deliveries]
    assert [d.delivered_wh for d in s.deliveries] == split_pro_rata(33_333, cleared)
    assert sum(d.delivered_wh for d in s.deliveries) == 33_333
    assert parties_sum(s) == 0


def test_bad_meter_data_is_refused(pair: tuple[ClearingRequest, ClearingResult]) -> None:
    req, result = pair
    with pytest.raises(SettlementError, match="microgrid b: no metered values"):
        settle(req, result, _meters(100_000)[:1])
    with pytest.raises(SettlementError, match="metered twice"):
        settle(req, result, _meters(100_000) + _meters(100_000)[:1])
    with pytest.raises(SettlementError, match="metered load_wh \\(-1\\)"):
        MeteredHour("a", 0, 0, -1, 0, 0)
    with pytest.raises(SettlementError, match="green_demand_wh \\(5\\) > load_wh \\(4\\)"):
        MeteredHour("a", 0, 5, 4, 0, 0)
    with pytest.raises(SettlementError, match="does not belong to this request"):
        settle(two_microgrids(deposit=7), result, _meters(100_000))
    with pytest.raises(SettlementError, match="hour 3 was not executed"):
        settle(req, result, _meters(100_000), period=3)


def test_physically_impossible_meter_values_are_refused(
    pair: tuple[ClearingRequest, ClearingResult],
) -> None:
    """Finding 8: 10^12 Wh imported and exported in one hour used to settle."""
    req, result = pair
    huge = [
        MeteredHour("a", 100_000, 20_000, 50_000, 10**12, 10**12),
        _meters(100_000)[1],
    ]
    with pytest.raises(SettlementError, match="microgrid a: metered grid_import_wh .* impossible"):
        settle(req, result, huge)
    # a meter that reads far beyond the microgrid's own size is refused too
    too_big = [MeteredHour("a", 100_000, 20_000, 50_000, 5_000_000, 0), _meters(100_000)[1]]
    # a: 50 kW load + 100 kW PV -> limit 10 * 150 kWh + 1 MWh = 2.5 MWh
    with pytest.raises(SettlementError, match="physically impossible"):
        settle(req, result, too_big)


metered_values = st.integers(0, 800_000)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_money_is_conserved_in_every_settlement(
    reference_request: ClearingRequest, reference_result: ClearingResult, data: st.DataObject
) -> None:
    meters = []
    for mg_id in reference_request.ids:
        load = data.draw(metered_values)
        meters.append(
            MeteredHour(
                mg_id,
                green_generation_wh=data.draw(metered_values),
                green_demand_wh=data.draw(st.integers(0, load)),
                load_wh=load,
                grid_import_wh=data.draw(metered_values),
                grid_export_wh=data.draw(metered_values),
            )
        )
    s = settle(reference_request, reference_result, meters)
    assert parties_sum(s) == 0
    assert all(e.amount > 0 for e in s.entries)
    by_id = {m.microgrid: m for m in meters}
    per_seller: dict[str, int] = {}
    for d, t in zip(s.deliveries, reference_result.executed[0].trades, strict=True):
        assert 0 <= d.delivered_wh <= d.cleared_wh == t.energy_wh
        per_seller[d.seller] = per_seller.get(d.seller, 0) + d.delivered_wh
    for seller, delivered in per_seller.items():
        m = by_id[seller]
        assert delivered <= max(0, m.green_generation_wh - m.green_demand_wh)
    energy_paid = s.total("energy")
    assert energy_paid <= sum(abs(t.amount) for t in reference_result.executed[0].trades)
    assert s.penalty_total >= 0
    if all(d.short_wh == 0 for d in s.deliveries):
        assert s.penalty_total == 0
