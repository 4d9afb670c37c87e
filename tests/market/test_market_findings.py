"""Regression cases for the market findings of issue 14 and the properties that close them:
soft storage targets, second-solver confirmation, exclusion, window bargaining, band prices,
the lying-proposer bound."""

from __future__ import annotations

import dataclasses

import pytest
from clearing_cases import microgrid, request

from meterchain.market import qp as qp_mod
from meterchain.market.clearing import (
    ClearingRequest,
    ClearingResult,
    assemble,
    clear,
    soc_series,
    solve_window,
)
from meterchain.market.model import Storage, TradeRequest, target_shortfall_price
from meterchain.market.reference import reference_request, synthetic_case
from meterchain.market.verify import Tolerance, check, shave_bound


def test_a_window_that_cannot_meet_its_storage_target_still_clears() -> None:
    """Finding 1: the carried energy is 1 Wh below the end-of-window target and the battery
    cannot charge in the last one-hour window; the hard floor made the market infeasible."""
    sto = Storage(0, 10_000, 950_000, 1_000, 50_000, 29_999, e_final_min_wh=30_000)
    req = request(
        microgrid("a", 100_000, 50_000, 20_000, storage=sto),
        microgrid("b", 0, 80_000, 60_000),
    )
    result = clear(req)
    assert result.plan[0].soc_wh[-1] == 29_999  # nothing to discharge into: it keeps what it has
    # the shortfall is a planning cost (kappa per kWh), part of both C_non and C
    kappa = target_shortfall_price(req.microgrids[0])
    assert kappa == 2 * 8_000 * 1_000_000 // 950_000
    assert check(req, result).accepted


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_rounded_storage_energy_stays_within_its_bounds(seed: int) -> None:
    """Finding 1: rounding whole-W flows left the energy up to 1 Wh outside its bounds."""
    case = synthetic_case(8, seed)
    for first in (0, 11, 23):
        req = case.request(first, None)
        solved = solve_window(req)
        for plans in (solved.alone_plans, solved.coop_plans):
            for mg, plan in zip(req.microgrids, plans, strict=True):
                if mg.storage is None:
                    continue
                sto = mg.storage
                assert all(sto.e_min_wh <= e <= sto.e_max_wh for e in plan.soc_wh), mg.id
                assert list(plan.soc_wh) == soc_series(mg, plan.charge_w, plan.discharge_w)


def _zero_feed_in(seed: int, microgrids: int = 5) -> ClearingRequest:
    req = synthetic_case(microgrids, seed).request(0, None)
    return ClearingRequest(
        req.market,
        0,
        tuple(
            TradeRequest(dataclasses.replace(r.microgrid, feed_in_tariff_per_kwh=0), r.deposit)
            for r in req.requests
        ),
    )


def test_a_false_infeasible_from_one_solver_is_not_believed() -> None:
    """Finding 2: with a feed-in tariff of 0, PIQP (0.7) calls this feasible window
    infeasible; Clarabel solves it. `clear` must clear it and a backup must accept it."""
    req = _zero_feed_in(17)
    coop = qp_mod.build(req.market, req.microgrids, cooperative=True)
    x = qp_mod.solve(coop, "piqp")  # falls back to Clarabel where PIQP gives up
    assert x.shape == (coop.size,)
    result = clear(req)
    assert result.excluded == ()
    assert check(req, result, own=result).accepted


def test_both_solvers_must_agree_before_anything_is_infeasible() -> None:
    island = microgrid("island", 0, 50_000, 0, import_limit=10_000)
    alone = qp_mod.build(request(island).market, [island], cooperative=False)
    with pytest.raises(qp_mod.Infeasible, match="piqp infeasible, clarabel infeasible"):
        qp_mod.solve(alone, "piqp")


def test_a_storage_plan_that_pays_later_is_executed_not_discarded() -> None:
    """Finding 3: a buyer keeps its battery full for the evening peak and buys green power
    now; the executed hour alone saves nothing for it. Bargaining over the window keeps the
    plan, and nobody loses: the battery's energy is valued by what it saves later."""
    sto = Storage(50_000, 50_000, 950_000, 0, 100_000, 100_000, e_final_min_wh=0)
    buyer = microgrid(
        "buyer", (0, 0), (60_000, 60_000), (40_000, 0), retail=(4_000, 12_000), storage=sto
    )
    seller = microgrid("seller", (100_000, 0), (20_000, 0), (0, 0), retail=(4_000, 12_000))
    req = request(buyer, seller)
    result = clear(req)
    hour = result.executed[0]
    assert hour.coalition == ("buyer", "seller") and hour.trades
    assert hour.window_saving > 0
    assert hour.individually_rational
    assert check(req, result).accepted


def test_prices_stay_in_the_band_on_the_reference_day() -> None:
    """Finding 4: 30 of 65 reference trades were above retail and 12 negative."""
    for first in range(0, 24, 3):
        req = reference_request(first)
        hour = clear(req).executed[0]
        mgs = {mg.id: mg for mg in req.microgrids}
        for t in hour.trades:
            assert t.price_per_kwh == hour.price_per_kwh
            assert mgs[t.seller].feed_in_tariff_per_kwh <= t.price_per_kwh
            assert t.price_per_kwh <= mgs[t.buyer].retail_price_per_kwh[0]
            assert t.amount > 0


def _forge(
    req: ClearingRequest,
    honest: ClearingResult,
    liar: int,
    *,
    c_non: int = 0,
    v: int = 0,
    discharge_w: int = 0,
    standalone_w: int = 0,
) -> ClearingResult:
    """Re-derive a result exactly (as a lying primary would) from lied-about inputs."""
    plans = list(honest.plan)
    if discharge_w:
        p = plans[liar]
        dis = list(p.discharge_w)
        dis[0] += discharge_w
        grid = list(p.grid_w)
        grid[0] -= discharge_w
        soc = soc_series(req.microgrids[liar], p.charge_w, dis)
        plans[liar] = dataclasses.replace(
            p, discharge_w=tuple(dis), grid_w=tuple(grid), soc_wh=tuple(soc)
        )
    cost = list(honest.standalone_cost)
    cost[liar] += c_non
    hour = honest.executed[0]
    cont = list(hour.continuation_cost)
    cont[liar] -= v
    rows = list(hour.standalone)
    if standalone_w:
        d = rows[liar]
        rows[liar] = dataclasses.replace(
            d, discharge_w=d.discharge_w + standalone_w, grid_w=d.grid_w - standalone_w
        )
    return assemble(
        req,
        plans,
        standalone_rows=[rows],
        standalone_cost=cost,
        continuation_cost=cont,
        solver=honest.solver,
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_lying_proposer_gains_at_most_the_stated_bound(seed: int) -> None:
    """Finding 5: a primary reported ~1 kW more battery discharge in its own stand-alone row
    (inside the old 200 W + 0.2 % tolerance) and cut its payment by 1,156-3,825 per round.
    Payments now follow from C_non_i, V_i (cost allowances) and the plan (exact), so every
    forgery a backup accepts gains at most `shave_bound`; beyond it, forgeries are refused."""
    tol = Tolerance()
    case = synthetic_case(6, seed)
    accepted = 0
    for first in (0, 9, 17):
        req = case.request(first, None)
        honest = clear(req)
        hour = honest.executed[0]
        for mg_id in hour.coalition:
            liar = honest.microgrids.index(mg_id)
            bound = shave_bound(req, honest, mg_id, tol)
            mg = req.microgrids[liar]
            per_window = tol.cost_per_period * req.periods
            a1 = int(tol.cost_rel * abs(honest.standalone_cost[liar])) + per_window
            a2 = int(tol.cost_rel * abs(hour.continuation_cost[liar])) + per_window
            w = 40 if mg.storage is not None else 0
            lies = [
                {"c_non": a1},
                {"v": a2},
                {"c_non": a1, "v": a2},
                {"c_non": a1, "v": a2, "discharge_w": w},
                {"standalone_w": 1_000},
            ]
            for lie in lies:
                forged = _forge(req, honest, liar, **lie)
                if check(req, forged, own=honest).accepted:
                    accepted += 1
                    gain = hour.payments[liar] - forged.executed[0].payments[liar]
                    assert gain <= bound, (lie, gain, bound)
            # far beyond the allowances the lie is refused
            for lie in ({"c_non": 3 * bound}, {"v": 3 * bound}):
                assert not check(req, _forge(req, honest, liar, **lie), own=honest).accepted
            # the old attack moves no money any more
            moved = _forge(req, honest, liar, standalone_w=1_000).executed[0].payments
            assert moved[liar] == hour.payments[liar]
    assert accepted > 0  # the bound is tested on forgeries that do get through
