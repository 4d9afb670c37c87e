"""A backup checks a proposed clearing: honest ones pass (any valid solver), tampered ones fail."""

from __future__ import annotations

import dataclasses

import pytest
from clearing_cases import microgrid, request

from meterchain.market.clearing import (
    ClearingRequest,
    ClearingResult,
    ExecutedHour,
    Trade,
    assemble,
    clear,
    solve_window,
)
from meterchain.market.units import price_per_kwh
from meterchain.market.verify import Verdict, check


def _with_hour(result: ClearingResult, hour: ExecutedHour) -> ClearingResult:
    return dataclasses.replace(result, executed=(hour,) + result.executed[1:])


def _two_sellers() -> ClearingRequest:
    """Sellers s0 (30 kW surplus) and s1 (50 kW); buyers b0 and b1 short of green."""
    return request(
        microgrid("b0", 0, 60_000, 40_000),
        microgrid("b1", 10_000, 90_000, 70_000, loss=6_000),
        microgrid("s0", 60_000, 40_000, 30_000),
        microgrid("s1", 90_000, 50_000, 40_000),
    )


def test_honest_result_is_accepted(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    verdict = check(reference_request, reference_result)
    assert verdict == Verdict(True, ())
    assert bool(verdict)


def test_result_from_another_solver_is_accepted(reference_request: ClearingRequest) -> None:
    """Clarabel (interior point, bounds as cone rows) reaches the same optimum by another
    path; its rounded schedule differs by a few W, and the PIQP-solving backup accepts it."""
    other = clear(reference_request, solver="clarabel")
    verdict = check(reference_request, other, solver="piqp")
    assert verdict.accepted, verdict.problems


def test_one_price_moved_is_rejected(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    hour = reference_result.executed[0]
    moved = dataclasses.replace(hour.trades[0], price_per_kwh=hour.trades[0].price_per_kwh + 1)
    tampered = _with_hour(
        reference_result, dataclasses.replace(hour, trades=(moved,) + hour.trades[1:])
    )
    verdict = check(reference_request, tampered, own=reference_result)
    assert not verdict.accepted
    assert any("price_per_kwh" in p for p in verdict.problems), verdict.problems


def test_a_changed_volume_is_rejected(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    hour = reference_result.executed[0]
    first = hour.trades[0]
    smaller = dataclasses.replace(
        first,
        energy_wh=first.energy_wh - 5_000,
        price_per_kwh=price_per_kwh(first.amount, first.energy_wh - 5_000),
    )
    tampered = _with_hour(
        reference_result, dataclasses.replace(hour, trades=(smaller,) + hour.trades[1:])
    )
    verdict = check(reference_request, tampered, own=reference_result)
    assert not verdict.accepted
    assert any("energy_wh" in p for p in verdict.problems), verdict.problems


def test_primary_raising_its_price_and_lowering_another_sellers_is_rejected() -> None:
    """M7 scenario: seller s1 (the primary) moves 20 000 minor units from s0's sale to buyer b1
    onto its own sale to b1: b1 pays the same, payments still sum to zero, every trader's
    money still matches its payment -- but the equal split is broken and the two trades no
    longer carry the hour's one energy price."""
    req = _two_sellers()
    honest = clear(req)
    hour = honest.executed[0]
    pairs = {(t.seller, t.buyer) for t in hour.trades}
    assert {("s0", "b1"), ("s1", "b1")} <= pairs, hour.trades
    delta = 20_000
    trades = []
    for t in hour.trades:
        if (t.seller, t.buyer) == ("s0", "b1"):
            t = _reprice(t, t.amount - delta)
        elif (t.seller, t.buyer) == ("s1", "b1"):
            t = _reprice(t, t.amount + delta)
        trades.append(t)
    ids = list(honest.microgrids)
    payments = list(hour.payments)
    payments[ids.index("s0")] += delta
    payments[ids.index("s1")] -= delta
    tampered = _with_hour(
        honest, dataclasses.replace(hour, trades=tuple(trades), payments=tuple(payments))
    )
    assert sum(tampered.executed[0].payments) == 0
    verdict = check(req, tampered, own=honest)
    assert not verdict.accepted
    assert any("not split equally" in p for p in verdict.problems), verdict.problems
    assert any("not the hour's price" in p for p in verdict.problems), verdict.problems
    assert not any("does not settle its payment" in p for p in verdict.problems)
    assert check(req, honest, own=honest).accepted


def _reprice(t: Trade, amount: int) -> Trade:
    return dataclasses.replace(t, amount=amount, price_per_kwh=price_per_kwh(amount, t.energy_wh))


def test_consistent_lie_about_the_disagreement_point_is_rejected() -> None:
    """A primary that inflates its own disagreement cost and re-derives everything exactly
    (so the equal split holds on its numbers) is caught by the backup's own solve."""
    req = _two_sellers()
    solved = solve_window(req)
    coop = solved.coop_plans
    honest = clear(req)
    ids = list(req.ids)
    rows = [list(h.standalone) for h in honest.executed]
    cost = list(solved.standalone_cost)
    liar = ids.index("s1")
    cost[liar] += 50_000
    # lie also about the executed hour: pretend s1 would have exported less
    d = rows[0][liar]
    rows[0][liar] = dataclasses.replace(d, grid_w=d.grid_w + 10_000, gas_w=d.gas_w)
    forged = assemble(
        req,
        coop,
        standalone_rows=rows,
        standalone_cost=cost,
        continuation_cost=solved.continuation_cost,
        solver="piqp",
    )
    verdict = check(req, forged, own=honest)
    assert not verdict.accepted
    text = " ".join(verdict.problems)
    assert "disagreement cost" in text and "power balance" in text


def test_tampered_plan_is_rejected(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    plans = list(reference_result.plan)
    p = plans[3]
    t = next(t for t in range(24) if p.sell_w[t] > 0)
    sell = list(p.sell_w)
    sell[t] += 1_000
    plans[3] = dataclasses.replace(p, sell_w=tuple(sell))
    tampered = dataclasses.replace(reference_result, plan=tuple(plans))
    problems = check(reference_request, tampered, own=reference_result).problems
    assert any("power balance" in x for x in problems)
    assert any("pool sales" in x for x in problems)


def test_result_for_another_request_is_rejected(reference_result: ClearingResult) -> None:
    verdict = check(_two_sellers(), reference_result)
    assert not verdict.accepted
    assert "different request" in verdict.problems[0]


def test_tampered_bytes_decode_and_fail(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    """What a backup receives is bytes: edit the canonical form, decode, check."""
    data = reference_result.to_dict()
    data["executed"][0]["payments"][0] += 7
    data["executed"][0]["payments"][1] -= 7
    tampered = ClearingResult.from_dict(data)
    assert tampered.digest != reference_result.digest
    verdict = check(reference_request, tampered, own=reference_result)
    assert not verdict.accepted
    assert any("payments" in p for p in verdict.problems)


@pytest.mark.parametrize("field", ["saving", "individually_rational"])
def test_derived_flags_are_rechecked(
    reference_request: ClearingRequest, reference_result: ClearingResult, field: str
) -> None:
    hour = reference_result.executed[0]
    value = getattr(hour, field)
    wrong = (not value) if isinstance(value, bool) else value + 1
    tampered = _with_hour(reference_result, dataclasses.replace(hour, **{field: wrong}))
    assert not check(reference_request, tampered, own=reference_result).accepted


def test_structurally_broken_result_gets_a_verdict_not_an_exception(
    reference_request: ClearingRequest, reference_result: ClearingResult
) -> None:
    short_plan = dataclasses.replace(reference_result, plan=reference_result.plan[:2])
    verdict = check(reference_request, short_plan, own=reference_result)
    assert not verdict.accepted and "malformed result" in verdict.problems[0]
