"""A consensus backup's check of a proposed clearing (M7 step 3) without trusting the proposer.

API: ``check(request, proposed, *, own=None, solver="piqp", tolerance=Tolerance())
-> Verdict``. ``Verdict.accepted`` is True only when ``problems`` is empty;
each problem is one sentence naming the microgrid, period and field. Pass
``own`` (this node's `clear(request)`) to avoid solving twice.

What is checked, and how strictly:

* Identity: the result is for this request (digest), lists its microgrids,
  window and executed periods.
* Feasibility of the cooperative plan, exactly where rounding allows it: every
  balance R + gas + discharge + grid + buy = L + charge + sell holds to the Wh;
  gas, storage and sale limits hold; nobody both sells and buys; pool sales
  equal pool purchases each period; storage energy is exactly what the shared
  rounding (`clearing.soc_series`) gives from the flows, and stays within its
  bounds to a few Wh; grid imports within their limit to a few W. The same for
  the disagreement hours it reports.
* Optimality, within tolerance (optima may be reached by different solvers or
  builds, so vectors are never compared bit for bit): the plan's total cost is
  within ``Tolerance`` of this node's own optimum; each disagreement cost
  C_non_i and each executed-hour disagreement and cooperative flow is within
  tolerance of this node's own (the flow wear term makes the optimum unique, so
  an honest solver lands close).
* Everything derived (trades, costs, savings, equal split, payments, prices,
  transfers, individual rationality) is recomputed exactly with
  `clearing.assemble` from the proposal's own integer schedules and must match
  to the unit: one moved price, one changed volume or one lowered seller price
  is a mismatch. Payments must sum to zero and the savings must be split
  equally (to one minor unit) -- reported separately for a clear message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from meterchain.market.clearing import (
    DEFAULT_SOLVER,
    ClearingRequest,
    ClearingResult,
    ExecutedHour,
    MicrogridPlan,
    assemble,
    clear,
    participants,
    soc_series,
)
from meterchain.market.errors import MarketError
from meterchain.market.model import Dispatch, Microgrid, target_shortfall_price


@dataclass(frozen=True)
class Tolerance:
    """How far an honest proposal may sit from this node's own solve.

    Costs: ``cost_rel`` of the cost scale plus ``cost_per_period`` minor units
    per microgrid-period (integer rounding of an optimum moves its cost by a
    few units). Power: ``power_w`` plus ``power_rel`` of the microgrid's size.
    Storage energy bounds may be exceeded by ``energy_wh`` (rounding of flows).
    """

    cost_rel: float = 1e-6
    cost_per_period: int = 4
    power_w: int = 50
    power_rel: float = 1e-4
    energy_wh: int = 30


@dataclass(frozen=True)
class Verdict:
    """Outcome of a check: accepted iff no problems."""

    accepted: bool
    problems: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.accepted


def _scale_w(mg: Microgrid) -> int:
    """A microgrid's size in W: the largest power it can move."""
    sizes = [max(mg.load_w), max(mg.renewable_w)]
    if mg.gas is not None:
        sizes.append(mg.gas.p_max_w)
    if mg.storage is not None:
        sizes += [mg.storage.charge_max_w, mg.storage.discharge_max_w]
    return max(sizes)


def _check_row(
    mg: Microgrid, t: int, d: Dispatch, prev_soc: int | None, where: str, tol: Tolerance
) -> list[str]:
    """Feasibility of one dispatch row of microgrid ``mg`` in window period ``t``."""
    problems = []
    lhs = mg.renewable_w[t] + d.gas_w + d.discharge_w + d.grid_w + d.buy_w
    rhs = mg.load_w[t] + d.charge_w + d.sell_w
    if lhs != rhs:
        problems.append(f"{where}: power balance off by {lhs - rhs} W")
    if mg.gas is None:
        if d.gas_w:
            problems.append(f"{where}: gas_w {d.gas_w} without a gas turbine")
    elif not mg.gas.p_min_w <= d.gas_w <= mg.gas.p_max_w:
        problems.append(f"{where}: gas_w {d.gas_w} outside [{mg.gas.p_min_w}, {mg.gas.p_max_w}]")
    sto = mg.storage
    if sto is None:
        if d.charge_w or d.discharge_w or d.soc_wh:
            problems.append(f"{where}: storage flows without storage")
    else:
        if not 0 <= d.charge_w <= sto.charge_max_w:
            problems.append(f"{where}: charge_w {d.charge_w} outside [0, {sto.charge_max_w}]")
        if not 0 <= d.discharge_w <= sto.discharge_max_w:
            problems.append(
                f"{where}: discharge_w {d.discharge_w} outside [0, {sto.discharge_max_w}]"
            )
        if not sto.e_min_wh - tol.energy_wh <= d.soc_wh <= sto.e_max_wh + tol.energy_wh:
            problems.append(f"{where}: soc_wh {d.soc_wh} outside [{sto.e_min_wh}, {sto.e_max_wh}]")
        if prev_soc is not None:
            num, den = sto.energy_step_exact(prev_soc, d.charge_w, d.discharge_w)
            if abs(d.soc_wh * den - num) > den:  # more than 1 Wh from the exact step
                problems.append(f"{where}: soc_wh {d.soc_wh} does not follow the storage flows")
    if not 0 <= d.sell_w <= mg.green_surplus_w(t):
        problems.append(
            f"{where}: sell_w {d.sell_w} outside [0, green surplus {mg.green_surplus_w(t)}]"
        )
    if d.buy_w < 0:
        problems.append(f"{where}: buy_w {d.buy_w} < 0")
    if d.sell_w and d.buy_w:
        problems.append(f"{where}: both sells and buys")
    limit = mg.grid_import_limit_w
    if limit is not None and d.grid_w > limit + tol.power_w:
        problems.append(f"{where}: grid import {d.grid_w} W above limit {limit} W")
    return problems


def _check_plan(
    request: ClearingRequest, plans: Sequence[MicrogridPlan], tol: Tolerance
) -> list[str]:
    problems: list[str] = []
    for mg, plan in zip(request.microgrids, plans, strict=True):
        if plan.id != mg.id:
            problems.append(f"plan for {plan.id} where {mg.id} was expected")
            continue
        expected_soc = soc_series(mg, plan.charge_w, plan.discharge_w)
        if list(plan.soc_wh) != expected_soc:
            t = next(
                t for t, (a, b) in enumerate(zip(plan.soc_wh, expected_soc, strict=True)) if a != b
            )
            problems.append(
                f"microgrid {mg.id} period {request.first_period + t}: soc_wh {plan.soc_wh[t]} "
                f"is not the shared rounding of its flows ({expected_soc[t]})"
            )
        for t in range(mg.periods):
            where = f"microgrid {mg.id} period {request.first_period + t}"
            problems += _check_row(mg, t, plan.at(t), None, where, tol)
    for t in range(request.periods):
        sold = sum(p.sell_w[t] for p in plans)
        bought = sum(p.buy_w[t] for p in plans)
        if sold != bought:
            problems.append(
                f"period {request.first_period + t}: pool sales {sold} W != purchases {bought} W"
            )
    return problems


def _check_standalone_rows(
    request: ClearingRequest, executed: Sequence[ExecutedHour], tol: Tolerance
) -> list[str]:
    problems: list[str] = []
    for i, mg in enumerate(request.microgrids):
        prev = mg.storage.soc_wh if mg.storage is not None else None
        for h, hour in enumerate(executed):
            d = hour.standalone[i]
            where = f"microgrid {mg.id} period {hour.period} (disagreement)"
            if d.sell_w or d.buy_w:
                problems.append(f"{where}: trades without a market")
            problems += _check_row(mg, h, d, prev, where, tol)
            prev = d.soc_wh if mg.storage is not None else None
    return problems


def _near(a: int, b: int, allowed: float) -> bool:
    return abs(a - b) <= allowed


def _compare_with_own(
    request: ClearingRequest,
    proposed: ClearingResult,
    recomputed_coop: Sequence[int],
    own: ClearingResult,
    tol: Tolerance,
) -> list[str]:
    problems: list[str] = []
    n, periods = len(request.ids), request.periods
    scale = sum(abs(c) for c in own.standalone_cost) + sum(abs(c) for c in own.cooperative_cost)
    allowed = tol.cost_rel * scale + tol.cost_per_period * n * periods
    gap = sum(recomputed_coop) - sum(own.cooperative_cost)
    if not _near(gap, 0, allowed):
        problems.append(
            f"total window cost {sum(recomputed_coop)} is {gap:+d} from the optimum "
            f"{sum(own.cooperative_cost)} (allowed {allowed:.0f})"
        )
    for i, mg in enumerate(request.microgrids):
        mine, theirs = own.standalone_cost[i], proposed.standalone_cost[i]
        allowed_i = tol.cost_rel * max(abs(mine), 1) + tol.cost_per_period * periods
        if not _near(theirs, mine, allowed_i):
            problems.append(
                f"microgrid {mg.id}: disagreement cost {theirs} differs from {mine} "
                f"(allowed {allowed_i:.0f})"
            )
    for h, (hour, my_hour) in enumerate(zip(proposed.executed, own.executed, strict=True)):
        mine_members = set(my_hour.coalition)
        for i, mg in enumerate(request.microgrids):
            if mg.id not in mine_members or mg.id not in hour.coalition:
                continue
            mine, theirs = my_hour.continuation_cost[i], hour.continuation_cost[i]
            # V is valued from the plan's storage energy after the hour, which honest
            # solvers may leave a few Wh apart (that is checked below): each Wh moves V by
            # at most kappa per kWh.
            moved_wh = abs(proposed.plan[i].soc_wh[h] - own.plan[i].soc_wh[h])
            allowed_i = (
                tol.cost_rel * max(abs(mine), 1)
                + tol.cost_per_period * periods
                + moved_wh * target_shortfall_price(mg) / 1000
            )
            if not _near(theirs, mine, allowed_i):
                problems.append(
                    f"microgrid {mg.id}: continuation cost {theirs} differs from {mine} "
                    f"(allowed {allowed_i:.0f})"
                )
    for h, (hour, my_hour) in enumerate(zip(proposed.executed, own.executed, strict=True)):
        for i, mg in enumerate(request.microgrids):
            allowed_w = tol.power_w + tol.power_rel * _scale_w(mg)
            rows = (
                ("disagreement", hour.standalone[i], my_hour.standalone[i]),
                ("plan", proposed.plan[i].at(h), own.plan[i].at(h)),
            )
            for label, theirs_d, mine_d in rows:
                for name in ("gas_w", "charge_w", "discharge_w", "sell_w", "buy_w"):
                    a, b = getattr(theirs_d, name), getattr(mine_d, name)
                    if not _near(a, b, allowed_w):
                        problems.append(
                            f"microgrid {mg.id} period {hour.period} ({label}): {name} {a} "
                            f"is not optimal (expected {b} +- {allowed_w:.0f})"
                        )
                a, b = theirs_d.soc_wh, mine_d.soc_wh
                if not _near(a, b, tol.energy_wh + allowed_w):
                    problems.append(
                        f"microgrid {mg.id} period {hour.period} ({label}): soc_wh {a} "
                        f"is not optimal (expected {b} +- {tol.energy_wh + allowed_w:.0f})"
                    )
    return problems


def shave_bound(
    request: ClearingRequest, result: ClearingResult, microgrid: str, tolerance: Tolerance
) -> int:
    """The most a proposer can lower ``microgrid``'s stage-2 payment in the first executed
    hour with a forgery `check` accepts (money minor units).

    Payments follow from values every node checks exactly (plans, trades,
    prices, the split) and from three kinds of solver values checked within
    ``tolerance``: C_non_i and V_i (each at most its cost allowance off; V also
    by the storage-energy allowance times kappa, the most a stored kWh is worth)
    and the executed row of the plan (each flow at most its power allowance off,
    which moves the hour cost by at most the flow times the dearest marginal
    rate of that hour). So a lie gains at most those allowances plus one minor unit of
    the equal split. A property test forges proposals to the edge of every
    allowance and checks that no accepted one gains more.
    """
    sub = participants(request, result.excluded)
    i = sub.ids.index(microgrid)
    mg = sub.microgrids[i]
    hour = result.executed[0]
    t = hour.period - sub.first_period
    periods = sub.periods
    c_non = result.standalone_cost[i]
    v = hour.continuation_cost[i]
    allowed_costs = (
        tolerance.cost_rel * max(abs(c_non), 1)
        + tolerance.cost_rel * max(abs(v), 1)
        + 2 * tolerance.cost_per_period * periods
    )
    allowed_w = tolerance.power_w + tolerance.power_rel * _scale_w(mg)
    # V may sit off by the storage allowance times kappa (see `_compare_with_own`)
    allowed_costs += (tolerance.energy_wh + allowed_w) * target_shortfall_price(mg) / 1000
    rate = (
        mg.retail_price_per_kwh[t]
        + max(slope for _, slope in mg.green_loss.segments)
        + sub.market.wheeling_fee_per_kwh
    ) / 1000
    quad = sub.market.flow_wear_per_mw2h
    if mg.gas is not None:
        rate += mg.gas.b_per_kwh / 1000
        quad += mg.gas.a_per_mw2h
    rate += 2 * quad * (_scale_w(mg) + allowed_w) / 1e12
    return math.ceil(allowed_costs + 5 * allowed_w * rate) + 1


def _diff_executed(got: ExecutedHour, want: ExecutedHour, ids: Sequence[str]) -> list[str]:
    problems: list[str] = []
    where = f"hour {want.period}"
    if got.period != want.period:
        problems.append(f"{where}: executed period {got.period}")
    if got.coalition != want.coalition:
        problems.append(
            f"{where}: coalition {list(got.coalition)} should be {list(want.coalition)}"
        )
    for name in ("dispatch", "standalone_cost", "cost", "payments"):
        a, b = getattr(got, name), getattr(want, name)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                problems.append(f"{where}: microgrid {ids[i]} {name} {x} should be {y}")
    if got.saving != want.saving:
        problems.append(f"{where}: saving {got.saving} should be {want.saving}")
    if got.trades != want.trades:
        before = len(problems)
        wanted = {(t.seller, t.buyer): t for t in want.trades}
        for t in got.trades:
            w = wanted.pop((t.seller, t.buyer), None)
            if w is None:
                problems.append(f"{where}: unexpected trade {t.seller}->{t.buyer}")
            elif t != w:
                for name in ("energy_wh", "amount", "price_per_kwh"):
                    if getattr(t, name) != getattr(w, name):
                        problems.append(
                            f"{where}: trade {t.seller}->{t.buyer} {name} {getattr(t, name)} "
                            f"should be {getattr(w, name)}"
                        )
        for w in wanted.values():
            problems.append(f"{where}: missing trade {w.seller}->{w.buyer}")
        if len(problems) == before:
            problems.append(f"{where}: trades are out of order")
    if got.transfers != want.transfers:
        problems.append(f"{where}: transfers {got.transfers} should be {want.transfers}")
    if got.individually_rational != want.individually_rational:
        problems.append(f"{where}: individually_rational flag is wrong")
    return problems


def _check_bargain(
    request: ClearingRequest, hour: ExecutedHour, standalone_cost: Sequence[int]
) -> list[str]:
    """Stage-2 invariants stated directly on the proposal (clear messages for the usual lies)."""
    ids = request.ids
    index = {mg_id: i for i, mg_id in enumerate(ids)}
    problems = []
    if sum(hour.payments) != 0:
        problems.append(f"hour {hour.period}: payments sum to {sum(hour.payments)}, not 0")
    members = {index[m] for m in hour.coalition if m in index}
    ordered = sorted(members)
    if request.executed_periods == 1:
        gains = [
            standalone_cost[i]
            - hour.cost[i]
            - hour.payments[i]
            - hour.continuation_cost[i]
            + hour.investment_credit[i]
            for i in ordered
        ]
    else:
        gains = [hour.standalone_cost[i] - hour.cost[i] - hour.payments[i] for i in ordered]
    if gains and max(gains) - min(gains) > 1:
        problems.append(
            f"hour {hour.period}: savings not split equally "
            f"({', '.join(f'{ids[i]} {g}' for i, g in zip(ordered, gains, strict=True))})"
        )
    for i, mg_id in enumerate(ids):
        if i not in members and hour.payments[i]:
            problems.append(
                f"hour {hour.period}: {mg_id} pays {hour.payments[i]} outside the coalition"
            )
    t = hour.period - request.first_period
    mgs = request.microgrids
    money_in: dict[str, int] = {}
    for tr in hour.trades:
        s, b = index.get(tr.seller), index.get(tr.buyer)
        if s is None or b is None:
            problems.append(f"hour {hour.period}: trade {tr.seller}->{tr.buyer} names a stranger")
            continue
        if tr.price_per_kwh != hour.price_per_kwh:
            problems.append(
                f"hour {hour.period}: trade {tr.seller}->{tr.buyer} at {tr.price_per_kwh}/kWh, "
                f"not the hour's price {hour.price_per_kwh}"
            )
        low, high = mgs[s].feed_in_tariff_per_kwh, mgs[b].retail_price_per_kwh[t]
        if low <= high and not low <= tr.price_per_kwh <= high:
            problems.append(
                f"hour {hour.period}: trade {tr.seller}->{tr.buyer} price {tr.price_per_kwh} "
                f"outside the band [{low}, {high}]"
            )
        money_in[tr.seller] = money_in.get(tr.seller, 0) + tr.amount
        money_in[tr.buyer] = money_in.get(tr.buyer, 0) - tr.amount
    for tf in hour.transfers:
        money_in[tf.payee] = money_in.get(tf.payee, 0) + tf.amount
        money_in[tf.payer] = money_in.get(tf.payer, 0) - tf.amount
    for i, mg_id in enumerate(ids):
        if money_in.get(mg_id, 0) != -hour.payments[i]:
            problems.append(
                f"hour {hour.period}: {mg_id} trade money {money_in.get(mg_id, 0)} does not "
                f"settle its payment {hour.payments[i]}"
            )
    return problems


def check(
    request: ClearingRequest,
    proposed: ClearingResult,
    *,
    own: ClearingResult | None = None,
    solver: str = DEFAULT_SOLVER,
    tolerance: Tolerance | None = None,
) -> Verdict:
    """Check ``proposed`` against ``request`` (see module doc); never raises on a bad proposal."""
    try:
        return _check(request, proposed, own, solver, tolerance or Tolerance())
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # a result built by hand (not decoded) can be inconsistent in ways decoding refuses
        return Verdict(False, (f"malformed result: {type(exc).__name__}: {exc}",))


def _check(
    request: ClearingRequest,
    proposed: ClearingResult,
    own: ClearingResult | None,
    solver: str,
    tol: Tolerance,
) -> Verdict:
    problems: list[str] = []
    if proposed.request_digest != request.digest:
        problems.append("result is for a different request (request digest mismatch)")
    left_out = [mg_id for mg_id, _ in proposed.excluded]
    if not set(left_out) <= set(request.ids) or len(set(left_out)) != len(left_out):
        return Verdict(False, (f"excluded {left_out} are not distinct requesting microgrids",))
    if len(left_out) == len(request.ids):
        return _check_nobody(request, proposed, own, solver, problems)
    whole, request = request, participants(request, proposed.excluded)
    if proposed.microgrids != request.ids:
        problems.append(f"microgrids {list(proposed.microgrids)} should be {list(request.ids)}")
    if proposed.first_period != request.first_period or proposed.periods != request.periods:
        problems.append(
            f"window {proposed.first_period}+{proposed.periods} should be "
            f"{request.first_period}+{request.periods}"
        )
    if len(proposed.executed) != request.executed_periods:
        problems.append(
            f"{len(proposed.executed)} executed hours, the request executes "
            f"{request.executed_periods}"
        )
    if problems:
        return Verdict(False, tuple(problems))

    problems += _check_plan(request, proposed.plan, tol)
    problems += _check_standalone_rows(request, proposed.executed, tol)
    for hour in proposed.executed:
        problems += _check_bargain(request, hour, proposed.standalone_cost)
    try:
        expected = assemble(
            whole,
            proposed.plan,
            standalone_rows=[hour.standalone for hour in proposed.executed],
            standalone_cost=proposed.standalone_cost,
            continuation_cost=proposed.executed[0].continuation_cost,
            excluded=proposed.excluded,
            solver=proposed.solver,
        )
    except (MarketError, ValueError, ZeroDivisionError) as exc:
        problems.append(f"cannot re-derive the result from its schedules: {exc}")
        return Verdict(False, tuple(problems))
    if proposed.window_trades != expected.window_trades:
        problems.append("window trades are not the north-west-corner split of the pool schedule")
    for i, mg_id in enumerate(request.ids):
        if proposed.cooperative_cost[i] != expected.cooperative_cost[i]:
            problems.append(
                f"microgrid {mg_id}: cooperative cost {proposed.cooperative_cost[i]} should be "
                f"{expected.cooperative_cost[i]}"
            )
    for got, want in zip(proposed.executed, expected.executed, strict=True):
        problems += _diff_executed(got, want, request.ids)

    if own is None:
        try:
            own = clear(whole, solver=solver)
        except MarketError as exc:
            problems.append(f"own clearing failed: {exc}")
            return Verdict(False, tuple(problems))
    if [e[0] for e in own.excluded] != left_out:
        problems.append(
            f"excluded microgrids {left_out} should be {[e[0] for e in own.excluded]} "
            "(only a microgrid with no feasible schedule of its own is left out)"
        )
        return Verdict(False, tuple(problems))
    problems += _compare_with_own(request, proposed, expected.cooperative_cost, own, tol)
    return Verdict(not problems, tuple(problems))


def _check_nobody(
    request: ClearingRequest,
    proposed: ClearingResult,
    own: ClearingResult | None,
    solver: str,
    problems: list[str],
) -> Verdict:
    """A result that leaves every microgrid out: true only if nobody can run alone."""
    if proposed.microgrids or proposed.plan or proposed.executed or proposed.window_trades:
        problems.append("a result that leaves everyone out carries no plan or executed hour")
    if own is None:
        try:
            own = clear(request, solver=solver)
        except MarketError as exc:
            problems.append(f"own clearing failed: {exc}")
            return Verdict(False, tuple(problems))
    if own.microgrids:
        problems.append(f"microgrids {list(own.microgrids)} can run alone: they take part")
    return Verdict(not problems, tuple(problems))
