"""Congestion management (M25): the weak centre checks a cleared hour against line limits.

Pure and deterministic, run by the weak centre after clearing and re-run by
every backup and by ``ledger verify``:

* ``check(network, result, period=None) -> FlowCheck`` -- the DC power flow
  the executed hour causes. Each microgrid injects its net export at its bus,
  ``sell_w - buy_w - grid_w`` (green power sold to other microgrids plus grid
  export, minus purchases and grid import); the grid bus balances. Flows are
  integer W (``units.to_int`` of PTDF x injections), positive from -> to.
* ``adjust(network, result) -> Adjustment`` (method ``"adjust"``) -- if a limit
  is violated, the smallest total cut of the hour's trades (Wh) that restores
  every limit, an LP solved with HiGHS (``scipy.optimize.linprog``). A cut of
  ``c`` Wh on a seller's trades means the seller holds back ``c`` Wh of green
  power (curtails or stores it) and its buyers take that energy from the grid
  instead: the seller's injection falls by ``c``, the buyers' withdrawals stay.
  So the LP chooses one cut per seller; it is spread over that seller's trades
  pro rata to their cleared volumes (``units.split_pro_rata``). Cuts are
  rounded up to whole Wh (limits are tightened by sellers + 1 W only when
  that rounding would leave a line over). When no cut clears every line (a
  line overloaded by grid exchange alone), the LP first minimises the
  remaining overload, reported as ``residual_w``, then the cut.
* ``price(network, result) -> Adjustment`` (method ``"price"``) -- no cut;
  each violated line gets a congestion price (minor units per kWh: the LP's
  shadow price of the line, in Wh of cut per W of capacity, times the hour's
  highest trade price) and each seller the charge per kWh its sales would
  pay through the lines it loads, for the re-bid.
* ``adjusted_result(result, adjustment)`` -- the clearing result with the
  cut trades (energy and amount pro rata, price unchanged) and dispatch
  (seller sells less, buyer imports more): what settlement then settles.
* ``verify(network, result, adjustment)`` -- a backup's check, like
  ``market.verify`` for a clearing: it re-runs the flows before and after the
  cut itself (never trusting the recorded ones), requires every limit to hold
  (or the same residual), the pro rata split, and a total cut within
  sellers + 1 Wh of its own LP optimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from meterchain import codec
from meterchain.errors import CodecError
from meterchain.market.clearing import ClearingResult, ExecutedHour, Trade
from meterchain.market.errors import MarketError
from meterchain.market.model import Dispatch
from meterchain.market.network import Network
from meterchain.market.units import pro_rata, split_pro_rata, to_int, to_int_array

ADJUST = "adjust"
PRICE = "price"
METHODS = (ADJUST, PRICE)


class CongestionError(MarketError):
    """A congestion check or adjustment is refused; the message says which rule failed."""


class LineLoading(NamedTuple):
    """One line's DC flow (W, positive from -> to) against its thermal limit (W).

    A named tuple: a 1000-line feeder makes a thousand of them per check."""

    line: str
    flow_w: int
    limit_w: int

    @property
    def overload_w(self) -> int:
        return max(0, abs(self.flow_w) - self.limit_w)

    @property
    def loading_pct(self) -> int:
        """|flow| as a whole percentage of the limit (rounded down)."""
        return abs(self.flow_w) * 100 // self.limit_w


@dataclass(frozen=True)
class FlowCheck:
    """The flows of one executed hour."""

    period: int
    loadings: tuple[LineLoading, ...]

    @property
    def violated(self) -> tuple[LineLoading, ...]:
        return tuple(ld for ld in self.loadings if ld.overload_w)

    @property
    def feasible(self) -> bool:
        return not self.violated


@dataclass(frozen=True)
class Cut:
    """A cleared trade cut back: ``kept_wh`` of ``cleared_wh`` remain (Wh)."""

    seller: str
    buyer: str
    cleared_wh: int
    kept_wh: int

    @property
    def cut_wh(self) -> int:
        return self.cleared_wh - self.kept_wh


@dataclass(frozen=True)
class Adjustment:
    """The weak centre's congestion record for one hour (integers, canonical CBOR).

    ``before``/``after``: line loadings of the cleared and the adjusted
    schedule; ``cuts``: every trade of the hour with what is kept (method
    "adjust"); ``residual_w``: overload per line the trades cannot relieve;
    ``line_prices``/``charges``: congestion price per violated line and per
    seller, minor units per kWh (method "price"); ``reason``: the published why.
    """

    period: int
    method: str
    network_digest: bytes
    clearing_digest: bytes
    before: tuple[LineLoading, ...]
    after: tuple[LineLoading, ...]
    cuts: tuple[Cut, ...]
    residual_w: tuple[tuple[str, int], ...]
    line_prices: tuple[tuple[str, int], ...]
    charges: tuple[tuple[str, int], ...]
    reason: str

    @property
    def total_cut_wh(self) -> int:
        return sum(c.cut_wh for c in self.cuts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "method": self.method,
            "network": self.network_digest,
            "clearing": self.clearing_digest,
            "before": [[ld.line, ld.flow_w, ld.limit_w] for ld in self.before],
            "after": [[ld.line, ld.flow_w, ld.limit_w] for ld in self.after],
            "cuts": [[c.seller, c.buyer, c.cleared_wh, c.kept_wh] for c in self.cuts],
            "residual": [list(r) for r in self.residual_w],
            "line_prices": [list(p) for p in self.line_prices],
            "charges": [list(c) for c in self.charges],
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, value: object) -> Adjustment:
        keys = {
            "period",
            "method",
            "network",
            "clearing",
            "before",
            "after",
            "cuts",
            "residual",
            "line_prices",
            "charges",
            "reason",
        }
        if not isinstance(value, Mapping) or set(value) != keys:
            raise CongestionError(f"a congestion record must be a map with keys {sorted(keys)}")
        try:
            adjustment = cls(
                period=value["period"],
                method=value["method"],
                network_digest=value["network"],
                clearing_digest=value["clearing"],
                before=tuple(LineLoading(*row) for row in value["before"]),
                after=tuple(LineLoading(*row) for row in value["after"]),
                cuts=tuple(Cut(*row) for row in value["cuts"]),
                residual_w=tuple((line, w) for line, w in value["residual"]),
                line_prices=tuple((line, p) for line, p in value["line_prices"]),
                charges=tuple((mg, p) for mg, p in value["charges"]),
                reason=value["reason"],
            )
        except (TypeError, ValueError) as exc:
            raise CongestionError(f"malformed congestion record: {exc}") from exc
        _check_types(adjustment)
        return adjustment

    def to_cbor(self) -> bytes:
        return codec.encode(self.to_dict())

    @classmethod
    def from_cbor(cls, data: bytes) -> Adjustment:
        try:
            return cls.from_dict(codec.decode(data))
        except CodecError as exc:
            raise CongestionError(f"congestion record is not canonical CBOR: {exc}") from exc

    @cached_property
    def digest(self) -> bytes:
        return codec.digest(self.to_dict())


def _check_types(a: Adjustment) -> None:
    """Integers (never booleans), names and digests where the record says so."""

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def name(v: object) -> bool:
        return isinstance(v, str) and bool(v)

    ok = (
        integer(a.period)
        and a.method in METHODS
        and isinstance(a.network_digest, bytes)
        and len(a.network_digest) == 32
        and isinstance(a.clearing_digest, bytes)
        and len(a.clearing_digest) == 32
        and isinstance(a.reason, str)
        and all(
            name(ld.line) and integer(ld.flow_w) and integer(ld.limit_w)
            for ld in (*a.before, *a.after)
        )
        and all(
            name(c.seller) and name(c.buyer) and integer(c.cleared_wh) and integer(c.kept_wh)
            for c in a.cuts
        )
        and all(name(k) and integer(v) for k, v in (*a.residual_w, *a.line_prices, *a.charges))
    )
    if not ok:
        raise CongestionError("congestion record holds values of the wrong type")


# ---------------------------------------------------------------------------
# flows


def _hour(result: ClearingResult, period: int | None) -> ExecutedHour:
    if not result.executed:
        raise CongestionError("clearing result has no executed hour")
    if period is None:
        return result.executed[0]
    for hour in result.executed:
        if hour.period == period:
            return hour
    raise CongestionError(f"hour {period} was not executed by this clearing")


def injections_w(
    network: Network, microgrids: Sequence[str], dispatch: Sequence[Dispatch]
) -> np.ndarray:
    """Net injection per bus (W, float array): each microgrid's ``sell - buy - grid``."""
    out = np.zeros(len(network.buses))
    for mg, d in zip(microgrids, dispatch, strict=True):
        out[network.bus_of(mg)] += d.sell_w - d.buy_w - d.grid_w
    return out


def _loadings(network: Network, flows: np.ndarray) -> tuple[LineLoading, ...]:
    rounded = to_int_array(np.asarray(flows, dtype=float)).tolist()
    return tuple(
        LineLoading(line.id, f, line.limit_w)
        for line, f in zip(network.lines, rounded, strict=True)
    )


def flows_w(network: Network, injections: np.ndarray) -> tuple[LineLoading, ...]:
    """Line loadings of a bus injection vector (W)."""
    return _loadings(network, network.ptdf_sparse @ injections)


def check(network: Network, result: ClearingResult, period: int | None = None) -> FlowCheck:
    """The DC power flow of the executed hour's dispatch against every line limit."""
    hour = _hour(result, period)
    return FlowCheck(
        hour.period, flows_w(network, injections_w(network, result.microgrids, hour.dispatch))
    )


# ---------------------------------------------------------------------------
# the minimal cut


@dataclass(frozen=True)
class _Plan:
    """The LP's answer: whole-Wh cut per seller, residual per line, line shadow prices."""

    sellers: tuple[str, ...]
    cuts_wh: tuple[int, ...]
    objective_wh: float
    residual_w: tuple[tuple[str, int], ...]
    shadow: tuple[float, ...]  # per line, Wh of cut per W of capacity
    margin_w: int
    rounding_ok: bool = True  # no line ends over its limit only because cuts were rounded up


def _sales(hour: ExecutedHour) -> dict[str, int]:
    sold: dict[str, int] = {}
    for trade in hour.trades:
        sold[trade.seller] = sold.get(trade.seller, 0) + trade.energy_wh
    return {s: w for s, w in sorted(sold.items()) if w > 0}


def _minimal_cut(network: Network, result: ClearingResult, hour: ExecutedHour) -> _Plan:
    """Smallest total seller cut restoring every line limit (LP over per-seller cuts, HiGHS).

    The LP first holds the exact limits; if rounding the cuts up to whole Wh
    leaves a line over (a cut that loads a counter-flowing line), it is solved
    again with limits tightened by ``sellers + 1`` W, which bounds any rounding.
    """
    plan = _solve_cut(network, result, hour, 0)
    if plan.rounding_ok:
        return plan
    return _solve_cut(network, result, hour, len(plan.sellers) + 1)


def _solve_cut(network: Network, result: ClearingResult, hour: ExecutedHour, margin: int) -> _Plan:
    from scipy.optimize import linprog

    sold = _sales(hour)
    sellers = tuple(sold)
    ptdf = network.ptdf
    flows = ptdf @ injections_w(network, result.microgrids, hour.dispatch)
    limits = np.array(network.limits_w, dtype=float)
    target = np.maximum(limits - margin, 0.0)
    m = len(network.lines)
    if not sellers or m == 0:
        residual = _residual(network, flows)
        return _Plan(sellers, (0,) * len(sellers), 0.0, residual, (0.0,) * m, margin)
    # Sensitivity of every line's flow to a Wh cut of each seller: -PTDF at its bus.
    cols = [network.bus_of(s) for s in sellers]
    sens = -ptdf[:, cols]
    caps = np.array([sold[s] for s in sellers], dtype=float)
    # Keep only the constraint rows some cut could push past the tightened limit.
    reach_hi = flows + np.clip(sens, 0, None) @ caps
    reach_lo = flows + np.clip(sens, None, 0) @ caps
    rows, rhs, row_line = [], [], []
    for line in range(m):
        if max(flows[line], reach_hi[line]) > target[line]:
            rows.append(sens[line])
            rhs.append(target[line] - flows[line])
            row_line.append(line)
        if min(flows[line], reach_lo[line]) < -target[line]:
            rows.append(-sens[line])
            rhs.append(target[line] + flows[line])
            row_line.append(line)
    n, k = len(sellers), len(rows)
    if k == 0:
        return _Plan(sellers, (0,) * n, 0.0, (), (0.0,) * m, margin)
    a_ub, b_ub = np.array(rows), np.array(rhs)
    lp = linprog(np.ones(n), A_ub=a_ub, b_ub=b_ub, bounds=[(0.0, c) for c in caps], method="highs")
    if lp.status == 2:
        lp = _least_residual_cut(a_ub, b_ub, caps)
    if lp.status != 0:
        raise CongestionError(f"congestion LP stopped without an optimum: {lp.message}")
    x = np.asarray(lp.x)[:n]
    cuts = tuple(
        min(sold[s], math.ceil(float(x[j]) - 1e-6)) if x[j] > 1e-6 else 0
        for j, s in enumerate(sellers)
    )
    shadow = [0.0] * m
    duals = -np.asarray(lp.ineqlin.marginals)[:k]
    for r, line in enumerate(row_line):
        shadow[line] += max(0.0, float(duals[r]))
    after = flows + sens @ np.array(cuts, dtype=float)
    residual = _residual(network, after)
    slack = dict(_residual(network, flows + sens @ x))
    ok = all(w <= slack.get(line, 0) for line, w in residual)
    return _Plan(sellers, cuts, float(np.sum(x)), residual, tuple(shadow), margin, ok)


def _least_residual_cut(a_ub: np.ndarray, b_ub: np.ndarray, caps: np.ndarray) -> Any:
    """When no cut clears every line: least total overload first, then the least cut keeping it.

    Two LPs (lexicographic), not one weighted sum, so no amount of cut is ever
    traded against a W of overload the trades could have relieved.
    """
    from scipy.optimize import linprog

    k, n = a_ub.shape
    a_r = np.hstack([a_ub, -np.eye(k)])
    bounds = [(0.0, c) for c in caps] + [(0.0, None)] * k
    overload = np.concatenate([np.zeros(n), np.ones(k)])
    first = linprog(overload, A_ub=a_r, b_ub=b_ub, bounds=bounds, method="highs")
    if first.status != 0:
        return first
    least = float(first.fun) * (1 + 1e-9) + 1e-6
    return linprog(
        np.concatenate([np.ones(n), np.zeros(k)]),
        A_ub=np.vstack([a_r, overload]),
        b_ub=np.append(b_ub, least),
        bounds=bounds,
        method="highs",
    )


def _residual(network: Network, flows: np.ndarray) -> tuple[tuple[str, int], ...]:
    """Overload (W, against the line limit) that remains, for lines still over it."""
    out = []
    for line, f in zip(network.lines, flows, strict=True):
        over = to_int(abs(float(f))) - line.limit_w
        if over > 0:
            out.append((line.id, over))
    return tuple(out)


def _spread(hour: ExecutedHour, sellers: Sequence[str], cuts: Sequence[int]) -> tuple[Cut, ...]:
    """Each seller's cut over its trades, pro rata to cleared volume (largest remainder)."""
    by_seller = dict(zip(sellers, cuts, strict=True))
    kept = [t.energy_wh for t in hour.trades]
    for seller, cut in by_seller.items():
        ks = [k for k, t in enumerate(hour.trades) if t.seller == seller]
        parts = split_pro_rata(cut, [hour.trades[k].energy_wh for k in ks])
        for k, part in zip(ks, parts, strict=True):
            kept[k] -= part
    return tuple(
        Cut(t.seller, t.buyer, t.energy_wh, keep) for t, keep in zip(hour.trades, kept, strict=True)
    )


def adjusted_result(result: ClearingResult, adjustment: Adjustment) -> ClearingResult:
    """``result`` with the adjustment's cuts applied to its hour (trades and dispatch).

    A cut trade keeps its price; its amount falls pro rata (money minor units).
    The seller sells the cut less (holding it back); the buyer buys it less and
    imports it from the grid instead. Method "price" changes nothing.
    """
    if adjustment.method != ADJUST or not adjustment.total_cut_wh:
        return result
    k_hour = next((k for k, h in enumerate(result.executed) if h.period == adjustment.period), None)
    if k_hour is None:
        raise CongestionError(f"hour {adjustment.period} was not executed by this clearing")
    hour = result.executed[k_hour]
    if len(adjustment.cuts) != len(hour.trades):
        raise CongestionError("congestion record does not list the hour's trades")
    trades: list[Trade] = []
    delta = dict.fromkeys(result.microgrids, 0)
    for trade, cut in zip(hour.trades, adjustment.cuts, strict=True):
        if (cut.seller, cut.buyer, cut.cleared_wh) != (trade.seller, trade.buyer, trade.energy_wh):
            raise CongestionError(
                f"congestion record's trade {cut.seller}->{cut.buyer} is not the cleared one"
            )
        if not 0 <= cut.kept_wh <= trade.energy_wh:
            raise CongestionError(
                f"trade {cut.seller}->{cut.buyer}: kept {cut.kept_wh} Wh of {trade.energy_wh}"
            )
        amount = pro_rata(trade.amount, cut.kept_wh, trade.energy_wh) if trade.energy_wh else 0
        trades.append(replace(trade, energy_wh=cut.kept_wh, amount=amount))
        delta[trade.seller] -= cut.cut_wh
        delta[trade.buyer] += cut.cut_wh
    dispatch = []
    for mg, d in zip(result.microgrids, hour.dispatch, strict=True):
        change = delta[mg]
        if change < 0:  # seller: sells less, holds the energy back
            d = replace(d, sell_w=d.sell_w + change)
        elif change > 0:  # buyer: buys less, imports the difference
            d = replace(d, buy_w=d.buy_w - change, grid_w=d.grid_w + change)
        dispatch.append(d)
    executed = list(result.executed)
    executed[k_hour] = replace(hour, trades=tuple(trades), dispatch=tuple(dispatch))
    return replace(result, executed=tuple(executed))


def _reason(before: FlowCheck, residual: Sequence[tuple[str, int]], what: str) -> str:
    over = ", ".join(
        f"{ld.line} {abs(ld.flow_w)} W > {ld.limit_w} W ({ld.loading_pct} %)"
        for ld in before.violated
    )
    text = f"hour {before.period}: line limits violated by the cleared schedule: {over}; {what}"
    if residual:
        left = ", ".join(f"{line} by {w} W" for line, w in residual)
        text += f"; the trades cannot relieve {left} (grid exchange, not trading)"
    return text


def adjust(network: Network, result: ClearingResult, period: int | None = None) -> Adjustment:
    """The "adjust" record: minimal cut of the hour's trades restoring every line limit."""
    hour = _hour(result, period)
    before = check(network, result, hour.period)
    if before.feasible:
        raise CongestionError(f"hour {hour.period}: no line limit is violated; nothing to adjust")
    plan = _minimal_cut(network, result, hour)
    cuts = _spread(hour, plan.sellers, plan.cuts_wh)
    draft = Adjustment(
        hour.period,
        ADJUST,
        network.digest,
        result.digest,
        before.loadings,
        (),
        cuts,
        plan.residual_w,
        (),
        (),
        "",
    )
    after = check(network, adjusted_result(result, draft), hour.period)
    total = sum(c.cut_wh for c in cuts)
    what = f"trades cut by {total} Wh in all (the smallest total change, LP)"
    return replace(draft, after=after.loadings, reason=_reason(before, plan.residual_w, what))


def price(network: Network, result: ClearingResult, period: int | None = None) -> Adjustment:
    """The "price" record: congestion prices on the violated lines and per seller, no cut."""
    hour = _hour(result, period)
    before = check(network, result, hour.period)
    if before.feasible:
        raise CongestionError(f"hour {hour.period}: no line limit is violated; nothing to price")
    plan = _minimal_cut(network, result, hour)
    reference = max((t.price_per_kwh for t in hour.trades), default=0)
    line_prices = tuple(
        (line.id, math.ceil(shadow * reference - 1e-9))
        for line, shadow in zip(network.lines, plan.shadow, strict=True)
        if shadow > 1e-9
    )
    ptdf = network.ptdf
    index = {line.id: k for k, line in enumerate(network.lines)}
    direction = {ld.line: (1 if ld.flow_w > 0 else -1) for ld in before.loadings}
    charges = []
    for seller in plan.sellers:
        col = network.bus_of(seller)
        charge = sum(
            p * max(0.0, direction[line] * float(ptdf[index[line], col])) for line, p in line_prices
        )
        charges.append((seller, math.ceil(charge - 1e-9)))
    what = "congestion prices set on the violated lines; re-bid with the charges"
    return Adjustment(
        hour.period,
        PRICE,
        network.digest,
        result.digest,
        before.loadings,
        before.loadings,
        (),
        plan.residual_w,
        line_prices,
        tuple(charges),
        _reason(before, plan.residual_w, what),
    )


def decide(
    network: Network, result: ClearingResult, method: str, period: int | None = None
) -> Adjustment | None:
    """The weak centre's step after clearing: None if every limit holds, else its record."""
    if method not in METHODS:
        raise CongestionError(f"congestion method {method!r} is not one of {', '.join(METHODS)}")
    if check(network, result, period).feasible:
        return None
    return adjust(network, result, period) if method == ADJUST else price(network, result, period)


def verify(network: Network, result: ClearingResult, adjustment: Adjustment) -> None:
    """A backup's check of a congestion record: re-run the flows, never trust them.

    Raises CongestionError naming the first rule that fails.
    """
    if adjustment.network_digest != network.digest:
        raise CongestionError("congestion record was computed on another network model")
    if adjustment.clearing_digest != result.digest:
        raise CongestionError("congestion record refers to another clearing result")
    if adjustment.method not in METHODS:
        raise CongestionError(f"unknown congestion method {adjustment.method!r}")
    hour = _hour(result, adjustment.period)
    before = check(network, result, hour.period)
    if before.loadings != adjustment.before:
        raise CongestionError("recorded flows of the cleared schedule differ from the DC flow")
    if before.feasible:
        raise CongestionError(f"hour {hour.period}: no line limit is violated")
    mine = _minimal_cut(network, result, hour)
    if adjustment.method == PRICE:
        if adjustment != price(network, result, hour.period):
            raise CongestionError("congestion prices differ from the contract's")
        return
    after = check(network, adjusted_result(result, adjustment), hour.period)
    if after.loadings != adjustment.after:
        raise CongestionError("recorded flows after the cut differ from the DC flow")
    sellers = tuple(_sales(hour))
    per_seller = [sum(c.cut_wh for c in adjustment.cuts if c.seller == s) for s in sellers]
    if _spread(hour, sellers, per_seller) != adjustment.cuts:
        raise CongestionError("cuts are not spread pro rata over each seller's trades")
    allowed = dict(mine.residual_w)
    for ld in after.loadings:
        if ld.overload_w > allowed.get(ld.line, 0):
            raise CongestionError(
                f"line {ld.line} still carries {abs(ld.flow_w)} W > {ld.limit_w} W after the cut"
            )
    if adjustment.total_cut_wh > sum(mine.cuts_wh) + len(sellers) + 1:
        raise CongestionError(
            f"cut of {adjustment.total_cut_wh} Wh is not minimal "
            f"(the contract needs {math.ceil(mine.objective_wh)} Wh)"
        )
    if dict(adjustment.residual_w) != allowed:
        raise CongestionError("recorded residual overload differs from the contract's")
    if adjustment.line_prices or adjustment.charges:
        raise CongestionError("an adjust record carries no congestion prices")


__all__ = [
    "ADJUST",
    "METHODS",
    "PRICE",
    "Adjustment",
    "CongestionError",
    "Cut",
    "FlowCheck",
    "LineLoading",
    "adjust",
    "adjusted_result",
    "check",
    "decide",
    "flows_w",
    "injections_w",
    "price",
    "verify",
]
