"""Cooperative game among generators (M13): marginal-price dispatch, coalition values, and
profit sharing by the Shapley value (exact for up to 12 players, sampled with a stated error
bound beyond), paid out in integer minor units that sum exactly to the grand coalition's value.

The generator model, for one period of one hour (so MW and MWh coincide):
- unit i costs f_i(p) = a_i p^2 + b_i p + c_i currency units while it runs (p in MW,
  0 when it is off: c_i is a no-load cost), and offers r_i(p) = k_i (2 a_i p + b_i)
  per MWh, k_i > 1;
- a running unit produces p_min <= p <= p_max;
- a set C of running units serves the demand D by offer-based economic dispatch:
  every unit runs where its offer equals a common lambda, clipped to its limits,
  so sum(p_i) = D (units with a flat offer equal to lambda share the remainder
  pro rata to p_max - p_min);
- marginal pricing: the clearing price is the highest offer among the units that
  produce (p_i > 0), and every MWh of D is paid that price.

Clearing price (the consortium-chain paper's setting). The market price lambda* is
set once, by marginal pricing over all offers for the demand: the highest offer
among the dispatched units when every unit offers (`clearing_price`; in the
paper's example 14.16 at 160 MWh, the offer of a unit at full output).

Coalition value. v(S) is the best profit the units of S can make serving the whole
demand D alone at that price: the maximum, over the sets C of S's units it could
run that can meet D exactly (sum p_min <= D <= sum p_max), of lambda* D - sum of
f_i(p_i), and 0 if that maximum is negative or no C can meet D (a coalition may
always decline to serve and earn nothing). The price does not depend on S, so a
coalition cannot raise it by withholding units: running fewer units only pays
when it saves cost (no-load costs). So v(empty) = 0, v is monotone (a larger
coalition can run the same units), and a coalition that cannot cover the demand
is worth 0. Computing v for every coalition costs 2^n dispatches (one per set of
running units) and an n 2^n subset-maximum pass, see `game_values`.

Sharing. x_i = sum over S containing i of (|S|-1)!(n-|S|)!/n! [v(S) - v(S - {i})]
(`shapley`, bitmask loop, n <= 12) or its permutation-sampled estimate
(`shapley_sampled`) with Hoeffding half-widths that hold for all players at once
with the stated confidence, for any number of samples. `share_profits` rounds the
exact shares to minor units by the largest-remainder method so they sum to the rounded v(N).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from meterchain import codec
from meterchain.market.errors import MarketError
from meterchain.market.units import MONEY_SCALE, to_int, to_ints_with_total

MAX_EXACT_PLAYERS = 12
MAX_GAME_UNITS = 16


class CoopError(MarketError):
    """A cooperative-game input is malformed (bad unit, incomplete game, bad sampling request)."""

    reason = "coop"


class InfeasibleDemand(CoopError):
    """The running units cannot produce exactly the demand within their limits."""

    reason = "infeasible_demand"


@dataclass(frozen=True)
class GeneratorUnit:
    """A thermal unit: quadratic cost, marked-up linear offer, output limits (MW)."""

    name: str
    a: float
    b: float
    c: float
    k: float
    p_min: float
    p_max: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CoopError(f"unit name must be non-empty text, got {self.name!r}")
        for attr in ("a", "b", "c", "k", "p_min", "p_max"):
            value = getattr(self, attr)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise CoopError(f"unit {self.name}: {attr} must be a finite number")
        if self.a < 0 or self.b < 0 or self.c < 0:
            raise CoopError(f"unit {self.name}: cost coefficients must be >= 0")
        if self.k <= 1:
            raise CoopError(f"unit {self.name}: offer markup k must be > 1, got {self.k}")
        if not 0 <= self.p_min <= self.p_max or self.p_max <= 0:
            raise CoopError(f"unit {self.name}: need 0 <= p_min <= p_max and p_max > 0")

    def cost(self, p: float) -> float:
        """f(p) in currency units for one hour at p MW; an idle unit (p = 0) costs nothing."""
        return self.a * p * p + self.b * p + self.c if p > 0 else 0.0

    def offer(self, p: float) -> float:
        """r(p) = k (2 a p + b), the unit's offer price at output p, currency units per MWh."""
        return self.k * (2 * self.a * p + self.b)


@dataclass(frozen=True)
class Dispatch:
    """Outputs of the running units (MW), the marginal price, and the profit it brings."""

    outputs: Mapping[str, float]
    price: float
    revenue: float
    cost: float

    @property
    def profit(self) -> float:
        return self.revenue - self.cost


def _tolerance(demand: float) -> float:
    return 1e-9 * max(1.0, abs(demand))


def _is_flat(unit: GeneratorUnit) -> bool:
    """True if the offer is the same over the whole range (a = 0, a negligible a, or a
    fixed output): such a unit steps from p_min to p_max at one price instead of sliding."""
    return unit.offer(unit.p_min) == unit.offer(unit.p_max)


def _output(unit: GeneratorUnit, lam: float, upper: bool) -> float:
    """Output at multiplier lam; for a flat offer exactly at lam, p_max if upper else p_min."""
    if not _is_flat(unit):
        # At or beyond its own limit offers the unit sits at that limit exactly: solving
        # for p there cancels (b/2a) when a is tiny, and a unit at p_max came out 3.5e-5
        # MW inside it, looking like a marginal unit at a lower offer than the price.
        if lam <= unit.offer(unit.p_min):
            return unit.p_min
        if lam >= unit.offer(unit.p_max):
            return unit.p_max
        p = (lam / unit.k - unit.b) / (2 * unit.a)
        return min(max(p, unit.p_min), unit.p_max)
    step = unit.offer(unit.p_min)
    if lam < step or (lam == step and not upper):
        return unit.p_min
    return unit.p_max


def economic_dispatch(units: Sequence[GeneratorUnit], demand: float) -> Dispatch:
    """Offer-based dispatch of all `units` (all running) to produce exactly `demand` MW.

    Raises InfeasibleDemand when demand lies outside [sum p_min, sum p_max].
    """
    if not isinstance(demand, int | float) or not math.isfinite(demand) or demand < 0:
        raise CoopError(f"demand must be a finite number >= 0, got {demand!r}")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise CoopError(f"unit names repeat: {sorted(names)}")
    tol = _tolerance(demand)
    low = sum(u.p_min for u in units)
    high = sum(u.p_max for u in units)
    if demand < low - tol or demand > high + tol:
        raise InfeasibleDemand(f"demand {demand} MW outside [{low}, {high}] of the running units")
    outputs = _solve_outputs(units, demand, tol)
    running = [u for u in units if outputs[u.name] > tol]
    price = max((u.offer(outputs[u.name]) for u in running), default=0.0)
    cost = sum(u.cost(outputs[u.name]) for u in running)
    return Dispatch(outputs=outputs, price=price, revenue=price * demand, cost=cost)


def _solve_outputs(units: Sequence[GeneratorUnit], demand: float, tol: float) -> dict[str, float]:
    """Walk the breakpoints of total supply(lambda), a non-decreasing piecewise-linear map."""
    if demand <= sum(u.p_min for u in units) + tol:
        return {u.name: u.p_min for u in units}
    breaks = sorted({u.offer(u.p_min) for u in units} | {u.offer(u.p_max) for u in units})
    previous = -math.inf
    for beta in breaks:
        below = sum(_output(u, beta, upper=False) for u in units)
        if demand <= below + tol:
            return _interpolate(units, demand, previous, beta)
        above = sum(_output(u, beta, upper=True) for u in units)
        if demand <= above + tol:
            # lambda = beta; offers flat at beta fill the gap between the two limits.
            flat = [u for u in units if _is_flat(u) and u.offer(u.p_min) == beta]
            out = {u.name: _output(u, beta, upper=False) for u in units}
            span = sum(u.p_max - u.p_min for u in flat)
            gap = demand - below
            for u in flat:
                out[u.name] = u.p_min + (gap * (u.p_max - u.p_min) / span if span else 0.0)
            return out
        previous = beta
    return {u.name: u.p_max for u in units}


def _interpolate(
    units: Sequence[GeneratorUnit], demand: float, lo: float, hi: float
) -> dict[str, float]:
    """Outputs where supply crosses demand strictly between adjacent breakpoints lo < hi.

    No unit reaches a limit inside (lo, hi), so every output is linear there; reading
    the outputs at both ends and interpolating avoids solving for lambda itself,
    which loses precision when some a_i is tiny (b/2a cancels).
    """
    at_hi = {u.name: _output(u, hi, upper=False) for u in units}
    if lo == -math.inf:
        return at_hi
    at_lo = {u.name: _output(u, lo, upper=True) for u in units}
    s_lo, s_hi = sum(at_lo.values()), sum(at_hi.values())
    t = (demand - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.0
    t = min(max(t, 0.0), 1.0)
    return {name: at_lo[name] + t * (at_hi[name] - at_lo[name]) for name in at_lo}


def _check_units(units: Sequence[GeneratorUnit]) -> None:
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise CoopError(f"unit names repeat: {sorted(names)}")


def clearing_price(units: Sequence[GeneratorUnit], demand: float) -> float:
    """lambda*: marginal pricing over all offers for ``demand`` (the highest offer among the
    dispatched units when every unit offers), currency units per MWh.

    If the demand is below the sum of all minimum outputs, the units that run are the set
    that meets it at the least as-offered cost (sum of k_i (a_i p^2 + b_i p)); raises
    InfeasibleDemand if no set of units can meet it.
    """
    try:
        return economic_dispatch(units, demand).price
    except InfeasibleDemand:
        if len(units) > MAX_GAME_UNITS:
            raise
    best: tuple[float, float] | None = None
    for mask in range(1, 1 << len(units)):
        running = [u for i, u in enumerate(units) if mask >> i & 1]
        try:
            d = economic_dispatch(running, demand)
        except InfeasibleDemand:
            continue
        offered = sum(
            u.k * (u.a * d.outputs[u.name] ** 2 + u.b * d.outputs[u.name]) for u in running
        )
        if best is None or offered < best[0]:
            best = (offered, d.price)
    if best is None:
        raise InfeasibleDemand(f"no set of units can produce {demand} MW")
    return best[1]


def _commitment_profit(
    units: Sequence[GeneratorUnit], demand: float, price: float
) -> float | None:
    """Profit of running exactly `units` to serve demand at ``price``, or None if they cannot."""
    try:
        return price * demand - economic_dispatch(units, demand).cost
    except InfeasibleDemand:
        return None


def coalition_value(
    units: Sequence[GeneratorUnit], coalition: Iterable[str], demand: float
) -> float:
    """v(S) for one coalition at the market's clearing price (see the module docstring);
    costs one dispatch of all units and 2^|S| dispatches of S's units."""
    _check_units(units)
    members = set(coalition)
    by_name = {u.name: u for u in units}
    unknown = members - by_name.keys()
    if unknown:
        raise CoopError(f"coalition names unknown units: {sorted(unknown)}")
    own = [by_name[n] for n in sorted(members)]
    if len(own) > MAX_GAME_UNITS:
        raise CoopError(f"exact coalition value is limited to {MAX_GAME_UNITS} units")
    try:
        price = clearing_price(units, demand)
    except InfeasibleDemand:
        return 0.0  # the market cannot meet the demand: no coalition earns anything
    best = 0.0
    for mask in range(1, 1 << len(own)):
        running = [u for i, u in enumerate(own) if mask >> i & 1]
        profit = _commitment_profit(running, demand, price)
        if profit is not None and profit > best:
            best = profit
    return best


def game_values(units: Sequence[GeneratorUnit], demand: float) -> dict[frozenset[str], float]:
    """v(S) for every coalition S of `units` (the empty one included, worth 0).

    The price is `clearing_price` of all units; one dispatch per set of running
    units, then a subset-maximum pass: v(S) is the best over all running sets
    inside S, which is what `coalition_value` computes.
    """
    _check_units(units)
    n = len(units)
    if n > MAX_GAME_UNITS:
        raise CoopError(f"the full game is limited to {MAX_GAME_UNITS} units (2^n coalitions)")
    names = [u.name for u in units]
    try:
        price = clearing_price(units, demand)
    except InfeasibleDemand:
        return {
            frozenset(names[i] for i in range(n) if mask >> i & 1): 0.0 for mask in range(1 << n)
        }
    best = [0.0] * (1 << n)
    for mask in range(1, 1 << n):
        running = [u for i, u in enumerate(units) if mask >> i & 1]
        profit = _commitment_profit(running, demand, price)
        best[mask] = max(0.0, profit) if profit is not None else 0.0
    for i in range(n):
        bit = 1 << i
        for mask in range(1 << n):
            if mask & bit and best[mask ^ bit] > best[mask]:
                best[mask] = best[mask ^ bit]
    names = [u.name for u in units]
    return {
        frozenset(names[i] for i in range(n) if mask >> i & 1): best[mask] for mask in range(1 << n)
    }


def shapley(values: Mapping[frozenset[str], float]) -> dict[str, float]:
    """Exact Shapley value of the game `values` (every non-empty coalition of the players).

    The players are the union of the coalitions named; the empty coalition may be
    omitted and counts as 0 (if given it must be 0). At most MAX_EXACT_PLAYERS players;
    use `shapley_sampled` beyond.
    """
    players: set[str] = set()
    for coalition in values:
        if not isinstance(coalition, frozenset):
            raise CoopError(f"coalitions must be frozensets, got {type(coalition).__name__}")
        for player in coalition:
            if not isinstance(player, str):
                raise CoopError(f"players must be named by text, got {player!r}")
        players |= coalition
    order = sorted(players)
    n = len(order)
    if n > MAX_EXACT_PLAYERS:
        raise CoopError(
            f"{n} players: exact Shapley is limited to {MAX_EXACT_PLAYERS}; use shapley_sampled"
        )
    index = {p: i for i, p in enumerate(order)}
    table: list[float | None] = [None] * (1 << n)
    table[0] = 0.0
    for coalition, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CoopError(f"value of {sorted(coalition)} is not a number: {value!r}")
        if not math.isfinite(value):
            raise CoopError(f"value of {sorted(coalition)} is not finite: {value!r}")
        mask = sum(1 << index[p] for p in coalition)
        if mask == 0 and value != 0:
            raise CoopError(f"the empty coalition must be worth 0, got {value}")
        table[mask] = float(value)
    for mask, value in enumerate(table):
        if value is None:
            missing = sorted(order[i] for i in range(n) if mask >> i & 1)
            raise CoopError(f"the game has no value for coalition {missing}")
    full: list[float] = [v for v in table if v is not None]
    # weight[s] = s!(n-s-1)!/n!: the chance that exactly the s players of S precede i.
    weight = [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    phi = [0.0] * n
    for mask in range(1 << n):
        base = full[mask]
        w = weight[mask.bit_count()] if mask.bit_count() < n else 0.0
        for i in range(n):
            bit = 1 << i
            if not mask & bit:
                phi[i] += w * (full[mask | bit] - base)
    return {p: phi[i] for i, p in enumerate(order)}


class _SeededStream:
    """SHA-256 counter-mode random stream: the same seed gives the same draws on every node
    and every Python version (unlike `random`, whose algorithms may change)."""

    def __init__(self, seed: int | bytes | str) -> None:
        self._key = hashlib.sha256(b"meterchain/coop/shapley\x00" + codec.encode(seed)).digest()
        self._counter = 0

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound) by rejection (no modulo bias)."""
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            block = hashlib.sha256(self._key + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
            draw = int.from_bytes(block[:8], "big")
            if draw < limit:
                return draw % bound

    def permutation(self, items: Sequence[str]) -> list[str]:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


def shapley_sampled(
    value_fn: Callable[[frozenset[str]], float],
    players: Iterable[str],
    samples: int,
    seed: int | bytes | str,
    *,
    confidence: float = 0.95,
    value_range: float | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Permutation-sampled Shapley estimates and half-widths of their confidence intervals.

    Draws `samples` player orders from a SHA-256 stream keyed by `seed` (deterministic
    on every node) and averages each player's marginal contribution
    v(predecessors + i) - v(predecessors). Estimates sum to v(N) - v(empty) exactly
    in exact arithmetic, so efficiency holds whatever the sample.

    Half-width h, holding for all n players at once with probability >= confidence
    (Bonferroni: delta = 1 - confidence split over the players), by Hoeffding's
    inequality: h = R * sqrt(ln(2n/delta) / (2m)), distribution-free and valid for
    any number of samples m. R bounds the spread (max - min) of any player's
    marginal contributions: `value_range` if given; otherwise v(N) - v(empty),
    which bounds them for a monotone game (every M13 game is monotone). A sampled
    marginal contribution outside [0, v(N) - v(empty)] shows the game is not
    monotone, and then `value_range` is required (CoopError). An asymptotic CLT
    interval is not used: at small m it covers less than it states (0.83 at
    m = 20 for a stated 0.95).
    """
    order = sorted(set(players))
    n = len(order)
    if n == 0:
        return {}, {}
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise CoopError(f"samples must be a positive integer, got {samples!r}")
    if not 0 < confidence < 1:
        raise CoopError(f"confidence must lie in (0, 1), got {confidence}")
    if value_range is not None and not (math.isfinite(value_range) and value_range >= 0):
        raise CoopError(f"value_range must be finite and >= 0, got {value_range}")
    stream = _SeededStream(seed)
    empty = float(value_fn(frozenset()))
    grand = float(value_fn(frozenset(order)))
    if not math.isfinite(grand):
        raise CoopError(f"value of {order} is not finite: {grand!r}")
    monotone_range = grand - empty
    mean = dict.fromkeys(order, 0.0)
    for m in range(1, samples + 1):
        prefix: set[str] = set()
        previous = empty
        for player in stream.permutation(order):
            prefix.add(player)
            current = float(value_fn(frozenset(prefix)))
            if not math.isfinite(current):
                raise CoopError(f"value of {sorted(prefix)} is not finite: {current!r}")
            marginal = current - previous
            if value_range is None and not -1e-9 * max(1.0, abs(grand)) <= marginal <= (
                monotone_range + 1e-9 * max(1.0, abs(grand))
            ):
                raise CoopError(
                    f"marginal contribution {marginal} of {player} is outside [0, v(N) - v(empty)]"
                    ": the game is not monotone, give value_range"
                )
            mean[player] += (marginal - mean[player]) / m
            previous = current
    delta_all = 1 - confidence
    spread_bound = monotone_range if value_range is None else value_range
    h = spread_bound * math.sqrt(math.log(2 * n / delta_all) / (2 * samples))
    return mean, dict.fromkeys(order, h)


def share_profits(values: Mapping[frozenset[str], float]) -> dict[str, int]:
    """Shapley shares of v(N) in integer minor units, summing exactly to v(N) rounded.

    Rounding is the market's shared one: v(N) * MONEY_SCALE to the nearest integer,
    then the largest-remainder split of the shares (ties to the earlier name).
    """
    phi = shapley(values)
    if not phi:
        return {}
    order = sorted(phi)
    total = to_int(values[frozenset(order)] * MONEY_SCALE)
    try:
        parts = to_ints_with_total([phi[p] * MONEY_SCALE for p in order], total)
    except ValueError as exc:
        raise CoopError(f"Shapley shares cannot be rounded to sum to {total}: {exc}") from exc
    return dict(zip(order, parts, strict=True))
