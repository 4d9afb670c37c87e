"""Clearing (M2-M4): hand-checked cases, decomposition, bargaining properties and determinism."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clearing_cases import FEE, microgrid, request, two_microgrids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterchain.market.clearing import (
    ClearingRequest,
    ClearingResult,
    MicrogridPlan,
    WindowTrade,
    _costs_e12,
    _window_costs_exact,
    _window_trades,
    clear,
    equal_shares,
    keep_storage_in_bounds,
    north_west_corner,
    soc_series,
    storage_rounded,
    window_costs,
)
from meterchain.market.errors import InvalidRequest, InvalidResult
from meterchain.market.model import MAX_POWER_W, GasTurbine, Market, Storage, TradeRequest
from meterchain.market.settlement import metered_from_dispatch, parties_sum, settle
from meterchain.market.units import div_round
from meterchain.market.verify import check

REPO = Path(__file__).resolve().parents[2]


def test_two_microgrids_by_hand() -> None:
    """a: R 100, L 50, G 20 kW; b: R 0, L 80, G 60 kW; lambda 0.8, gamma 0.25, phi 0.05,
    c 0.4 currency/kWh; wear epsilon 0.05 minor units per kW^2 h.

    Alone: a exports 50 kWh at 2500 -> -125 000; b imports 80 kWh at 8000 and misses
    60 kWh of green at 4000 -> 640 000 + 240 000 = 880 000.
    Together, every kWh a sells up to 60 saves b its green loss (4000) at a cost of at
    most phi (500); beyond 60 it only swaps grid energy and loses phi: a sells 60 kWh,
    covering its own 50 kWh surplus and importing 10 kWh.
    a: 10 * 8000 + 250 * 60 + 0.05 * 60^2 = 95 180; b: 20 * 8000 + 15 000 + 180 = 175 180.
    Savings 484 640, 242 320 each: a receives 462 500, b pays it. Energy is priced in the
    middle of the band (2500 + 8000) / 2 = 5250 per kWh: 315 000 for 60 kWh; the other
    147 500 is the labelled bargaining transfer from b to a.
    """
    result = clear(two_microgrids())
    hour = result.executed[0]
    assert result.standalone_cost == (-125_000, 880_000)
    assert result.cooperative_cost == (95_180, 175_180)
    assert hour.standalone_cost == (-125_000, 880_000)
    assert hour.cost == (95_180, 175_180)
    assert hour.saving == 484_640
    assert hour.payments == (-462_500, 462_500)
    assert [(t.seller, t.buyer, t.energy_wh, t.amount, t.price_per_kwh) for t in hour.trades] == [
        ("a", "b", 60_000, 315_000, 5_250)
    ]
    assert hour.price_per_kwh == 5_250
    assert [(t.payer, t.payee, t.amount) for t in hour.transfers] == [("b", "a", 147_500)]
    assert hour.coalition == ("a", "b") and hour.individually_rational
    a, b = hour.dispatch
    assert (a.sell_w, a.grid_w, b.buy_w, b.grid_w) == (60_000, 10_000, 60_000, 20_000)
    # final costs fall by the same amount
    assert [hour.standalone_cost[i] - hour.final_cost(i) for i in range(2)] == [242_320, 242_320]


def test_seller_short_of_surplus_sells_all_it_has() -> None:
    """Seller has 30 kW green surplus, buyer 60 kW green deficit: all 30 kW is traded."""
    result = clear(
        request(microgrid("s", 50_000, 40_000, 20_000), microgrid("t", 0, 80_000, 60_000))
    )
    hour = result.executed[0]
    assert hour.trades[0].energy_wh == 30_000
    seller, buyer = hour.dispatch
    assert seller.grid_w == 40_000 + 30_000 - 50_000  # imports for its own grey load
    assert buyer.grid_w == 80_000 - 30_000


def test_no_gain_no_trade() -> None:
    """Two microgrids with green surplus: nothing to gain, nobody trades or pays."""
    result = clear(
        request(microgrid("x", 100_000, 20_000, 10_000), microgrid("y", 90_000, 30_000, 10_000))
    )
    hour = result.executed[0]
    assert hour.coalition == () and hour.trades == () and hour.payments == (0, 0)
    assert hour.dispatch == hour.standalone and hour.saving == 0
    assert result.window_trades == ()


def test_wheeling_fee_above_gain_stops_trade() -> None:
    """A fee larger than lambda - gamma + c makes trading a loss."""
    market = Market(wheeling_fee_per_kwh=20_000)
    result = clear(
        request(
            microgrid("a", 100_000, 50_000, 20_000),
            microgrid("b", 0, 80_000, 60_000),
            market=market,
        )
    )
    assert result.executed[0].trades == ()


def test_north_west_corner_degenerate_cells_form_a_tree() -> None:
    cells = north_west_corner([("A", 50), ("B", 50)], [("X", 50), ("Y", 50)])
    assert cells == [(0, 0, 50), (1, 0, 0), (1, 1, 50)]
    cells = north_west_corner([("A", 10), ("B", 100)], [("X", 55), ("Y", 55)])
    assert cells == [(0, 0, 10), (1, 0, 45), (1, 1, 55)]
    with pytest.raises(ValueError):
        north_west_corner([("A", 10)], [("X", 11)])


def test_equalisation_is_a_labelled_transfer_not_a_price() -> None:
    """Two identical sellers and two buyers with different loss coefficients: both trades
    carry the same energy price; the buyer that gains more pays the difference as a
    bargaining transfer, so every member's cost falls by the same amount."""
    seller = dict(renewable=100_000, load=40_000, green=20_000)
    buyers = [microgrid(f"b{k}", 0, 80_000, 60_000, loss=4_000 + 2_000 * k) for k in range(2)]
    result = clear(
        request(microgrid("s0", **seller), microgrid("s1", **seller), *buyers)  # type: ignore[arg-type]
    )
    hour = result.executed[0]
    assert [(t.seller, t.buyer, t.energy_wh) for t in hour.trades] == [
        ("s0", "b0", 60_000),
        ("s1", "b1", 60_000),
    ]
    assert {t.price_per_kwh for t in hour.trades} == {hour.price_per_kwh}
    assert 2_500 <= hour.price_per_kwh <= 8_000
    assert hour.transfers and all(t.amount > 0 for t in hour.transfers)
    gains = [hour.standalone_cost[i] - hour.final_cost(i) for i in range(4)]
    assert max(gains) - min(gains) <= 1
    money_in = {mg: 0 for mg in result.microgrids}
    for t in hour.trades:
        money_in[t.seller] += t.amount
        money_in[t.buyer] -= t.amount
    for t in hour.transfers:
        money_in[t.payee] += t.amount
        money_in[t.payer] -= t.amount
    assert [money_in[mg] for mg in result.microgrids] == [-p for p in hour.payments]
    assert check(request(microgrid("s0", **seller), microgrid("s1", **seller), *buyers), result)  # type: ignore[arg-type]


def test_equal_shares_split_remainder_by_id_order() -> None:
    assert equal_shares(10, 3) == [4, 3, 3]
    assert equal_shares(-10, 3) == [-3, -3, -4]
    assert sum(equal_shares(1_234_567, 7)) == 1_234_567


def test_reference_window(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    result = reference_result
    hour = result.executed[0]
    assert result.periods == 24 and result.first_period == 0
    assert sum(result.cooperative_cost) < sum(result.standalone_cost)
    assert hour.individually_rational and sum(hour.payments) == 0
    assert set(hour.coalition) >= {"mg4-wind-farm"}  # the night seller
    for i, p in enumerate(result.plan):
        mg = reference_request.microgrids[i]
        for t in range(24):
            d = p.at(t)
            assert mg.renewable_w[t] + d.gas_w + d.discharge_w + d.grid_w + d.buy_w == (
                mg.load_w[t] + d.charge_w + d.sell_w
            )
            assert not (d.sell_w and d.buy_w)
    for t in range(24):
        sold = sum(p.sell_w[t] for p in result.plan)
        assert sold == sum(p.buy_w[t] for p in result.plan)
        assert sold == sum(w.energy_wh for w in result.window_trades if w.period == t)
    # a trade is stored once, seller to buyer: P_ij = -P_ji by construction
    pairs = [(w.period, w.seller, w.buyer) for w in result.window_trades]
    assert len(pairs) == len(set(pairs))
    assert all((p, b, s) not in set(pairs) for p, s, b in pairs)


def test_day_ahead_mode_executes_every_hour(reference_request: ClearingRequest) -> None:
    day_ahead = ClearingRequest(
        reference_request.market, 0, reference_request.requests, executed_periods=24
    )
    result = clear(day_ahead)
    assert [h.period for h in result.executed] == list(range(24))
    for t, hour in enumerate(result.executed):
        assert hour.dispatch == tuple(p.at(t) for p in result.plan)
        assert sum(hour.payments) == 0
    assert check(day_ahead, result)


def test_microgrid_that_cannot_run_alone_is_left_out_with_a_reason() -> None:
    """Finding 2: an import limit below its load used to abort everyone's clearing."""
    island = microgrid("island", 0, 50_000, 0, import_limit=10_000)
    req = request(microgrid("a", 100_000, 50_000, 20_000), island)
    result = clear(req)
    assert [mg for mg, _ in result.excluded] == ["island"]
    assert "no feasible schedule of its own" in result.excluded[0][1]
    assert result.microgrids == ("a",) and len(result.executed) == 1
    assert check(req, result).accepted
    assert ClearingResult.from_cbor(result.to_cbor()) == result
    # a backup that is told someone else is left out refuses
    lie = dataclasses.replace(result, excluded=(("a", "made up"),))
    assert not check(req, lie).accepted
    # the island still settles its grid exchange; money is conserved
    meters = [
        metered_from_dispatch("a", 0, 0, 0, 100_000, 20_000, 50_000),
        metered_from_dispatch("island", 0, 0, 0, 0, 0, 50_000),
    ]
    s = settle(req, result, meters)
    assert parties_sum(s) == 0
    assert {e.reason for e in s.entries if "island" in (e.payer, e.payee)} == {"retail"}


def test_nobody_able_to_run_alone_clears_an_empty_market() -> None:
    req = request(microgrid("island", 0, 50_000, 0, import_limit=10_000))
    result = clear(req)
    assert result.microgrids == () and result.executed == ()
    assert [mg for mg, _ in result.excluded] == ["island"]
    assert check(req, result).accepted


def test_request_validation() -> None:
    a, b = microgrid("a", 1, 1, 0), microgrid("b", 1, 1, 0)
    with pytest.raises(InvalidRequest, match="microgrid a has more than one request"):
        request(a, a)
    with pytest.raises(InvalidRequest, match=r"deposit \(5\) < market min_deposit \(10\)"):
        request(a, b, deposit=5, market=Market(FEE, min_deposit=10))
    with pytest.raises(InvalidRequest, match="covers 2 periods"):
        request(a, microgrid("c", (1, 1), 1, 0))
    with pytest.raises(InvalidRequest, match="executed_periods"):
        request(a, b, executed_periods=2)
    with pytest.raises(InvalidRequest, match="at least one"):
        ClearingRequest(Market(FEE), 0, ())


def test_request_and_result_round_trip_canonical_cbor() -> None:
    req = two_microgrids(deposit=1_000)
    assert ClearingRequest.from_cbor(req.to_cbor()) == req
    result = clear(req)
    again = ClearingResult.from_cbor(result.to_cbor())
    assert again == result and again.digest == result.digest
    with pytest.raises(InvalidResult):
        ClearingResult.from_cbor(b"\xa0")
    with pytest.raises(InvalidResult):
        ClearingResult.from_dict({**result.to_dict(), "plan": [[[1.5]]]})


def test_same_input_same_bytes_twice_and_in_a_fresh_process(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    assert clear(reference_request).to_cbor() == reference_result.to_cbor()
    code = (
        "from meterchain.market.reference import reference_request\n"
        "from meterchain.market.clearing import clear\n"
        "print(clear(reference_request()).digest.hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == reference_result.digest.hex()


@st.composite
def small_requests(draw: st.DrawFn) -> ClearingRequest:
    """2-4 microgrids over 1-3 hours, some with gas or storage, prices and profiles random."""
    periods = draw(st.integers(1, 3))
    n = draw(st.integers(2, 4))
    power = st.integers(0, 200).map(lambda kw: kw * 1_000)
    mgs = []
    for k in range(n):
        ren = tuple(draw(power) for _ in range(periods))
        load = tuple(draw(power) for _ in range(periods))
        green = tuple(x * draw(st.integers(0, 100)) // 100 for x in load)
        retail = tuple(draw(st.integers(3_000, 12_000)) for _ in range(periods))
        gas = None
        if draw(st.booleans()):
            gas = GasTurbine(
                a_per_mw2h=draw(st.integers(0, 5_000_000)),
                b_per_kwh=draw(st.integers(3_000, 7_000)),
                p_max_w=draw(power),
            )
        storage = None
        if draw(st.booleans()):
            cap = draw(st.integers(10, 300)) * 1_000
            storage = Storage(
                cap // 2, cap // 2, draw(st.integers(850_000, 1_000_000)), 0, cap, cap // 2
            )
        mgs.append(
            microgrid(
                f"m{k}",
                ren,
                load,
                green,
                retail=retail,
                loss=draw(st.integers(0, 8_000)),
                gas=gas,
                storage=storage,
            )
        )
    market = Market(wheeling_fee_per_kwh=draw(st.integers(0, 2_000)))
    return ClearingRequest(market, 0, tuple(TradeRequest(m) for m in mgs))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_requests())
def test_equal_split_and_individual_rationality(req: ClearingRequest) -> None:
    """M3 over the window: members gain the same, valued as if the market stopped after the
    executed hour (C_non_i - final cost - V_i, plus the investment credit of an hour that
    pays off only later), and nobody gains less than zero."""
    result = clear(req)
    hour = result.executed[0]
    n = len(req.ids)
    assert sum(hour.payments) == 0
    assert hour.individually_rational
    members = [req.ids.index(m) for m in hour.coalition]
    gains = [
        result.standalone_cost[i]
        - hour.final_cost(i)
        - hour.continuation_cost[i]
        + hour.investment_credit[i]
        for i in members
    ]
    if members:
        assert hour.window_saving > 0
        assert max(gains) - min(gains) <= 1  # equal split, to the minor unit
        assert min(gains) >= 0
        assert sum(gains) == hour.saving + sum(hour.investment_credit)
        assert sum(hour.investment_credit) in (0, -hour.saving)
    for i in range(n):
        if i not in members:  # outside the coalition: own disagreement hour, no money
            assert hour.payments[i] == 0 and hour.dispatch[i] == hour.standalone[i]
    # energy is priced inside the band, the rest is a labelled transfer
    for t in hour.trades:
        s, b = req.ids.index(t.seller), req.ids.index(t.buyer)
        low = req.microgrids[s].feed_in_tariff_per_kwh
        assert low <= t.price_per_kwh <= req.microgrids[b].retail_price_per_kwh[0]
    # the cooperative optimum is never worse than everyone alone (within rounding)
    assert sum(result.cooperative_cost) <= sum(result.standalone_cost) + 2 * n * req.periods
    # a backup accepts the honest result, also when it was solved by another solver
    verdict = check(req, result, own=result)
    assert verdict.accepted, verdict.problems
    verdict = check(req, clear(req, solver="clarabel"), own=result)
    assert verdict.accepted, verdict.problems


def test_pool_reaches_the_all_pairs_bilateral_optimum() -> None:
    """The pool (sum s = sum b) is the aggregate of bilateral trades with a uniform wheeling
    fee: cvxpy's all-pairs model (the benchmark anchor) finds the same optimum."""
    from bench.clear import SEED, anchor_solve
    from meterchain.market.reference import synthetic_request

    ours = clear(synthetic_request(6, SEED))
    anchor = anchor_solve(6)
    assert abs(sum(ours.cooperative_cost) - anchor["objective_minor"]) <= 1e-5 * abs(
        anchor["objective_minor"]
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_requests(), st.data())
def test_vectorised_window_costs_equal_the_exact_loop(req: ClearingRequest, data: st.DataObject):
    """`window_costs` (numpy int64 where safe) gives the same integers as the per-period
    loop on any integer plan, including ones a forger might send (huge or negative flows)."""
    flow = st.one_of(st.integers(-300_000, 300_000), st.integers(-(10**12), 10**12))
    plans = []
    for mg in req.microgrids:
        series = [tuple(data.draw(flow) for _ in range(mg.periods)) for _ in range(6)]
        soc = tuple(data.draw(st.integers(0, 10**6)) for _ in range(mg.periods))
        plans.append(MicrogridPlan(mg.id, *series, soc))
    for first in range(req.periods):
        assert _costs_e12(req, plans, first) == _window_costs_exact(req, plans, first)
    assert window_costs(req, plans)[0] == div_round(_window_costs_exact(req, plans)[0], 10**12)


@st.composite
def storages(draw: st.DrawFn) -> Storage:
    """Any valid storage: round and odd efficiencies, from a few Wh to 10 GWh (the int64 path
    and, above a few MWh at an odd efficiency, the exact per-microgrid loop)."""
    cap = draw(st.one_of(st.integers(0, 1_000), st.integers(0, 10**7), st.integers(0, 10**12)))
    e_min = draw(st.integers(0, cap))
    power = st.integers(0, min(max(cap, 1), MAX_POWER_W))
    return Storage(
        charge_max_w=draw(power),
        discharge_max_w=draw(power),
        efficiency_ppm=draw(st.sampled_from([10**6, 950_000]) | st.integers(1, 10**6)),
        e_min_wh=e_min,
        e_max_wh=cap,
        soc_wh=draw(st.integers(e_min, cap)),
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), storages()), min_size=1, max_size=6), st.data())
def test_storage_rounded_for_all_at_once_equals_the_per_microgrid_loop(
    stores: list[Storage | None], data: st.DataObject
) -> None:
    """`storage_rounded` (int64 across microgrids where no numerator can overflow) gives the
    integers of `keep_storage_in_bounds` then `soc_series`, one microgrid at a time, for
    flows that overrun either bound, mixed storages and none."""
    periods = data.draw(st.integers(1, 5))
    mgs = [microgrid(f"m{k}", (0,) * periods, 0, 0, storage=s) for k, s in enumerate(stores)]
    flows = []
    for s in stores:
        top = [0 if s is None else s.charge_max_w, 0 if s is None else s.discharge_max_w]
        flows.append([[data.draw(st.integers(0, cap)) for _ in range(periods)] for cap in top])
    charge = np.array([f[0] for f in flows], dtype=np.int64)
    discharge = np.array([f[1] for f in flows], dtype=np.int64)
    got = storage_rounded(mgs, charge, discharge)
    for i, mg in enumerate(mgs):
        ch, dis = charge[i].tolist(), discharge[i].tolist()
        keep_storage_in_bounds(mg, ch, dis)
        assert got[0][i].tolist() == ch
        assert got[1][i].tolist() == dis
        assert got[2][i].tolist() == soc_series(mg, ch, dis)


def test_storage_rounded_moves_flows_at_both_bounds() -> None:
    """Worst cases by hand: charging past e_max and discharging past e_min are cut in the
    period where they happen, at an efficiency that leaves fractions of a Wh."""
    sto = Storage(100_000, 100_000, 923_457, 10_000, 50_000, 45_000)
    mg = microgrid("m", (0, 0, 0, 0), 0, 0, storage=sto)
    charge = np.array([[9_000, 0, 0, 0]], dtype=np.int64)
    discharge = np.array([[0, 40_000, 3_000, 100_000]], dtype=np.int64)
    ch, dis, soc = (a[0].tolist() for a in storage_rounded([mg], charge, discharge))
    # 45,000 + 0.923457 x 5,414 = 49,999.596 Wh; one W more would end above e_max
    assert ch == [5_414, 0, 0, 0]
    # 49,999.596 - 36,937 / 0.923457 = 10,000.98 Wh; one W more ends below e_min, and
    # then even 1 W of discharge (1.08 Wh) would, so later discharge is cut to nothing
    assert dis == [0, 36_937, 0, 0]
    assert soc == [50_000, 10_001, 10_001, 10_001]
    ref_ch, ref_dis = charge[0].tolist(), discharge[0].tolist()
    keep_storage_in_bounds(mg, ref_ch, ref_dis)
    assert (ch, dis, soc) == (ref_ch, ref_dis, soc_series(mg, ref_ch, ref_dis))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_window_trades_are_the_north_west_corner_cells_of_each_period(data: st.DataObject) -> None:
    """All periods at once give the positive north-west-corner cells in the same order,
    with small volumes so running totals tie often (the degenerate zero cells)."""
    n, periods = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 3))
    sell = [[0] * periods for _ in range(n)]
    buy = [[0] * periods for _ in range(n)]
    for t in range(periods):
        for i in range(n):
            side = data.draw(st.sampled_from([sell, buy, None]))
            if side is not None:
                side[i][t] = data.draw(st.integers(1, 4))
        # balance the period where a microgrid is free to take the gap (else it stays
        # unbalanced, which must be refused)
        gap = sum(row[t] for row in sell) - sum(row[t] for row in buy)
        short, other = (buy, sell) if gap > 0 else (sell, buy)
        free = [i for i in range(n) if not other[i][t]]
        if free:
            short[free[0]][t] += abs(gap)
    zeros = (0,) * periods
    plans = [
        MicrogridPlan(f"m{i}", zeros, zeros, zeros, zeros, tuple(sell[i]), tuple(buy[i]), zeros)
        for i in range(n)
    ]
    try:
        expected = []
        for t in range(periods):
            sellers = [(p.id, p.sell_w[t]) for p in plans if p.sell_w[t] > 0]
            buyers = [(p.id, p.buy_w[t]) for p in plans if p.buy_w[t] > 0]
            expected += [
                WindowTrade(9 + t, sellers[i][0], buyers[j][0], wh)
                for i, j, wh in north_west_corner(sellers, buyers)
                if wh > 0
            ]
    except ValueError:
        with pytest.raises(ValueError, match="pool sales and purchases differ"):
            _window_trades(9, plans)
        return
    assert _window_trades(9, plans) == expected
