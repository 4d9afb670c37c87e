"""M21 failed execution: reassignment, storage reserve, FTR compensation, money conservation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterchain.market import failed_execution as fx
from meterchain.market.model import GRID_COMPANY
from meterchain.market.settlement import LedgerEntry

SHORT = fx.FailedTrade("pv", "shop", 100_000, 40_000, 6_000)  # 60 kWh short at 0.6/kWh


def _by_reason(plan: fx.RemedyPlan) -> dict[tuple[str, str, str], int]:
    return {(e.payer, e.payee, e.reason): e.amount for e in plan.entries}


def test_reassign_cheapest_spare_first_at_the_difference_contract() -> None:
    case = fx.RemedyCase(
        hour=12,
        trades=(SHORT,),
        offers=(
            fx.Offer(fx.REASSIGN, "wind", 50_000, 8_000),  # dearer than the contract
            fx.Offer(fx.REASSIGN, "farm", 20_000, 5_000),  # cheaper: taken first
        ),
    )
    plan = fx.remedy(case)
    assert [(r.kind, r.provider, r.energy_wh) for r in plan.remedies] == [
        (fx.REASSIGN, "farm", 20_000),
        (fx.REASSIGN, "wind", 40_000),
    ]
    money = _by_reason(plan)
    # farm: the buyer pays the cheaper offer (20 kWh x 0.5); no difference to pay.
    assert money[("shop", "farm", "reassign-energy")] == 100_000
    assert ("pv", "farm", "reassign-difference") not in money
    # wind: the buyer pays its contract price, the defaulter the 0.2/kWh above it.
    assert money[("shop", "wind", "reassign-energy")] == 240_000
    assert money[("pv", "wind", "reassign-difference")] == 80_000
    assert plan.uncovered == ()
    assert sum(plan.balances().values()) == 0


def test_storage_covers_what_no_seller_can() -> None:
    case = fx.RemedyCase(
        hour=12,
        trades=(SHORT,),
        offers=(
            fx.Offer(fx.REASSIGN, "farm", 20_000, 5_000),
            fx.Offer(fx.STORAGE, "battery", 30_000, 9_000),
        ),
    )
    plan = fx.remedy(case)
    assert [(r.kind, r.provider, r.energy_wh) for r in plan.remedies] == [
        (fx.REASSIGN, "farm", 20_000),
        (fx.STORAGE, "battery", 30_000),
    ]
    money = _by_reason(plan)
    assert money[("shop", "battery", "storage-energy")] == 180_000
    assert money[("pv", "battery", "storage-difference")] == 90_000
    assert plan.uncovered == (("pv", "shop", 10_000),)


def test_ftr_compensates_what_is_still_short_and_closes_the_trade() -> None:
    case = fx.RemedyCase(
        hour=12,
        trades=(SHORT,),
        offers=(fx.Offer(fx.REASSIGN, "farm", 20_000, 5_000),),
        rights=(
            fx.TransmissionRight("shop", "pv", "shop", 30_000, 2_000),
            fx.TransmissionRight("other", "pv", "town", 99_000, 2_000),  # another trade's
        ),
        order=(fx.REASSIGN, fx.FTR, fx.STORAGE),
    )
    plan = fx.remedy(case)
    assert [(r.kind, r.provider, r.energy_wh) for r in plan.remedies] == [
        (fx.REASSIGN, "farm", 20_000),
        (fx.FTR, "shop", 30_000),
    ]
    assert _by_reason(plan)[(GRID_COMPANY, "shop", "ftr-compensation")] == 60_000
    assert plan.uncovered == (("pv", "shop", 40_000),)


def test_order_and_disabled_remedies_are_respected() -> None:
    offers = (fx.Offer(fx.REASSIGN, "farm", 90_000, 5_000), fx.Offer(fx.STORAGE, "bat", 90_000, 1))
    storage_first = fx.remedy(fx.RemedyCase(12, (SHORT,), offers, order=(fx.STORAGE, fx.REASSIGN)))
    assert [r.provider for r in storage_first.remedies] == ["bat"]
    none = fx.remedy(fx.RemedyCase(12, (SHORT,), offers, order=()))
    assert none.remedies == () and none.uncovered == (("pv", "shop", 60_000),)


def test_a_party_never_remedies_its_own_trade_and_offers_are_shared() -> None:
    t2 = fx.FailedTrade("wind", "town", 50_000, 0, 7_000)
    offers = (
        fx.Offer(fx.REASSIGN, "pv", 80_000, 1_000),  # the defaulter of the first trade
        fx.Offer(fx.REASSIGN, "farm", 70_000, 6_000),
    )
    plan = fx.remedy(fx.RemedyCase(12, (t2, SHORT), offers))
    # Trades in (seller, buyer) order: pv->shop first, which may not buy from pv itself.
    assert [(r.seller, r.provider, r.energy_wh) for r in plan.remedies] == [
        ("pv", "farm", 60_000),
        ("wind", "pv", 50_000),
    ]
    assert plan.uncovered == ()


def test_sc2_corrections_return_penalty_retail_and_feed_in() -> None:
    trade = fx.FailedTrade(
        "pv", "shop", 10_000, 0, 6_000, penalty_per_kwh=9_000, buyer_retail_per_kwh=11_500
    )
    offer = fx.Offer(fx.REASSIGN, "farm", 10_000, 7_000, feed_in_per_kwh=2_500)
    plan = fx.remedy(fx.RemedyCase(12, (trade,), (offer,)))
    assert _by_reason(plan) == {
        ("shop", "farm", "reassign-energy"): 60_000,
        ("pv", "farm", "reassign-difference"): 10_000,
        ("shop", "pv", "penalty-return"): 90_000,
        (GRID_COMPANY, "shop", "retail-reversal"): 115_000,
        ("farm", GRID_COMPANY, "feed-in-reversal"): 25_000,
    }
    assert plan.balances() == {"shop": -35_000, "farm": 45_000, "pv": 80_000, GRID_COMPANY: -90_000}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: fx.FailedTrade("a", "a", 1, 0, 1), "must differ"),
        (lambda: fx.FailedTrade("a", "b", 1, 2, 1), "delivered 2 Wh > contracted 1 Wh"),
        (lambda: fx.FailedTrade("a", "b", -1, 0, 1), "contracted_wh must be an integer >= 0"),
        (lambda: fx.FailedTrade("a", "b", 1, 0, 1.5), "price_per_kwh"),
        (lambda: fx.Offer("steal", "a", 1, 1), "must be reassign or storage"),
        (lambda: fx.Offer(fx.STORAGE, "", 1, 1), "non-empty id"),
        (lambda: fx.RemedyCase(1, (), order=("ftr", "ftr")), "distinct remedies"),
        (lambda: fx.RemedyCase(1, (), order=("refund",)), "distinct remedies"),
        (lambda: fx.RemedyCase(1, (SHORT, SHORT)), "listed twice"),
        (lambda: fx.RemedyCase.from_cbor(b"\x01"), "must be a map"),
        (lambda: fx.RemedyCase.from_cbor(b"\xff\x00"), "not canonical CBOR"),
    ],
)
def test_bad_cases_raise_the_family_error(make, match: str) -> None:
    with pytest.raises(fx.FailedExecutionError, match=match):
        make()


amounts = st.integers(0, 200_000)
prices = st.integers(0, 20_000)


@st.composite
def cases(draw: st.DrawFn) -> fx.RemedyCase:
    parties = ["a", "b", "c", "d", "e"]
    trades, seen = [], set()
    for _ in range(draw(st.integers(0, 5))):
        s, b = draw(st.sampled_from(parties)), draw(st.sampled_from(parties))
        if s == b or (s, b) in seen:
            continue
        seen.add((s, b))
        contracted = draw(amounts)
        trades.append(
            fx.FailedTrade(
                s,
                b,
                contracted,
                draw(st.integers(0, contracted)),
                draw(prices),
                draw(prices),
                draw(prices),
            )
        )
    offers = [
        fx.Offer(
            draw(st.sampled_from([fx.REASSIGN, fx.STORAGE])),
            draw(st.sampled_from(parties)),
            draw(amounts),
            draw(prices),
            draw(prices),
        )
        for _ in range(draw(st.integers(0, 5)))
    ]
    rights = [
        fx.TransmissionRight(
            draw(st.sampled_from(parties)), t.seller, t.buyer, draw(amounts), draw(prices)
        )
        for t in trades
        if draw(st.booleans())
    ]
    order = draw(st.permutations(list(fx.REMEDIES)))[: draw(st.integers(0, 3))]
    return fx.RemedyCase(
        draw(st.integers(0, 10**6)), tuple(trades), tuple(offers), tuple(rights), tuple(order)
    )


@settings(max_examples=150, deadline=None)
@given(cases())
def test_money_is_conserved_and_energy_never_over_covered(case: fx.RemedyCase) -> None:
    plan = fx.remedy(case)
    assert sum(plan.balances().values()) == 0
    assert all(isinstance(e, LedgerEntry) and e.amount > 0 for e in plan.entries)
    for trade in case.trades:
        energy = sum(
            r.energy_wh
            for r in plan.remedies
            if (r.seller, r.buyer) == (trade.seller, trade.buyer) and r.kind != fx.FTR
        )
        left = dict(((s, b), w) for s, b, w in plan.uncovered).get((trade.seller, trade.buyer), 0)
        assert (
            energy
            + left
            + sum(
                r.energy_wh
                for r in plan.remedies
                if (r.seller, r.buyer) == (trade.seller, trade.buyer) and r.kind == fx.FTR
            )
            >= trade.short_wh
        )
        assert energy <= trade.short_wh
    for offer in case.offers:  # nobody delivers more than it offered, in all trades together
        used = sum(
            r.energy_wh for r in plan.remedies if r.provider == offer.party and r.kind == offer.kind
        )
        offered = sum(
            o.energy_wh for o in case.offers if o.party == offer.party and o.kind == offer.kind
        )
        assert used <= offered
    assert fx.RemedyCase.from_cbor(case.to_cbor()) == case
    assert fx.remedy(case) == plan  # deterministic
