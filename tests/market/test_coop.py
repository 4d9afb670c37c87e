"""Cooperative game among generators (M13): dispatch, coalition values and Shapley sharing."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meterchain.market.coop import (
    CoopError,
    GeneratorUnit,
    InfeasibleDemand,
    clearing_price,
    coalition_value,
    economic_dispatch,
    game_values,
    shapley,
    shapley_sampled,
    share_profits,
)
from meterchain.market.errors import MarketError
from meterchain.market.units import MONEY_SCALE

FEW = settings(max_examples=40, deadline=None)


def flat(name: str, b: float, p_max: float, *, k: float = 2.0, p_min: float = 0.0, c: float = 0.0):
    """A unit with a constant offer k*b (a = 0): the merit-order case."""
    return GeneratorUnit(name, a=0.0, b=b, c=c, k=k, p_min=p_min, p_max=p_max)


# --- dispatch and marginal price ----------------------------------------------------------


def test_merit_order_dispatch_and_marginal_price_by_hand() -> None:
    # Offers 20 (A, 50 MW) and 30 (B, 100 MW); D = 80 fills A, then 30 MW of B.
    a, b = flat("A", 10, 50), flat("B", 15, 100)
    d = economic_dispatch([a, b], 80)
    assert d.outputs == {"A": 50, "B": 30}
    assert d.price == 30
    assert d.revenue == 2400
    assert d.cost == 10 * 50 + 15 * 30
    assert d.profit == 1450


def test_quadratic_units_share_load_at_equal_offers() -> None:
    # r(p) = 2 * (2 p) = 4p each; two units: 4p = lambda, 2p = 10 -> p = 5, price 20.
    one = GeneratorUnit("u1", a=1.0, b=0.0, c=0.0, k=2.0, p_min=0.0, p_max=10.0)
    two = GeneratorUnit("u2", a=1.0, b=0.0, c=0.0, k=2.0, p_min=0.0, p_max=10.0)
    d = economic_dispatch([one, two], 10)
    assert d.outputs["u1"] == pytest.approx(5) and d.outputs["u2"] == pytest.approx(5)
    assert d.price == pytest.approx(20)
    assert d.profit == pytest.approx(200 - 50)


def test_price_is_the_highest_offer_among_dispatched_units() -> None:
    # B must run at least 10 MW and offers 40 there; A (offer 20) takes the rest.
    a = flat("A", 10, 100)
    b = flat("B", 20, 50, p_min=10)
    d = economic_dispatch([a, b], 50)
    assert d.outputs == {"A": 40, "B": 10}
    assert d.price == 40


def test_unit_at_zero_output_does_not_set_the_price_or_pay_no_load_cost() -> None:
    a = flat("A", 10, 100)
    b = flat("B", 50, 100, c=999.0)
    d = economic_dispatch([a, b], 60)
    assert d.outputs == {"A": 60, "B": 0}
    assert d.price == 20
    assert d.cost == 600


def test_quadratic_unit_hits_its_limit_and_the_next_unit_takes_over() -> None:
    cheap = GeneratorUnit("cheap", a=0.1, b=10, c=0, k=1.5, p_min=0, p_max=20)
    dear = GeneratorUnit("dear", a=0.05, b=30, c=0, k=1.5, p_min=0, p_max=100)
    # cheap's offer at p_max is 1.5*(4+10) = 21 < dear's 45 at zero: cheap runs full.
    d = economic_dispatch([cheap, dear], 50)
    assert d.outputs["cheap"] == pytest.approx(20)
    assert d.outputs["dear"] == pytest.approx(30)
    assert d.price == pytest.approx(dear.offer(30))


@given(
    st.lists(
        st.tuples(
            st.floats(0, 0.2),
            st.floats(0, 40),
            st.floats(1.01, 3),
            st.floats(0, 20),
            st.floats(1, 80),
        ),
        min_size=1,
        max_size=5,
    ),
    st.floats(0, 1),
)
# Found by CI: a unit with a = 1e-10 at its p_max came out 3.5e-5 MW inside it (b/2a cancels).
@example(
    params=[
        (0.0, 0.0, 2.0, 0.0, 1.0), (0.1875, 11.0, 3.0, 0.0, 32.0), (1e-10, 32.0, 2.0, 0.0, 1.0)
    ],
    fraction=0.875,
)
@FEW
def test_dispatch_meets_demand_within_limits_at_a_common_offer(params, fraction) -> None:
    units = [
        GeneratorUnit(f"g{i}", a=a, b=b, c=0, k=k, p_min=lo, p_max=lo + span)
        for i, (a, b, k, lo, span) in enumerate(params)
    ]
    low, high = sum(u.p_min for u in units), sum(u.p_max for u in units)
    demand = low + fraction * (high - low)
    d = economic_dispatch(units, demand)
    assert sum(d.outputs.values()) == pytest.approx(demand, rel=1e-9, abs=1e-6)
    for u in units:
        assert u.p_min - 1e-9 <= d.outputs[u.name] <= u.p_max + 1e-9
    # KKT of offer-based dispatch: a unit strictly inside its limits offers no more than
    # any unit that could still go up, and no less than any that could go down.
    interior = [u for u in units if u.p_min + 1e-6 < d.outputs[u.name] < u.p_max - 1e-6]
    offers = [u.offer(d.outputs[u.name]) for u in interior]
    if offers:
        assert max(offers) - min(offers) <= 1e-6 * max(1.0, max(offers))
    assert d.price >= max(offers, default=0) - 1e-9


def test_infeasible_demand_is_refused() -> None:
    with pytest.raises(InfeasibleDemand):
        economic_dispatch([flat("A", 10, 50)], 60)
    with pytest.raises(InfeasibleDemand):
        economic_dispatch([flat("A", 10, 50, p_min=30)], 20)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 1.0},
        {"k": 0.5},
        {"a": -1.0},
        {"p_min": 5.0, "p_max": 4.0},
        {"p_max": 0.0},
        {"b": math.nan},
        {"name": ""},
    ],
)
def test_bad_units_are_refused(kwargs) -> None:
    base = {"name": "g", "a": 0.1, "b": 1.0, "c": 0.0, "k": 1.5, "p_min": 0.0, "p_max": 10.0}
    base.update(kwargs)
    with pytest.raises(CoopError) as info:
        GeneratorUnit(**base)
    assert isinstance(info.value, MarketError)


# --- coalition values ---------------------------------------------------------------------


def test_coalition_values_by_hand() -> None:
    a, b = flat("A", 10, 50), flat("B", 15, 100)
    v = game_values([a, b], 80)
    assert v[frozenset()] == 0
    assert v[frozenset({"A"})] == 0  # A alone cannot cover 80 MW: worth nothing
    assert v[frozenset({"B"})] == 80 * 30 - 80 * 15
    assert v[frozenset({"A", "B"})] == 1450
    phi = shapley(v)
    # A: (0 - 0)/2 + (1450 - 1200)/2 = 125; B: (1200 - 0)/2 + (1450 - 0)/2 = 1325.
    assert phi == pytest.approx({"A": 125, "B": 1325})


def test_withholding_a_unit_does_not_raise_the_price() -> None:
    """Finding 7: two identical quadratic units, demand 10 MW. All offers clear at
    lambda* = 2 * (2 * 5) = 20. One unit alone at that price: 200 - 100 = 100; both
    (5 MW each): 200 - 50 = 150. Under each coalition's own marginal price one unit alone
    would have earned 40 * 10 - 100 = 300 and the pair's value would have rewarded
    withholding the second unit."""
    one = GeneratorUnit("u1", a=1.0, b=0.0, c=0.0, k=2.0, p_min=0.0, p_max=10.0)
    two = GeneratorUnit("u2", a=1.0, b=0.0, c=0.0, k=2.0, p_min=0.0, p_max=10.0)
    assert clearing_price([one, two], 10) == pytest.approx(20)
    v = game_values([one, two], 10)
    assert v[frozenset({"u1"})] == pytest.approx(100)
    assert v[frozenset({"u1", "u2"})] == pytest.approx(150)
    assert coalition_value([one, two], ["u1"], 10) == pytest.approx(100)
    assert shapley(v) == pytest.approx({"u1": 75, "u2": 75})


def test_paper_setting_marginal_price_at_full_output_and_shapley_shares() -> None:
    """The consortium-chain setting: the price is set by marginal pricing over all offers
    for the demand; at 160 MWh both units run at full output and the highest offer, GU2's
    1.2 * (2 * 0.01 * 40 + 11) = 14.16 (GU1's is 1.1 * (2 * 0.01 * 120 + 10) = 13.64), is the
    clearing price. Coalitions share the profit at 14.16: neither unit can serve 160 MWh
    alone (v = 0), v(both) = 14.16 * 160 - f1(120) - f2(40); Shapley splits it equally."""
    gu1 = GeneratorUnit("GU1", a=0.01, b=10.0, c=0.0, k=1.1, p_min=0.0, p_max=120.0)
    gu2 = GeneratorUnit("GU2", a=0.01, b=11.0, c=0.0, k=1.2, p_min=0.0, p_max=40.0)
    d = economic_dispatch([gu1, gu2], 160)
    assert d.outputs["GU2"] == pytest.approx(40)
    assert d.outputs["GU1"] == pytest.approx(120)
    assert clearing_price([gu1, gu2], 160) == pytest.approx(14.16)
    v = game_values([gu1, gu2], 160)
    grand = 14.16 * 160 - gu1.cost(120) - gu2.cost(40)
    assert v[frozenset({"GU1"})] == 0 and v[frozenset({"GU2"})] == 0
    assert v[frozenset({"GU1", "GU2"})] == pytest.approx(grand)
    assert shapley(v) == pytest.approx({"GU1": grand / 2, "GU2": grand / 2})
    # at 100 MWh GU1 serves alone; at the common price GU2 still adds its cheaper share
    v = game_values([gu1, gu2], 100)
    price = clearing_price([gu1, gu2], 100)
    assert v[frozenset({"GU1"})] == pytest.approx(price * 100 - gu1.cost(100))
    phi = shapley(v)
    assert phi["GU1"] + phi["GU2"] == pytest.approx(v[frozenset({"GU1", "GU2"})])
    assert phi["GU1"] > phi["GU2"] >= 0


def test_value_is_never_negative_when_fixed_costs_exceed_revenue() -> None:
    unit = flat("A", 10, 100, c=1e6)
    assert coalition_value([unit], ["A"], 50) == 0


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=8, deadline=None)
def test_game_values_match_coalition_value_and_are_monotone(seed) -> None:
    rng = random.Random(seed)
    units = [
        GeneratorUnit(
            f"g{i}",
            a=rng.uniform(0, 0.1),
            b=rng.uniform(5, 30),
            c=rng.uniform(0, 50),
            k=rng.uniform(1.05, 2),
            p_min=rng.choice([0.0, rng.uniform(0, 20)]),
            p_max=rng.uniform(30, 80),
        )
        for i in range(4)
    ]
    demand = rng.uniform(20, 150)
    v = game_values(units, demand)
    names = [u.name for u in units]
    for r in range(len(names) + 1):
        for combo in itertools.combinations(names, r):
            s = frozenset(combo)
            assert v[s] == pytest.approx(coalition_value(units, s, demand))
            for extra in set(names) - s:
                assert v[s | {extra}] >= v[s] - 1e-9


# --- exact Shapley: hand cases and axioms -------------------------------------------------


def test_glove_game_by_hand() -> None:
    # One left glove (L), two right gloves (R1, R2); a pair is worth 1.
    def v(s: frozenset[str]) -> float:
        return 1.0 if "L" in s and (s & {"R1", "R2"}) else 0.0

    players = ["L", "R1", "R2"]
    game = {
        frozenset(c): v(frozenset(c))
        for r in range(1, 4)
        for c in itertools.combinations(players, r)
    }
    assert shapley(game) == pytest.approx({"L": 2 / 3, "R1": 1 / 6, "R2": 1 / 6})


def test_empty_coalition_may_be_given_as_zero_or_omitted() -> None:
    game = {frozenset({"a"}): 2.0, frozenset({"b"}): 4.0, frozenset({"a", "b"}): 10.0}
    with_empty = dict(game)
    with_empty[frozenset()] = 0.0
    assert shapley(game) == shapley(with_empty) == pytest.approx({"a": 4.0, "b": 6.0})


def test_incomplete_or_bad_games_are_refused() -> None:
    with pytest.raises(CoopError, match="no value for coalition"):
        shapley({frozenset({"a"}): 1.0, frozenset({"a", "b"}): 2.0})
    with pytest.raises(CoopError, match="empty coalition"):
        shapley({frozenset(): 1.0, frozenset({"a"}): 1.0})
    with pytest.raises(CoopError, match="not finite"):
        shapley({frozenset({"a"}): math.inf})
    big = {frozenset(f"p{i}" for i in range(13)): 1.0}
    with pytest.raises(CoopError, match="shapley_sampled"):
        shapley(big)
    assert shapley({}) == {}


def random_game(players: list[str], rng: random.Random) -> dict[frozenset[str], float]:
    return {
        frozenset(c): rng.uniform(-10, 100)
        for r in range(1, len(players) + 1)
        for c in itertools.combinations(players, r)
    }


@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
@FEW
def test_efficiency(n, seed) -> None:
    players = [f"p{i}" for i in range(n)]
    game = random_game(players, random.Random(seed))
    phi = shapley(game)
    assert sum(phi.values()) == pytest.approx(game[frozenset(players)], abs=1e-9)


@given(st.integers(2, 6), st.integers(0, 2**32 - 1))
@FEW
def test_symmetric_players_get_equal_shares(n, seed) -> None:
    # Players p0 and p1 share a type; the value depends only on the multiset of types.
    rng = random.Random(seed)
    types = [0, 0] + [rng.randrange(1, 3) for _ in range(n - 2)]
    players = [f"p{i}" for i in range(n)]
    worth: dict[tuple[int, ...], float] = {}
    game = {}
    for r in range(1, n + 1):
        for combo in itertools.combinations(range(n), r):
            key = tuple(sorted(types[i] for i in combo))
            worth.setdefault(key, rng.uniform(0, 50))
            game[frozenset(players[i] for i in combo)] = worth[key]
    phi = shapley(game)
    assert phi["p0"] == pytest.approx(phi["p1"], abs=1e-9)


@given(st.integers(1, 5), st.integers(0, 2**32 - 1))
@FEW
def test_null_player_gets_nothing_and_changes_nothing(n, seed) -> None:
    players = [f"p{i}" for i in range(n)]
    game = random_game(players, random.Random(seed))
    with_null = {
        frozenset(c): game.get(frozenset(c) - {"zero"}, 0.0)
        for r in range(1, n + 2)
        for c in itertools.combinations([*players, "zero"], r)
    }
    phi, phi_null = shapley(game), shapley(with_null)
    assert phi_null["zero"] == pytest.approx(0, abs=1e-9)
    for p in players:
        assert phi_null[p] == pytest.approx(phi[p], abs=1e-9)


@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
@FEW
def test_additivity(n, seed) -> None:
    rng = random.Random(seed)
    players = [f"p{i}" for i in range(n)]
    v, w = random_game(players, rng), random_game(players, rng)
    both = {s: v[s] + w[s] for s in v}
    phi_v, phi_w, phi_both = shapley(v), shapley(w), shapley(both)
    for p in players:
        assert phi_both[p] == pytest.approx(phi_v[p] + phi_w[p], abs=1e-9)


def test_twelve_players_exact() -> None:
    players = [f"p{i:02d}" for i in range(12)]
    weights = {p: i + 1 for i, p in enumerate(players)}
    # An additive game: everybody's Shapley value is its own weight.
    game = {
        frozenset(p for i, p in enumerate(players) if mask >> i & 1): float(
            sum(weights[p] for i, p in enumerate(players) if mask >> i & 1)
        )
        for mask in range(1, 1 << 12)
    }
    assert shapley(game) == pytest.approx(weights)


# --- money --------------------------------------------------------------------------------


def test_money_shares_sum_exactly_to_the_grand_coalition() -> None:
    game = {frozenset(c): 0.0 for r in (1, 2) for c in itertools.combinations("abc", r)}
    game[frozenset("abc")] = 1.0  # Only all three together earn 1: each gets 1/3.
    money = share_profits(game)
    assert sum(money.values()) == MONEY_SCALE
    assert sorted(money.values()) == [3333, 3333, 3334]
    assert money == {"a": 3334, "b": 3333, "c": 3333}  # the extra unit to the first name


@given(st.integers(1, 6), st.integers(0, 2**32 - 1))
@FEW
def test_money_shares_are_integers_summing_to_rounded_value(n, seed) -> None:
    players = [f"p{i}" for i in range(n)]
    game = random_game(players, random.Random(seed))
    money = share_profits(game)
    assert all(isinstance(x, int) for x in money.values())
    assert sum(money.values()) == round(game[frozenset(players)] * MONEY_SCALE)
    for p, x in shapley(game).items():
        assert abs(money[p] - x * MONEY_SCALE) < 1.0 + 1e-6


def test_generator_profit_shares_by_hand() -> None:
    a, b = flat("A", 10, 50), flat("B", 15, 100)
    money = share_profits(game_values([a, b], 80))
    assert money == {"A": 125 * MONEY_SCALE, "B": 1325 * MONEY_SCALE}


# --- sampled Shapley ----------------------------------------------------------------------


def test_sampled_matches_exact_within_hoeffding_bound() -> None:
    rng = random.Random(7)
    units = [
        GeneratorUnit(
            f"g{i}",
            a=rng.uniform(0, 0.05),
            b=rng.uniform(5, 30),
            c=0,
            k=rng.uniform(1.1, 2),
            p_min=0,
            p_max=rng.uniform(20, 60),
        )
        for i in range(7)
    ]
    v = game_values(units, 120)
    exact = shapley(v)
    spread = max(v.values())  # v is monotone and >= 0: marginals lie in [0, v(N)]
    est, half = shapley_sampled(
        v.__getitem__, [u.name for u in units], 400, seed=1, confidence=0.999, value_range=spread
    )
    for name in exact:
        assert abs(est[name] - exact[name]) <= half[name]
        assert half[name] == pytest.approx(spread * math.sqrt(math.log(2 * 7 / 0.001) / 800))
    assert sum(est.values()) == pytest.approx(v[frozenset(exact)])


def test_default_bound_holds_at_small_samples() -> None:
    """Finding 7: the CLT interval covered 0.83 at m = 20 for a stated 0.95. The default
    bound (Hoeffding with the monotone range v(N) - v(empty)) must cover at least what it
    states: 200 seeds at m = 20 on a monotone generator game."""
    rng = random.Random(11)
    units = [
        GeneratorUnit(
            f"g{i}",
            a=rng.uniform(0, 0.05),
            b=rng.uniform(5, 30),
            c=0,
            k=rng.uniform(1.1, 2),
            p_min=0,
            p_max=rng.uniform(20, 60),
        )  # fmt: skip
        for i in range(6)
    ]
    v = game_values(units, 100)
    exact = shapley(v)
    names = [u.name for u in units]
    covered = 0
    for seed in range(200):
        est, half = shapley_sampled(v.__getitem__, names, 20, seed=seed, confidence=0.95)
        covered += all(abs(est[p] - exact[p]) <= half[p] for p in names)
    assert covered / 200 >= 0.95


def test_a_game_that_is_not_monotone_needs_a_stated_range() -> None:
    players = [f"p{i}" for i in range(5)]
    game = random_game(players, random.Random(3))
    game[frozenset()] = 0.0
    with pytest.raises(CoopError, match="not monotone, give value_range"):
        shapley_sampled(game.__getitem__, players, 50, seed="x")
    est, half = shapley_sampled(game.__getitem__, players, 50, seed="x", value_range=220.0)
    assert sum(est.values()) == pytest.approx(game[frozenset(players)])
    assert all(
        h == pytest.approx(220 * math.sqrt(math.log(2 * 5 / 0.05) / 100)) for h in half.values()
    )


def test_sampled_is_deterministic_per_seed() -> None:
    players = [f"p{i}" for i in range(6)]
    game = random_game(players, random.Random(5))
    game[frozenset()] = 0.0
    spread = {"value_range": 220.0}
    first = shapley_sampled(game.__getitem__, players, 50, seed=b"round-17", **spread)
    again = shapley_sampled(
        game.__getitem__, list(reversed(players)), 50, seed=b"round-17", **spread
    )
    other = shapley_sampled(game.__getitem__, players, 50, seed=b"round-18", **spread)
    assert first == again
    assert first[0] != other[0]


def test_sampled_airport_game_with_thirty_players() -> None:
    # Airport game v(S) = max cost in S has the closed form
    # phi_i = sum_{j <= i} (c_j - c_{j-1}) / (n - j + 1) for costs sorted ascending.
    costs = sorted(float(3 * i + (i % 4)) for i in range(1, 31))
    names = [f"u{i:02d}" for i in range(30)]
    cost = dict(zip(names, costs, strict=True))
    exact = {}
    running = 0.0
    for j, name in enumerate(names):
        previous = costs[j - 1] if j else 0.0
        running += (costs[j] - previous) / (30 - j)
        exact[name] = running
    est, half = shapley_sampled(
        lambda s: max((cost[p] for p in s), default=0.0),
        names,
        300,
        seed=2024,
        confidence=0.999,
        value_range=max(costs),
    )
    for name in names:
        assert abs(est[name] - exact[name]) <= half[name]
    assert sum(est.values()) == pytest.approx(max(costs))


def test_sampled_argument_checks() -> None:
    with pytest.raises(CoopError):
        shapley_sampled(lambda s: 0.0, ["a"], 0, seed=1)
    # one sample is enough for a bound that holds at any sample size
    est, half = shapley_sampled(lambda s: float(len(s)), ["a"], 1, seed=1)
    assert est == {"a": 1.0} and half["a"] == pytest.approx(math.sqrt(math.log(2 / 0.05) / 2))
    with pytest.raises(CoopError):
        shapley_sampled(lambda s: 0.0, ["a"], 5, seed=1, confidence=1.0)
    assert shapley_sampled(lambda s: 0.0, [], 5, seed=1) == ({}, {})
