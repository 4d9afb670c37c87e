"""SC1 clearing: disagreement point, social-cost schedule and Nash-bargaining payments (M2-M4).

API (pure and deterministic; the consensus agents call these):

* ``ClearingRequest(market, first_period, requests, executed_periods=1)`` -- the
  SC1 input: every microgrid's `TradeRequest` (model for the window + deposit).
  ``to_cbor``/``from_cbor``/``digest`` give its canonical bytes.
* ``clear(request, solver="piqp") -> ClearingResult`` -- the contract result.
* ``ClearingResult`` -- frozen, integers only; ``to_dict``/``to_cbor``/
  ``from_cbor`` and ``digest`` (SHA-256 of the canonical CBOR via
  `meterchain.codec`). ``executed[0]`` holds what happens in the executed hour:
  dispatch, trades with amounts at the hour's energy price, payments,
  bargaining transfers.
* ``assemble(...)`` -- the deterministic second half of `clear` (everything
  derived from the rounded schedules); `verify` re-runs it on a proposal.

How a window is cleared:

1. Disagreement point (M3): each microgrid alone, no inter-microgrid trade --
   its own QP block; C_non_i is its window cost (with the planning cost of
   ending below its storage target, `model.target_shortfall_e12`). A
   microgrid whose own block is infeasible (both solvers agree) is left out
   with the reason (``excluded``); the others clear.
2. Stage 1 (M3): one convex QP over all microgrids and periods minimising the
   total cost, with inter-microgrid trade as a pool (each microgrid sells
   s_i,t >= 0 green power into it or buys b_i,t >= 0, sum s = sum b, phi/2 per
   kWh on each side): size grows linearly with the number of microgrids.
3. Rounding (`units`): schedules become integer W/Wh; pool totals stay equal
   (largest remainder), a microgrid never both sells and buys (netted), the
   grid exchange absorbs what rounding leaves so every balance is exact, and
   storage energy follows the rounded flows exactly (`Storage.energy_step_exact`)
   and stays within its bounds (`keep_storage_in_bounds`).
4. Bilateral trades: in each period the pool is split into trades P_ij,t by the
   north-west-corner rule in id order: deterministic, at most (#sellers +
   #buyers - 1) trades. A trade is stored once (seller, buyer, Wh), so
   P_ij = -P_ji. The split only says who delivers to whom (M5 pro rata); it
   sets no price.
5. Stage 2 (M3), bargaining over the window: the coalition K is every
   microgrid that trades anywhere in the plan; it runs the plan's executed
   hour whenever the window saving S = sum over K of C_non_i - C_i is
   positive, even when the hour alone saves nothing (storage plans pay off
   later); otherwise everyone runs its disagreement hour. Member i's gain
   from the executed hour is C_non_i - C_i(h) - V_i, where V_i
   (`continuation_costs_later`) is what the rest of the window costs it alone from
   the storage energy the plan leaves after the hour, so stored energy is
   valued and nobody is worse off even if the market stopped after the hour.
   The hour's saving (the sum of the gains) is split equally: max sum
   ln(gain_i - p_i) with payments summing to zero gives gain_i - p_i = share,
   shares equal to the minor unit (remainder to the first by id). An hour
   whose saving is negative although S > 0 (an investment in later trades)
   breaks even by ``investment_credit``: each member advances an equal share
   of the hour's shortfall. Gains over a day telescope (each hour's V is the
   next hour's C_non), so every member ends the day with an equal share of
   the day's saving.
6. Prices: one energy price per hour (`energy_price`), the middle of the band
   between the sellers' highest feed-in tariff and the buyers' lowest retail
   price (mid-band net of fees too, as the fee is split half and half); each
   trade's amount is its energy at that price. What the energy payments leave
   of each member's payment is carried as labelled bargaining transfers
   (`Transfer`), north-west corner over payers and payees in id order.

Costs (C_i, C_non_i) are exact integers computed from the rounded schedules
(`model.period_cost_e12`) and include the small flow wear term of `Market`, so
a microgrid's settled money differs from its bargained cost by that term.

``executed_periods`` > 1 executes several leading periods of one clearing (the
day-ahead comparison of M5): every microgrid then follows the cooperative plan
in each of those hours (switching single microgrids to their disagreement hour
would break storage continuity), each hour's traders split that hour's saving
(C_non_i(h) - C_i(h)) at the same energy price, and individual rationality is
reported, not enforced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from meterchain import codec
from meterchain.errors import CodecError
from meterchain.market import qp as qp_mod
from meterchain.market.errors import InfeasibleWindow, InvalidModel, InvalidRequest, InvalidResult
from meterchain.market.model import (
    PPM,
    Dispatch,
    Market,
    Microgrid,
    TradeRequest,
    cost_e12,
    period_cost_e12,
    target_shortfall_e12,
)
from meterchain.market.units import (
    COST_SCALE,
    div_round,
    energy_money,
    to_int_array,
    to_ints_cumulative,
    to_ints_with_total,
)

DEFAULT_SOLVER = "piqp"
PPM_SQ = PPM * PPM


@dataclass(frozen=True)
class ClearingRequest:
    """SC1 input: the market rules and every microgrid's trade request for one window.

    ``first_period`` is the hour of the day (0-23) of the window's first period,
    which is the one executed; all models cover the same number of periods.
    Requests are kept sorted by microgrid id (the canonical order).
    """

    market: Market
    first_period: int
    requests: tuple[TradeRequest, ...]
    executed_periods: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.market, Market):
            raise InvalidRequest("market must be a Market")
        if isinstance(self.first_period, bool) or not isinstance(self.first_period, int):
            raise InvalidRequest("first_period must be an integer hour")
        if self.first_period < 0:
            raise InvalidRequest(f"first_period ({self.first_period}) < 0")
        requests = tuple(self.requests)
        if not requests:
            raise InvalidRequest("a clearing needs at least one trade request")
        for r in requests:
            if not isinstance(r, TradeRequest):
                raise InvalidRequest("requests must be TradeRequest records")
        requests = tuple(sorted(requests, key=lambda r: r.microgrid.id))
        for a, b in zip(requests, requests[1:], strict=False):
            if a.microgrid.id == b.microgrid.id:
                raise InvalidRequest(f"microgrid {a.microgrid.id} has more than one request")
        periods = requests[0].microgrid.periods
        for r in requests:
            if r.microgrid.periods != periods:
                raise InvalidRequest(
                    f"microgrid {r.microgrid.id}: model covers {r.microgrid.periods} periods, "
                    f"microgrid {requests[0].microgrid.id}'s covers {periods}"
                )
            if r.deposit < self.market.min_deposit:
                raise InvalidRequest(
                    f"microgrid {r.microgrid.id}: deposit ({r.deposit}) < market min_deposit "
                    f"({self.market.min_deposit})"
                )
        ep = self.executed_periods
        if isinstance(ep, bool) or not isinstance(ep, int) or not 1 <= ep <= periods:
            raise InvalidRequest(f"executed_periods ({ep!r}) must be in 1..{periods}")
        object.__setattr__(self, "requests", requests)

    @property
    def microgrids(self) -> tuple[Microgrid, ...]:
        return tuple(r.microgrid for r in self.requests)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.microgrid.id for r in self.requests)

    @property
    def periods(self) -> int:
        return self.requests[0].microgrid.periods

    def to_dict(self) -> dict[str, Any]:
        return {
            "market": self.market.to_dict(),
            "first_period": self.first_period,
            "executed_periods": self.executed_periods,
            "requests": [r.to_dict() for r in self.requests],
        }

    @classmethod
    def from_dict(cls, value: object) -> ClearingRequest:
        if not isinstance(value, Mapping):
            raise InvalidRequest("a clearing request must be a map")
        keys = {"market", "first_period", "executed_periods", "requests"}
        if set(value) != keys:
            raise InvalidRequest(f"clearing request keys must be {sorted(keys)}")
        if not isinstance(value["requests"], list):
            raise InvalidRequest("requests must be a list")
        return cls(
            market=Market.from_dict(value["market"]),
            first_period=value["first_period"],
            requests=tuple(TradeRequest.from_dict(r) for r in value["requests"]),
            executed_periods=value["executed_periods"],
        )

    def to_cbor(self) -> bytes:
        return codec.encode(self.to_dict())

    @classmethod
    def from_cbor(cls, data: bytes) -> ClearingRequest:
        try:
            return cls.from_dict(codec.decode(data))
        except CodecError as exc:
            raise InvalidRequest(f"clearing request is not canonical CBOR: {exc}") from exc

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the canonical CBOR form."""
        return codec.digest(self.to_dict())


@dataclass(frozen=True)
class MicrogridPlan:
    """One microgrid's cooperative schedule over the window (integer series)."""

    id: str
    gas_w: tuple[int, ...]
    charge_w: tuple[int, ...]
    discharge_w: tuple[int, ...]
    grid_w: tuple[int, ...]
    sell_w: tuple[int, ...]
    buy_w: tuple[int, ...]
    soc_wh: tuple[int, ...]

    SERIES = ("gas_w", "charge_w", "discharge_w", "grid_w", "sell_w", "buy_w", "soc_wh")

    def at(self, t: int) -> Dispatch:
        return Dispatch(
            self.gas_w[t],
            self.charge_w[t],
            self.discharge_w[t],
            self.grid_w[t],
            self.sell_w[t],
            self.buy_w[t],
            self.soc_wh[t],
        )

    def to_list(self) -> list[list[int]]:
        return [list(getattr(self, name)) for name in self.SERIES]


class WindowTrade(NamedTuple):
    """Planned bilateral trade in window period ``period`` (absolute hour): seller -> buyer, Wh.

    A named tuple, not a dataclass like the other records: a window of 10,000 microgrids
    holds some 235,000 of them, and a tuple is made in about half the time.
    """

    period: int
    seller: str
    buyer: str
    energy_wh: int


@dataclass(frozen=True)
class Trade:
    """Executed-hour trade: the buyer pays ``amount`` minor units for ``energy_wh`` from the seller.

    ``price_per_kwh`` is the hour's energy price (one price for every trade of
    the hour, between the feed-in tariff and the retail price); ``amount`` is
    ``energy_wh`` at that price (`units.energy_money`). M5 penalties use it.
    """

    seller: str
    buyer: str
    energy_wh: int
    amount: int
    price_per_kwh: int


@dataclass(frozen=True)
class Transfer:
    """Bargaining transfer: money between two coalition members with no energy attached.

    It carries the Nash equalisation (every member gains the same) on top of
    the energy payments; it is never used to price energy or penalties.
    """

    payer: str
    payee: str
    amount: int


@dataclass(frozen=True)
class ExecutedHour:
    """Everything decided for one executed hour (per-microgrid tuples follow ``microgrids``).

    ``standalone``/``standalone_cost``: the disagreement hour (dispatch, cost);
    ``dispatch``/``cost``: what each microgrid runs and its cost before
    payments; ``continuation_cost``: V_i, the cost of running alone for the
    rest of the window from the storage state the executed hour leaves
    (coalition members; 0 otherwise); ``saving``: what the executed hour
    saves the coalition, storage states valued by V; ``investment_credit``:
    in an investment hour (saving < 0 although the window saves), each
    member's equal advance on the later hours' shared savings, credited so the
    hour breaks even (sums to -saving; 0 otherwise); ``window_saving``: what
    the whole window plan saves (the bargain is struck only when > 0);
    ``payments``: stage-2 money (positive = pays, sums to zero) = energy
    payments + bargaining transfers; final cost = cost + payment;
    ``price_per_kwh``: the hour's energy price (0 without trades). Costs are
    money minor units.
    """

    period: int
    coalition: tuple[str, ...]
    standalone: tuple[Dispatch, ...]
    dispatch: tuple[Dispatch, ...]
    standalone_cost: tuple[int, ...]
    cost: tuple[int, ...]
    saving: int
    payments: tuple[int, ...]
    trades: tuple[Trade, ...]
    transfers: tuple[Transfer, ...]
    individually_rational: bool
    continuation_cost: tuple[int, ...] = ()  # () reads as all zeros
    investment_credit: tuple[int, ...] = ()  # () reads as all zeros
    window_saving: int = 0
    price_per_kwh: int = 0

    def __post_init__(self) -> None:
        for name in ("continuation_cost", "investment_credit"):
            if not getattr(self, name):
                object.__setattr__(self, name, (0,) * len(self.payments))

    def final_cost(self, index: int) -> int:
        return self.cost[index] + self.payments[index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "coalition": list(self.coalition),
            "standalone": [d.to_list() for d in self.standalone],
            "dispatch": [d.to_list() for d in self.dispatch],
            "standalone_cost": list(self.standalone_cost),
            "cost": list(self.cost),
            "continuation_cost": list(self.continuation_cost),
            "investment_credit": list(self.investment_credit),
            "saving": self.saving,
            "window_saving": self.window_saving,
            "payments": list(self.payments),
            "price_per_kwh": self.price_per_kwh,
            "trades": [
                [t.seller, t.buyer, t.energy_wh, t.amount, t.price_per_kwh] for t in self.trades
            ],
            "transfers": [[t.payer, t.payee, t.amount] for t in self.transfers],
            "individually_rational": self.individually_rational,
        }


@dataclass(frozen=True)
class ClearingResult:
    """SC1 result: disagreement point, cooperative plan and the executed hour(s), all integers.

    ``standalone_cost``/``cooperative_cost`` are per microgrid over the window
    (C_non_i and C_i, money minor units, before payments), for the microgrids
    that take part (``microgrids``). ``excluded`` lists (id, reason) for every
    requesting microgrid left out of the clearing because it has no feasible
    schedule of its own (it keeps its grid connection and pays nothing here).
    """

    request_digest: bytes
    solver: str
    first_period: int
    periods: int
    microgrids: tuple[str, ...]
    plan: tuple[MicrogridPlan, ...]
    window_trades: tuple[WindowTrade, ...]
    standalone_cost: tuple[int, ...]
    cooperative_cost: tuple[int, ...]
    executed: tuple[ExecutedHour, ...] = field(default_factory=tuple)
    excluded: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_digest": self.request_digest,
            "solver": self.solver,
            "first_period": self.first_period,
            "periods": self.periods,
            "microgrids": list(self.microgrids),
            "plan": [p.to_list() for p in self.plan],
            "window_trades": [list(w) for w in self.window_trades],
            "standalone_cost": list(self.standalone_cost),
            "cooperative_cost": list(self.cooperative_cost),
            "executed": [e.to_dict() for e in self.executed],
            "excluded": [[mg_id, reason] for mg_id, reason in self.excluded],
        }

    def to_cbor(self) -> bytes:
        return codec.encode(self.to_dict())

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the canonical CBOR form (what consensus agents sign)."""
        return codec.digest(self.to_dict())

    @classmethod
    def from_cbor(cls, data: bytes) -> ClearingResult:
        try:
            return cls.from_dict(codec.decode(data))
        except CodecError as exc:
            raise InvalidResult(f"clearing result is not canonical CBOR: {exc}") from exc

    @classmethod
    def from_dict(cls, value: object) -> ClearingResult:
        try:
            return _result_from_dict(value)
        except (InvalidModel, KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidResult(f"malformed clearing result: {exc}") from exc

    def index_of(self, microgrid_id: str) -> int:
        return self.microgrids.index(microgrid_id)


# ---------------------------------------------------------------------------
# decoding


def _ints(value: object, name: str, length: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, list) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in value
    ):
        raise InvalidResult(f"{name} must be a list of integers")
    if length is not None and len(value) != length:
        raise InvalidResult(f"{name} has {len(value)} entries, expected {length}")
    return tuple(value)


def _strs(value: object, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        raise InvalidResult(f"{name} must be a list of strings")
    return tuple(value)


def _keys(value: object, name: str, keys: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or set(value) != keys:
        raise InvalidResult(f"{name} must be a map with keys {sorted(keys)}")
    return value


def _executed_from_dict(value: object, n: int) -> ExecutedHour:
    v = _keys(
        value,
        "executed hour",
        {
            "period",
            "coalition",
            "standalone",
            "dispatch",
            "standalone_cost",
            "cost",
            "continuation_cost",
            "investment_credit",
            "saving",
            "window_saving",
            "payments",
            "price_per_kwh",
            "trades",
            "transfers",
            "individually_rational",
        },
    )
    for name in ("standalone", "dispatch", "trades", "transfers"):
        if not isinstance(v[name], list):
            raise InvalidResult(f"executed.{name} must be a list")
    if len(v["standalone"]) != n or len(v["dispatch"]) != n:
        raise InvalidResult("executed dispatch lists must have one entry per microgrid")
    trades = []
    for t in v["trades"]:
        if (
            not isinstance(t, list)
            or len(t) != 5
            or not all(isinstance(x, str) for x in t[:2])
            or any(isinstance(x, bool) or not isinstance(x, int) for x in t[2:])
        ):
            raise InvalidResult("a trade must be [seller, buyer, energy_wh, amount, price_per_kwh]")
        trades.append(Trade(*t))
    transfers = []
    for t in v["transfers"]:
        if (
            not isinstance(t, list)
            or len(t) != 3
            or not all(isinstance(x, str) for x in t[:2])
            or isinstance(t[2], bool)
            or not isinstance(t[2], int)
        ):
            raise InvalidResult("a transfer must be [payer, payee, amount]")
        transfers.append(Transfer(*t))
    if not isinstance(v["individually_rational"], bool):
        raise InvalidResult("individually_rational must be a boolean")
    period, saving, window_saving = v["period"], v["saving"], v["window_saving"]
    price = v["price_per_kwh"]
    if any(
        isinstance(x, bool) or not isinstance(x, int)
        for x in (period, saving, window_saving, price)
    ):
        raise InvalidResult("period, saving, window_saving and price_per_kwh must be integers")
    return ExecutedHour(
        period=period,
        coalition=_strs(v["coalition"], "coalition"),
        standalone=tuple(Dispatch.from_list(d, "standalone") for d in v["standalone"]),
        dispatch=tuple(Dispatch.from_list(d, "dispatch") for d in v["dispatch"]),
        standalone_cost=_ints(v["standalone_cost"], "executed.standalone_cost", n),
        cost=_ints(v["cost"], "executed.cost", n),
        continuation_cost=_ints(v["continuation_cost"], "executed.continuation_cost", n),
        investment_credit=_ints(v["investment_credit"], "executed.investment_credit", n),
        saving=saving,
        window_saving=window_saving,
        payments=_ints(v["payments"], "executed.payments", n),
        price_per_kwh=price,
        trades=tuple(trades),
        transfers=tuple(transfers),
        individually_rational=v["individually_rational"],
    )


def _result_from_dict(value: object) -> ClearingResult:
    v = _keys(
        value,
        "clearing result",
        {
            "request_digest",
            "solver",
            "first_period",
            "periods",
            "microgrids",
            "plan",
            "window_trades",
            "standalone_cost",
            "cooperative_cost",
            "executed",
            "excluded",
        },
    )
    if not isinstance(v["request_digest"], bytes) or not isinstance(v["solver"], str):
        raise InvalidResult("request_digest must be bytes and solver text")
    ids = _strs(v["microgrids"], "microgrids")
    n = len(ids)
    periods = v["periods"]
    first = v["first_period"]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in (periods, first)):
        raise InvalidResult("periods and first_period must be integers")
    if not isinstance(v["plan"], list) or len(v["plan"]) != n:
        raise InvalidResult("plan must have one entry per microgrid")
    plans = []
    for mg_id, p in zip(ids, v["plan"], strict=True):
        if not isinstance(p, list) or len(p) != len(MicrogridPlan.SERIES):
            raise InvalidResult(f"plan of {mg_id} must have {len(MicrogridPlan.SERIES)} series")
        series = [
            _ints(s, f"plan.{mg_id}.{name}", periods)
            for s, name in zip(p, MicrogridPlan.SERIES, strict=True)
        ]
        plans.append(MicrogridPlan(mg_id, *series))
    window_trades = []
    if not isinstance(v["window_trades"], list):
        raise InvalidResult("window_trades must be a list")
    for w in v["window_trades"]:
        if (
            not isinstance(w, list)
            or len(w) != 4
            or not isinstance(w[1], str)
            or not isinstance(w[2], str)
            or any(isinstance(x, bool) or not isinstance(x, int) for x in (w[0], w[3]))
        ):
            raise InvalidResult("a window trade must be [period, seller, buyer, energy_wh]")
        window_trades.append(WindowTrade(*w))
    if not isinstance(v["executed"], list):
        raise InvalidResult("executed must be a list")
    excluded = v["excluded"]
    if not isinstance(excluded, list) or any(
        not isinstance(e, list) or len(e) != 2 or not all(isinstance(x, str) for x in e)
        for e in excluded
    ):
        raise InvalidResult("excluded must be a list of [microgrid, reason]")
    return ClearingResult(
        request_digest=v["request_digest"],
        solver=v["solver"],
        first_period=first,
        periods=periods,
        microgrids=ids,
        plan=tuple(plans),
        window_trades=tuple(window_trades),
        standalone_cost=_ints(v["standalone_cost"], "standalone_cost", n),
        cooperative_cost=_ints(v["cooperative_cost"], "cooperative_cost", n),
        executed=tuple(_executed_from_dict(e, n) for e in v["executed"]),
        excluded=tuple((e[0], e[1]) for e in excluded),
    )


# ---------------------------------------------------------------------------
# stage 1: solve and round


def clear(request: ClearingRequest, *, solver: str = DEFAULT_SOLVER) -> ClearingResult:
    """Clear one window (SC1): disagreement point, stage 1, rounding, trades, stage 2.

    Pure and deterministic for a given solver build. A microgrid with no
    feasible schedule of its own is left out with the reason (``excluded``);
    the others clear. Raises `InfeasibleWindow` naming the microgrids only if
    the cooperative window of feasible microgrids has no solution (both
    solvers agree), `SolverFailure` if neither solver finds an optimum.
    """
    solved = solve_window(request, solver=solver)
    return assemble(
        request,
        solved.coop_plans,
        standalone_rows=[
            [p.at(h) for p in solved.alone_plans] for h in range(request.executed_periods)
        ],
        standalone_cost=solved.standalone_cost,
        continuation_cost=solved.continuation_cost,
        excluded=solved.excluded,
        solver=solver,
        window=solved.window,
    )


@dataclass(frozen=True)
class SolvedWindow:
    """Solver outputs of one window, rounded: everything `assemble` needs beyond the request."""

    excluded: tuple[tuple[str, str], ...]
    alone_plans: list[MicrogridPlan]
    coop_plans: list[MicrogridPlan]
    standalone_cost: list[int]
    continuation_cost: list[int]
    window: WindowPart | None  # of the cooperative plans; None when nobody takes part


@dataclass(frozen=True)
class WindowPart:
    """What `assemble` derives from the cooperative plans alone: the window's bilateral
    trades and each microgrid's window cost C_i (money minor units)."""

    trades: list[WindowTrade]
    cost: list[int]


def window_part(request: ClearingRequest, plans: Sequence[MicrogridPlan]) -> WindowPart:
    """`WindowPart` of ``plans`` (the cooperative plans of ``request``'s microgrids)."""
    return WindowPart(_window_trades(request.first_period, plans), window_costs(request, plans))


def participants(request: ClearingRequest, excluded: Sequence[tuple[str, str]]) -> ClearingRequest:
    """The request restricted to the microgrids that take part (itself when nobody is left out)."""
    if not excluded:
        return request
    out = {mg_id for mg_id, _ in excluded}
    kept = tuple(r for r in request.requests if r.microgrid.id not in out)
    return ClearingRequest(request.market, request.first_period, kept, request.executed_periods)


def solve_window(request: ClearingRequest, *, solver: str = DEFAULT_SOLVER) -> SolvedWindow:
    """Disagreement plans, cooperative plans, C_non and continuation costs, rounded (`units`)."""
    mgs = request.microgrids
    # The cooperative QP (for everyone, the usual case) starts first; at scale it runs in
    # a helper process while the disagreement problems are solved here.
    coop_qp = qp_mod.build(request.market, mgs, cooperative=True)
    x_coop_later = qp_mod.solve_later(coop_qp, solver)
    alone_qp = qp_mod.build(request.market, mgs, cooperative=False)
    alone_blocks = [qp_mod.own_block(alone_qp, i) for i in range(len(mgs))]
    x_alone, infeasible = qp_mod.solve_standalone(
        alone_qp, request.ids, solver, blocks=alone_blocks
    )
    excluded = tuple(
        (mg_id, f"no feasible schedule of its own for the window ({why})")
        for mg_id, why in sorted(infeasible.items())
    )
    if len(excluded) == len(mgs):
        return SolvedWindow(excluded, [], [], [], [], None)
    if excluded:
        request = participants(request, excluded)
        mgs = request.microgrids
        alone_qp = qp_mod.build(request.market, mgs, cooperative=False)
        alone_blocks = [qp_mod.own_block(alone_qp, i) for i in range(len(mgs))]
        x_alone, _ = qp_mod.solve_standalone(alone_qp, request.ids, solver, blocks=alone_blocks)
        coop_qp = qp_mod.build(request.market, mgs, cooperative=True)
        x_coop_later = qp_mod.solve_later(coop_qp, solver)
    # Rounded here, while the cooperative QP may still be running in the helper.
    alone = _round_plans(alone_qp, x_alone, mgs)
    standalone_cost = window_costs(request, alone)
    try:
        x_coop = x_coop_later()
    except qp_mod.Infeasible as exc:
        raise InfeasibleWindow(", ".join(request.ids), f"cooperative window: {exc}") from None
    # The continuation QPs need only the cooperative storage schedule: the helper starts on
    # them while the rest of the plans and what follows from them are worked out here.
    coop_storage = _round_storage(coop_qp, x_coop, mgs)
    continuation = (
        continuation_costs_later(request, alone_qp, alone_blocks, alone, coop_storage, solver)
        if request.executed_periods == 1
        else lambda: [0] * len(mgs)
    )
    coop = _round_plans(coop_qp, x_coop, mgs, storage=coop_storage)
    window = window_part(request, coop)
    return SolvedWindow(excluded, alone, coop, standalone_cost, continuation(), window)


def continuation_costs_later(
    request: ClearingRequest,
    alone_qp: qp_mod.WindowQP,
    alone_blocks: Sequence[qp_mod.WindowQP],
    alone: Sequence[MicrogridPlan],
    coop_storage: tuple[np.ndarray, np.ndarray, np.ndarray],
    solver: str,
) -> Callable[[], list[int]]:
    """V_i: each microgrid's cost of running alone for periods 1.. of the window, starting from
    the storage energy its cooperative plan leaves after period 0 (money minor units);
    ``coop_storage`` is that plan's `_round_storage`.
    Returns the function that gives them: the QPs it needs start now, and the helper
    process works on them until it is called (`qp.solve_standalone_later`).

    Where that energy equals the disagreement plan's (or there is no storage) V_i is
    the disagreement plan's own cost for those periods; otherwise the microgrid's
    disagreement problem is solved again with its period-0 storage flows held at the
    cooperative plan's. The rest of a one-period window is empty: V_i is the
    end-of-window target cost.
    """
    mgs = request.microgrids
    periods = request.periods
    charge, discharge, soc = (column.tolist() for column in (a[:, 0] for a in coop_storage))
    if periods == 1:
        last = [
            div_round(target_shortfall_e12(mg, energy), COST_SCALE) if mg.storage else 0
            for mg, energy in zip(mgs, soc, strict=True)
        ]
        return lambda: last
    rest = list(alone)
    need = [
        i
        for i, (mg, a, energy) in enumerate(zip(mgs, alone, soc, strict=True))
        if mg.storage is not None and a.soc_wh[0] != energy
    ]
    if not need:
        return lambda: _rest_costs(request, rest)
    pinned = {}
    for i in need:
        # ``alone_blocks[i]`` (cut when the disagreement point was solved) with its
        # period-0 storage flows fixed: same matrices, other bounds.
        block = alone_blocks[i]
        lb, ub = block.lb.copy(), block.ub.copy()
        for name, flow in (("charge", charge), ("discharge", discharge)):
            col = alone_qp.index[name][i, 0] - alone_qp.col_off[i]
            lb[col] = ub[col] = flow[i] * qp_mod.KW
        pinned[i] = replace(block, lb=lb, ub=ub)
    solved_later = qp_mod.solve_standalone_later(
        alone_qp, request.ids, solver, only=need, blocks=pinned
    )

    def finish() -> list[int]:
        x, infeasible = solved_later()
        # A state from which the microgrid cannot go on alone: value it by its own plan.
        solved = [i for i in need if mgs[i].id not in infeasible]
        if solved:
            for i, plan in zip(solved, _round_plans(alone_qp, x, mgs, rows=solved), strict=True):
                rest[i] = plan
        return _rest_costs(request, rest)

    return finish


def _rest_costs(request: ClearingRequest, plans: Sequence[MicrogridPlan]) -> list[int]:
    """Each plan's cost over periods 1.. of the window, money minor units (rounded once)."""
    return [div_round(total, COST_SCALE) for total in _costs_e12(request, plans, first=1)]


def _column(qp: qp_mod.WindowQP, x: np.ndarray, name: str) -> np.ndarray:
    """Solver values of one variable type as an (N, T) array in W/Wh, 0 where absent."""
    idx = qp.index[name]
    out = np.zeros(idx.shape)
    mask = idx >= 0
    out[mask] = x[idx[mask]] * 1000.0
    return out


def _round_storage(
    qp: qp_mod.WindowQP, x: np.ndarray, mgs: Sequence[Microgrid]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer storage flows and energy of ``mgs`` from the solver's ``x``: (charge W,
    discharge W, energy Wh) as (N, T) arrays, the part of `_round_plans` that depends on
    nothing else."""
    chmax = np.array([[m.storage.charge_max_w if m.storage else 0] for m in mgs])
    dismax = np.array([[m.storage.discharge_max_w if m.storage else 0] for m in mgs])
    charge = np.clip(to_ints_cumulative(np.clip(_column(qp, x, "charge"), 0, None)), 0, chmax)
    discharge = np.clip(
        to_ints_cumulative(np.clip(_column(qp, x, "discharge"), 0, None)), 0, dismax
    )
    return storage_rounded(mgs, charge, discharge)


def _round_plans(
    qp: qp_mod.WindowQP,
    x: np.ndarray,
    mgs: Sequence[Microgrid],
    rows: Sequence[int] | None = None,
    storage: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[MicrogridPlan]:
    """Integer plans of ``mgs`` (or of ``mgs[rows]`` only) from the solver's ``x``;
    ``storage``, if given, is `_round_storage` of the same already worked out."""
    if rows is not None:
        pick = np.asarray(rows)
        qp = replace(qp, index={name: idx[pick] for name, idx in qp.index.items()})
        mgs = [mgs[i] for i in rows]
    charge, discharge, soc = _round_storage(qp, x, mgs) if storage is None else storage
    n, t_len = len(mgs), mgs[0].periods
    ren = np.array([m.renewable_w for m in mgs], dtype=np.int64)
    load = np.array([m.load_w for m in mgs], dtype=np.int64)
    green = np.array([m.green_demand_w for m in mgs], dtype=np.int64)

    pmin = np.array([[m.gas.p_min_w if m.gas else 0] for m in mgs], dtype=float)
    pmax = np.array([[m.gas.p_max_w if m.gas else 0] for m in mgs], dtype=float)
    gas = to_int_array(np.clip(_column(qp, x, "gas"), pmin, pmax))

    sell = np.zeros((n, t_len), dtype=np.int64)
    buy = np.zeros((n, t_len), dtype=np.int64)
    if "sell" in qp.index and (qp.index["buy"] >= 0).any():
        cap_sell = np.clip(ren - green, 0, None)
        s_f = np.clip(_column(qp, x, "sell"), 0, cap_sell)
        b_f = np.clip(_column(qp, x, "buy"), 0, None)
        big = np.iinfo(np.int64).max // 4
        cap_buy = np.where(qp.index["buy"] >= 0, big, 0)
        cap_s = np.where(qp.index["sell"] >= 0, cap_sell, 0)
        for t in range(t_len):
            total = int(np.rint((s_f[:, t].sum() + b_f[:, t].sum()) / 2))
            sell[:, t] = to_ints_with_total(s_f[:, t], total, cap_s[:, t])
            buy[:, t] = to_ints_with_total(b_f[:, t], total, cap_buy[:, t])
        both = np.minimum(sell, buy)  # selling and buying at once only pays fees twice
        sell -= both
        buy -= both
    grid = load + charge + sell - ren - gas - discharge - buy
    series = [map(tuple, a.tolist()) for a in (gas, charge, discharge, grid, sell, buy, soc)]
    per_microgrid = zip(*series, strict=True)
    return [MicrogridPlan(mg.id, *row) for mg, row in zip(mgs, per_microgrid, strict=True)]


def storage_rounded(
    mgs: Sequence[Microgrid], charge_w: np.ndarray, discharge_w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`keep_storage_in_bounds` and `soc_series` of every microgrid at once, on (N, T) arrays:
    (charge W, discharge W, storage energy Wh), zeros where a microgrid has no storage.

    The same integers as the per-microgrid functions, period by period across all
    microgrids in int64 where no exact numerator can overflow (checked first from the
    model's bounds); a model too large for that takes the per-microgrid loop.
    """
    charge_w, discharge_w = charge_w.copy(), discharge_w.copy()
    soc = np.zeros(charge_w.shape, dtype=np.int64)
    rows = [i for i, mg in enumerate(mgs) if mg.storage is not None]
    if not rows:
        return charge_w, discharge_w, soc
    stores = [mgs[i].storage for i in rows]
    ppm = np.array([s.efficiency_ppm for s in stores], dtype=np.int64)
    chmax = np.array([s.charge_max_w for s in stores], dtype=np.int64)
    dismax = np.array([s.discharge_max_w for s in stores], dtype=np.int64)
    ch, dis = charge_w[rows], discharge_w[rows]
    # Numerators in units of 1/(PPM ppm / g^2) Wh, g = gcd(PPM, ppm): every term of
    # `Storage.energy_step_exact` divides by g^2, so the ratios and their rounding are the
    # same with smaller integers. A numerator stays within [low, high] after each period's
    # fix, so one period's step (the power limits, or the flows given) beyond the largest
    # bound covers it.
    g = np.gcd(ppm, PPM)
    den = (PPM // g) * (ppm // g)
    ch_unit, dis_unit = (ppm // g) ** 2, (PPM // g) ** 2
    flows = int(max(np.abs(ch).max(), np.abs(dis).max(), chmax.max(), dismax.max()))
    largest = max(max(s.e_max_wh, s.soc_wh) for s in stores)
    if (largest + 2 * flows) * int(dis_unit.max()) >= 2**62:
        for i in rows:
            ch_l, dis_l = charge_w[i].tolist(), discharge_w[i].tolist()
            keep_storage_in_bounds(mgs[i], ch_l, dis_l)
            charge_w[i], discharge_w[i] = ch_l, dis_l
            soc[i] = soc_series(mgs[i], ch_l, dis_l)
        return charge_w, discharge_w, soc
    low = np.array([s.e_min_wh for s in stores], dtype=np.int64) * den
    high = np.array([s.e_max_wh for s in stores], dtype=np.int64) * den
    num = np.array([s.soc_wh for s in stores], dtype=np.int64) * den
    out = np.empty(ch.shape, dtype=np.int64)
    for t in range(ch.shape[1]):
        num += ch_unit * ch[:, t] - dis_unit * dis[:, t]
        below, above = num < low, num > high
        if below.any():
            cut = np.where(below, np.minimum(dis[:, t], -((num - low) // dis_unit)), 0)
            dis[:, t] -= cut
            num += cut * dis_unit
            below &= num < low
            more = np.where(below, np.minimum(chmax - ch[:, t], -((num - low) // ch_unit)), 0)
            ch[:, t] += more
            num += more * ch_unit
        if above.any():
            cut = np.where(above, np.minimum(ch[:, t], -((high - num) // ch_unit)), 0)
            ch[:, t] -= cut
            num -= cut * ch_unit
            above &= num > high
            more = np.where(above, np.minimum(dismax - dis[:, t], -((high - num) // dis_unit)), 0)
            dis[:, t] += more
            num -= more * dis_unit
        # div_round(num, den): half to even
        quotient, remainder = np.divmod(num, den)
        twice = 2 * remainder
        out[:, t] = quotient + ((twice > den) | ((twice == den) & (quotient % 2 == 1)))
    charge_w[rows], discharge_w[rows], soc[rows] = ch, dis, out
    return charge_w, discharge_w, soc


def keep_storage_in_bounds(mg: Microgrid, charge_w: list[int], discharge_w: list[int]) -> None:
    """Adjust rounded storage flows in place so the shared rounding of the energy
    (`soc_series`) stays within [e_min, e_max] in every period.

    Rounding whole-W flows can leave the energy a fraction of a Wh outside its
    bounds (exactly, before rounding); the smallest change that fixes it is made in the
    period where it
    happens (less discharge or more charge below e_min, less charge or more
    discharge above e_max), within the power limits. The grid absorbs it.
    """
    sto = mg.storage
    if sto is None:
        return
    _, den = sto.energy_step_exact(0, 0, 0)
    dis_unit = PPM_SQ  # numerator change of one W of discharge
    ch_unit = sto.efficiency_ppm * sto.efficiency_ppm
    # The exact energy, not only its rounding, stays within bounds: the next window (or the
    # continuation problem) starts from it and must be feasible.
    low = sto.e_min_wh * den
    high = sto.e_max_wh * den
    num = sto.soc_wh * den
    for t in range(len(charge_w)):
        step, _ = sto.energy_step_exact(0, charge_w[t], discharge_w[t])
        num += step
        if num < low:
            cut = min(discharge_w[t], -(-(low - num) // dis_unit))
            discharge_w[t] -= cut
            num += cut * dis_unit
            if num < low:
                more = min(sto.charge_max_w - charge_w[t], -(-(low - num) // ch_unit))
                charge_w[t] += more
                num += more * ch_unit
        elif num > high:
            cut = min(charge_w[t], -(-(num - high) // ch_unit))
            charge_w[t] -= cut
            num -= cut * ch_unit
            if num > high:
                more = min(sto.discharge_max_w - discharge_w[t], -(-(num - high) // dis_unit))
                discharge_w[t] += more
                num -= more * dis_unit


def soc_series(mg: Microgrid, charge_w: Sequence[int], discharge_w: Sequence[int]) -> list[int]:
    """Storage energy (Wh) at the end of each period from integer flows: the shared rounding."""
    if mg.storage is None:
        return [0] * len(charge_w)
    _, den = mg.storage.energy_step_exact(0, 0, 0)
    num = mg.storage.soc_wh * den
    out = []
    for ch, dis in zip(charge_w, discharge_w, strict=True):
        step, _ = mg.storage.energy_step_exact(0, ch, dis)
        num += step
        out.append(div_round(num, den))
    return out


def window_costs(request: ClearingRequest, plans: Sequence[MicrogridPlan]) -> list[int]:
    """Each microgrid's exact window cost of its plan, money minor units (rounded once),
    including the planning cost of ending below its storage target."""
    return [div_round(total, COST_SCALE) for total in _costs_e12(request, plans)]


def _costs_e12(
    request: ClearingRequest, plans: Sequence[MicrogridPlan], first: int = 0
) -> list[int]:
    """Each plan's cost over periods ``first``.. plus its end-of-window target cost, 1e-12
    minor units: the same integers as summing `model.cost_e12` period by period
    (`_window_costs_exact`), with numpy int64 sums where no product can overflow (64-bit
    range checked first) and the green loss is linear; anything else takes the loop.
    """
    mgs = request.microgrids
    if not plans:
        return []
    try:
        flows = np.array(
            [[p.gas_w, p.charge_w, p.discharge_w, p.grid_w, p.sell_w, p.buy_w] for p in plans],
            dtype=np.int64,
        )
    except OverflowError:
        return _window_costs_exact(request, plans, first)
    biggest = max(int(flows.max()), -int(flows.min()))
    scale = biggest + max(max(m.renewable_w) + max(m.green_demand_w) for m in mgs)
    periods = request.periods
    dearest = max(max(m.retail_price_per_kwh) for m in mgs)
    if (
        any(len(m.green_loss.segments) != 1 for m in mgs)
        or scale * scale * periods >= 2**62
        or scale * dearest * periods >= 2**62
    ):
        return _window_costs_exact(request, plans, first)
    flows = flows[:, :, first:]
    gas, charge, discharge, grid, sell, buy = (flows[:, k, :] for k in range(6))
    sq_wear = (charge * charge + discharge * discharge + sell * sell + buy * buy).sum(axis=1)
    sq_gas = (gas * gas).sum(axis=1)
    sum_gas = gas.sum(axis=1)
    lam = np.array([m.retail_price_per_kwh for m in mgs], dtype=np.int64)[:, first:]
    imports = (lam * np.maximum(grid, 0)).sum(axis=1)
    exports = np.minimum(grid, 0).sum(axis=1)
    deficit = np.maximum(
        np.array([m.green_demand_w for m in mgs], dtype=np.int64)[:, first:]
        - np.array([m.renewable_w for m in mgs], dtype=np.int64)[:, first:]
        + sell
        - buy,
        0,
    ).sum(axis=1)
    traded = (sell + buy).sum(axis=1)
    market = request.market
    eps = market.flow_wear_per_mw2h
    fee = 5 * 10**8 * market.wheeling_fee_per_kwh
    e9 = COST_SCALE // 1000
    out = []
    for i, (mg, p) in enumerate(zip(mgs, plans, strict=True)):
        total = eps * int(sq_wear[i]) + fee * int(traded[i])
        lin_e3 = int(imports[i]) + mg.feed_in_tariff_per_kwh * int(exports[i])
        lin_e3 += mg.green_loss.segments[0][1] * int(deficit[i])
        if mg.gas is not None:
            total += (mg.gas.a_per_mw2h + eps) * int(sq_gas[i])
            lin_e3 += mg.gas.b_per_kwh * int(sum_gas[i])
        total += lin_e3 * e9
        if mg.storage is not None:
            total += target_shortfall_e12(mg, p.soc_wh[-1])
        out.append(total)
    return out


def _window_costs_exact(
    request: ClearingRequest, plans: Sequence[MicrogridPlan], first: int = 0
) -> list[int]:
    """`_costs_e12` by the exact per-period loop over `model.cost_e12` (Python integers)."""
    market = request.market
    out = []
    for mg, p in zip(request.microgrids, plans, strict=True):
        total = target_shortfall_e12(mg, p.soc_wh[-1]) if mg.storage is not None else 0
        for t in range(first, mg.periods):
            total += cost_e12(
                mg,
                market,
                t,
                p.gas_w[t],
                p.charge_w[t],
                p.discharge_w[t],
                p.grid_w[t],
                p.sell_w[t],
                p.buy_w[t],
            )
        out.append(total)
    return out


def hour_cost(request: ClearingRequest, index: int, t: int, d: Dispatch) -> int:
    """Microgrid ``index``'s exact cost in window period ``t`` under ``d``, money minor units."""
    mg = request.requests[index].microgrid
    return div_round(period_cost_e12(mg, request.market, t, d), COST_SCALE)


# ---------------------------------------------------------------------------
# bilateral decomposition and stage 2


def north_west_corner(
    sellers: Sequence[tuple[str, int]], buyers: Sequence[tuple[str, int]]
) -> list[tuple[int, int, int]]:
    """Split pool volumes into bilateral cells (seller index, buyer index, Wh).

    Sellers and buyers are given in id order; their totals must be equal. The
    cells are the north-west-corner basis of the transportation problem:
    exactly len(sellers) + len(buyers) - 1 of them, forming a spanning tree
    (zero-volume cells appear where partial sums tie).
    """
    if not sellers or not buyers:
        return []
    rest_s = [w for _, w in sellers]
    rest_b = [w for _, w in buyers]
    if sum(rest_s) != sum(rest_b):
        raise ValueError("pool sales and purchases differ")
    cells = []
    i = j = 0
    while True:
        q = min(rest_s[i], rest_b[j])
        cells.append((i, j, q))
        rest_s[i] -= q
        rest_b[j] -= q
        if i == len(sellers) - 1 and j == len(buyers) - 1:
            break
        if rest_s[i] == 0 and i < len(sellers) - 1:
            i += 1
        else:
            j += 1
    return cells


def _window_trades(first_period: int, plans: Sequence[MicrogridPlan]) -> list[WindowTrade]:
    """Every period's pool split into bilateral trades: the non-empty cells of
    `north_west_corner` over the sellers and buyers in id order, all periods at once.

    A positive north-west-corner cell is the overlap of one seller's and one buyer's
    stretch of the pool when both queue their volumes end to end, so the cells are the
    gaps between the merged running totals, in the same order.
    """
    ids = [p.id for p in plans]
    sell = np.array([p.sell_w for p in plans], dtype=np.int64).reshape(len(plans), -1)
    buy = np.array([p.buy_w for p in plans], dtype=np.int64).reshape(len(plans), -1)
    out = []
    for t in range(sell.shape[1]):
        sellers = np.flatnonzero(sell[:, t] > 0)
        buyers = np.flatnonzero(buy[:, t] > 0)
        if not sellers.size or not buyers.size:
            continue
        sold, bought = np.cumsum(sell[sellers, t]), np.cumsum(buy[buyers, t])
        if sold[-1] != bought[-1]:
            raise ValueError("pool sales and purchases differ")
        ends = np.union1d(sold, bought)
        starts = np.concatenate([[0], ends[:-1]])
        seller = sellers[np.searchsorted(sold, starts, side="right")].tolist()
        buyer = buyers[np.searchsorted(bought, starts, side="right")].tolist()
        out += map(
            WindowTrade,
            repeat(first_period + t),
            map(ids.__getitem__, seller),
            map(ids.__getitem__, buyer),
            (ends - starts).tolist(),
        )
    return out


def equal_shares(saving: int, members: int) -> list[int]:
    """Split ``saving`` (minor units) equally; the first ``saving mod members`` get one more."""
    q, r = divmod(saving, members)
    return [q + 1 if k < r else q for k in range(members)]


def energy_price(
    request: ClearingRequest, t: int, sellers: Sequence[int], buyers: Sequence[int]
) -> int:
    """The hour's energy price (minor units per kWh) for trades among ``sellers``/``buyers``.

    The middle of the band between the highest feed-in tariff among the sellers
    (what a seller would get from the grid) and the lowest retail price among
    the buyers (what a buyer would pay the grid): every seller gets at least its
    feed-in tariff, every buyer pays at most its retail price, and as the
    wheeling fee is split half and half the price is also in the middle of the
    band net of fees. Zero if nobody trades.
    """
    if not sellers or not buyers:
        return 0
    mgs = request.microgrids
    floor = max(mgs[i].feed_in_tariff_per_kwh for i in sellers)
    ceiling = min(mgs[i].retail_price_per_kwh[t] for i in buyers)
    return div_round(floor + ceiling, 2)


def _trades_and_transfers(
    request: ClearingRequest, t: int, dispatch: Sequence[Dispatch], payments: Sequence[int]
) -> tuple[int, list[Trade], list[Transfer]]:
    """Energy trades at the hour's price and the bargaining transfers that make up the
    rest of every microgrid's stage-2 payment (id order, north-west corner both times)."""
    ids = request.ids
    n = len(ids)
    sellers = [i for i in range(n) if dispatch[i].sell_w > 0]
    buyers = [i for i in range(n) if dispatch[i].buy_w > 0]
    price = energy_price(request, t, sellers, buyers)
    trades = []
    energy_paid = [0] * n
    cells = north_west_corner(
        [(ids[i], dispatch[i].sell_w) for i in sellers],
        [(ids[j], dispatch[j].buy_w) for j in buyers],
    )
    for a, b, wh in cells:
        if wh > 0:
            s, j = sellers[a], buyers[b]
            amount = energy_money(wh, price)
            trades.append(Trade(ids[s], ids[j], wh, amount, price))
            energy_paid[j] += amount
            energy_paid[s] -= amount
    rest = [payments[i] - energy_paid[i] for i in range(n)]
    payers = [(ids[i], rest[i]) for i in range(n) if rest[i] > 0]
    payees = [(ids[i], -rest[i]) for i in range(n) if rest[i] < 0]
    transfers = [
        Transfer(payers[a][0], payees[b][0], amount)
        for a, b, amount in north_west_corner(payers, payees)
        if amount > 0
    ]
    return price, trades, transfers


def _executed_hour(
    request: ClearingRequest,
    plans: Sequence[MicrogridPlan],
    h: int,
    alone_rows: Sequence[Dispatch],
    standalone_cost: Sequence[int],
    continuation: Sequence[int],
    window_cost: Sequence[int],
) -> ExecutedHour:
    ids = request.ids
    n = len(ids)
    coop_rows = [p.at(h) for p in plans]
    alone_cost = [hour_cost(request, i, h, alone_rows[i]) for i in range(n)]
    coop_cost = [hour_cost(request, i, h, coop_rows[i]) for i in range(n)]
    continuation_cost = [0] * n
    credit = [0] * n
    if request.executed_periods == 1:
        # Bargain over the window: the coalition is everyone who trades anywhere in the
        # plan; it runs the plan's hour whenever the window as a whole saves money.
        coalition = [i for i, p in enumerate(plans) if any(p.sell_w) or any(p.buy_w)]
        window_saving = sum(standalone_cost[i] - window_cost[i] for i in coalition)
        if window_saving <= 0:
            coalition, window_saving = [], 0
        members = set(coalition)
        dispatch = [coop_rows[i] if i in members else alone_rows[i] for i in range(n)]
        cost = [coop_cost[i] if i in members else alone_cost[i] for i in range(n)]
        # Gain of executing the hour, valued as if the market stopped after it:
        # C_non_i - (C_i(h) + V_i).
        gains = {}
        for i in coalition:
            continuation_cost[i] = continuation[i]
            gains[i] = standalone_cost[i] - cost[i] - continuation[i]
        saving = sum(gains.values())
        if saving < 0:
            # An investment hour: it pays off only through the plan's later hours, whose
            # savings are shared equally. Each member advances an equal share of it
            # (credited against its gain) so that the hour breaks even; over a day every
            # member then gains the same share of the day's saving (the gains telescope).
            for i, c in zip(coalition, equal_shares(-saving, len(coalition)), strict=True):
                credit[i] = c
                gains[i] += c
    else:
        # Several executed hours (day-ahead): everyone follows the plan; each hour's
        # traders split that hour's saving.
        coalition = [i for i in range(n) if coop_rows[i].sell_w or coop_rows[i].buy_w]
        window_saving = sum(standalone_cost[i] - window_cost[i] for i in range(n))
        dispatch, cost = coop_rows, coop_cost
        gains = {i: alone_cost[i] - coop_cost[i] for i in coalition}
    saving = sum(gains.values()) - sum(credit)
    shared = saving + sum(credit)
    payments = [0] * n
    for i, share in zip(coalition, equal_shares(shared, max(len(coalition), 1)), strict=False):
        payments[i] = gains[i] - share
    price, trades, transfers = _trades_and_transfers(request, h, dispatch, payments)
    if request.executed_periods == 1:
        rational = shared >= 0
    else:
        rational = all(cost[i] + payments[i] <= alone_cost[i] for i in range(n))
    return ExecutedHour(
        period=request.first_period + h,
        coalition=tuple(ids[i] for i in coalition),
        standalone=tuple(alone_rows),
        dispatch=tuple(dispatch),
        standalone_cost=tuple(alone_cost),
        cost=tuple(cost),
        continuation_cost=tuple(continuation_cost),
        investment_credit=tuple(credit),
        saving=saving,
        window_saving=window_saving,
        payments=tuple(payments),
        price_per_kwh=price,
        trades=tuple(trades),
        transfers=tuple(transfers),
        individually_rational=rational,
    )


def assemble(
    request: ClearingRequest,
    plans: Sequence[MicrogridPlan],
    *,
    standalone_rows: Sequence[Sequence[Dispatch]],
    standalone_cost: Sequence[int],
    continuation_cost: Sequence[int],
    solver: str,
    excluded: Sequence[tuple[str, str]] = (),
    window: WindowPart | None = None,
) -> ClearingResult:
    """The deterministic part of clearing: window costs, trades and stage 2 from integer inputs.

    ``plans`` are the cooperative schedules of the taking-part microgrids (the
    request without ``excluded``), ``standalone_rows[h]`` their disagreement
    dispatch in executed period h, ``standalone_cost`` the disagreement window
    costs C_non_i, ``continuation_cost`` the V_i of `continuation_costs_later`;
    ``window``, if given, is `window_part` of ``plans`` already worked out (`clear`
    does it while continuation QPs run). Same inputs, same result bytes: `verify` runs
    this on a proposal's own inputs and compares exactly.
    """
    taking_part = participants(request, excluded) if len(excluded) < len(request.ids) else None
    if taking_part is None:
        return ClearingResult(
            request_digest=request.digest,
            solver=solver,
            first_period=request.first_period,
            periods=request.periods,
            microgrids=(),
            plan=(),
            window_trades=(),
            standalone_cost=(),
            cooperative_cost=(),
            executed=(),
            excluded=tuple(excluded),
        )
    if window is None:
        window = window_part(taking_part, plans)
    window_trades, window_cost = window.trades, window.cost
    executed = tuple(
        _executed_hour(
            taking_part,
            plans,
            h,
            standalone_rows[h],
            standalone_cost,
            continuation_cost,
            window_cost,
        )
        for h in range(taking_part.executed_periods)
    )
    return ClearingResult(
        request_digest=request.digest,
        solver=solver,
        first_period=request.first_period,
        periods=request.periods,
        microgrids=taking_part.ids,
        plan=tuple(plans),
        window_trades=tuple(window_trades),
        standalone_cost=tuple(standalone_cost),
        cooperative_cost=tuple(window_cost),
        executed=executed,
        excluded=tuple(excluded),
    )
