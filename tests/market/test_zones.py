"""Postage-stamp fees, capacity-aware cheapest paths (M16) and the delivered-cost score (M15)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterchain.market.errors import MarketError
from meterchain.market.zones import (
    REPUTATION_MAX,
    LineOverloaded,
    NoFeasiblePath,
    RankingWeights,
    UnknownZone,
    ZoneError,
    ZoneGraph,
    cheapest_path,
    delivered_cost,
    postage_fee,
)


def diamond(a_d_limit: int = 10_000) -> ZoneGraph:
    """A-B-C and A-D-C; D charges less than B."""
    return ZoneGraph.build(
        {"A": 10, "B": 30, "C": 20, "D": 5},
        [("A", "B", 10_000), ("B", "C", 10_000), ("A", "D", a_d_limit), ("D", "C", 10_000)],
    )


def test_postage_fee_sums_every_zone_on_the_path() -> None:
    g = diamond()
    # S = (alpha_A + alpha_B + alpha_C) * Q = (10 + 30 + 20) minor/kWh * 2.5 kWh = 150.
    assert postage_fee(g, ["A", "B", "C"], 2500) == 150
    assert postage_fee(g, ["A"], 1000) == 10  # inside one zone: that zone's stamp once


def test_cheapest_path_prefers_the_cheaper_middle_zone() -> None:
    route = cheapest_path(diamond(), "A", "C", 1000)
    assert route.zones == ("A", "D", "C")
    assert route.fee_per_kwh == 35
    assert route.fee == 35


def test_a_path_blocked_by_a_full_line_is_avoided() -> None:
    g = diamond(a_d_limit=4000).with_flow(["A", "D"], 3500)
    assert g.remaining("A", "D") == 500
    assert cheapest_path(g, "A", "C", 500).zones == ("A", "D", "C")
    route = cheapest_path(g, "A", "C", 501)
    assert route.zones == ("A", "B", "C")
    assert route.fee == postage_fee(g, ["A", "B", "C"], 501)


def test_no_feasible_path() -> None:
    g = diamond().with_flow(["A", "B"], 9000).with_flow(["A", "D"], 9000)
    with pytest.raises(NoFeasiblePath) as info:
        cheapest_path(g, "A", "C", 2000)
    assert isinstance(info.value, MarketError)
    isolated = ZoneGraph.build({"A": 1, "B": 1}, [])
    with pytest.raises(NoFeasiblePath):
        cheapest_path(isolated, "A", "B", 1)


def test_same_zone_trade_needs_no_line() -> None:
    route = cheapest_path(diamond(), "B", "B", 7000)
    assert route.zones == ("B",)
    assert route.fee == 210


def test_ties_go_to_fewer_zones_then_to_names() -> None:
    # X-Z direct costs 1+1, X-Y-Z costs 1+0+1: same fee, the direct line wins.
    g = ZoneGraph.build({"X": 1, "Y": 0, "Z": 1}, [("X", "Y", 9), ("Y", "Z", 9), ("X", "Z", 9)])
    assert cheapest_path(g, "X", "Z", 1).zones == ("X", "Z")
    # Two equal two-hop paths: S-M1-T and S-M2-T -> the smaller name.
    g2 = ZoneGraph.build(
        {"S": 1, "M2": 2, "M1": 2, "T": 1},
        [("S", "M2", 9), ("M2", "T", 9), ("S", "M1", 9), ("M1", "T", 9)],
    )
    assert cheapest_path(g2, "S", "T", 1).zones == ("S", "M1", "T")


def test_flows_are_bounded_and_can_be_released() -> None:
    g = diamond(a_d_limit=1000)
    g1 = g.with_flow(["A", "D", "C"], 1000)
    assert g1.remaining("A", "D") == 0 and g1.remaining("D", "C") == 9000
    assert g.remaining("A", "D") == 1000  # the original graph is unchanged
    with pytest.raises(LineOverloaded):
        g1.with_flow(["A", "D"], 1)
    with pytest.raises(LineOverloaded):
        g.with_flow(["A", "D"], -1)
    assert g1.with_flow(["A", "D", "C"], -1000) == g


@pytest.mark.parametrize(
    ("fees", "lines", "error"),
    [
        ({"A": -1}, [], ZoneError),
        ({"A": 1.5}, [], ZoneError),
        ({"A": 1}, [("A", "B", 5)], UnknownZone),
        ({"A": 1}, [("A", "A", 5)], ZoneError),
        ({"A": 1, "B": 1}, [("A", "B", 5), ("B", "A", 5)], ZoneError),
        ({"A": 1, "B": 1}, [("A", "B", -5)], ZoneError),
    ],
)
def test_bad_graphs_are_refused(fees, lines, error) -> None:
    with pytest.raises(error):
        ZoneGraph.build(fees, lines)


def test_bad_requests_are_refused() -> None:
    g = diamond()
    with pytest.raises(UnknownZone):
        cheapest_path(g, "A", "Q", 1)
    with pytest.raises(ZoneError):
        cheapest_path(g, "A", "C", 0)
    with pytest.raises(ZoneError):
        postage_fee(g, ["A", "B", "A"], 1)


def simple_paths(g: ZoneGraph, source: str, target: str):
    zones = sorted(g.fees)
    for r in range(len(zones)):
        for middle in itertools.permutations([z for z in zones if z not in (source, target)], r):
            path = (source, *middle, target) if source != target else (source,)
            if all(b in g.neighbours(a) for a, b in itertools.pairwise(path)):
                yield path


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_cheapest_path_is_optimal_against_brute_force(seed) -> None:
    rng = random.Random(seed)
    zones = [f"z{i}" for i in range(rng.randint(2, 6))]
    fees = {z: rng.randint(0, 5) for z in zones}
    lines = [
        (a, b, rng.choice([0, 3, 5, 10]))
        for a, b in itertools.combinations(zones, 2)
        if rng.random() < 0.5
    ]
    g = ZoneGraph.build(fees, lines)
    source, target = rng.choice(zones), rng.choice(zones)
    energy = rng.randint(1, 6)
    feasible = [
        p
        for p in simple_paths(g, source, target)
        if all(g.remaining(a, b) >= energy for a, b in itertools.pairwise(p))
    ]
    if not feasible:
        with pytest.raises(NoFeasiblePath):
            cheapest_path(g, source, target, energy)
        return
    best = min(feasible, key=lambda p: (sum(fees[z] for z in p), len(p), p))
    route = cheapest_path(g, source, target, energy)
    assert route.zones == best
    assert route.fee_per_kwh == sum(fees[z] for z in best)


def test_delivered_cost_terms_and_weights() -> None:
    w = RankingWeights(price=2, transmission=1, reputation=3, carbon=1)
    cost = delivered_cost(w, price=100, fee_per_kwh=20, reputation=900, carbon_g_per_kwh=50)
    assert cost == 2 * 100 + 20 + 3 * (REPUTATION_MAX - 900) + 50
    # A selling taker wants a high price and ignores the buyer's carbon.
    sell = delivered_cost(
        w, price=100, fee_per_kwh=20, reputation=900, carbon_g_per_kwh=50, taker_buys=False
    )
    assert sell == -200 + 20 + 300
    with pytest.raises(ZoneError):
        RankingWeights(price=-1)
    with pytest.raises(ZoneError):
        delivered_cost(w, price=1, fee_per_kwh=0, reputation=1001, carbon_g_per_kwh=0)
