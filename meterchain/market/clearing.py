"""SC1 clearing: disagreement point, social-cost schedule and Nash-bargaining payments (M2-M4).

API (pure and deterministic; the consensus agents call these):

* ``ClearingRequest(market, first_period, requests, executed_periods=1)`` -- the
  SC1 input: every microgrid's `TradeRequest` (model for the window + deposit).
  ``to_cbor``/``from_cbor``/``digest`` give its canonical bytes.
* ``clear(request, solver="piqp") -> ClearingResult`` -- the contract result.
* ``ClearingResult`` -- frozen, integers only; ``to_dict``/``to_cbor``/
  ``from_cbor`` and ``digest`` (SHA-256 of the canonical CBOR via
  `meterchain.codec`). ``executed[0]`` holds what happens in the executed hour:
  dispatch, trades with amounts and prices, payments, transfers.
* ``assemble(...)`` -- the deterministic second half of `clear` (everything
  derived from the rounded schedules); `verify` re-runs it on a proposal.

How a window is cleared:

1. Disagreement point (M3): each microgrid alone, no inter-microgrid trade --
   its own QP block; C_non_i is its window cost, C_non_i(h) its cost in hour h.
2. Stage 1 (M3): one convex QP over all microgrids and periods minimising the
   total cost, with inter-microgrid trade as a pool (each microgrid sells
   s_i,t >= 0 green power into it or buys b_i,t >= 0, sum s = sum b, phi/2 per
   kWh on each side): size grows linearly with the number of microgrids.
3. Rounding (`units`): schedules become integer W/Wh; pool totals stay equal
   (largest remainder), a microgrid never both sells and buys (netted), the
   grid exchange absorbs what rounding leaves so every balance is exact, and
   storage energy follows the rounded flows exactly (`Storage.energy_step_exact`).
4. Bilateral trades: in each period the pool is split into trades P_ij,t by the
   north-west-corner rule. It is deterministic, gives at most (#sellers +
   #buyers - 1) trades, and its cells (including zero-volume cells when partial
   sums tie) form a spanning tree of the traders. A trade is stored once
   (seller, buyer, Wh), so P_ij = -P_ji. In the executed hour sellers are
   ordered by the price per kWh their payment amounts to and buyers likewise
   (ties by id), which pairs cheap with cheap and keeps trade prices close to
   each side's average; planned trades of later periods use id order.
5. Stage 2 (M3) for the executed hour h: the coalition is the microgrids that
   trade in h. The savings S = sum over the coalition of C_non_i(h) - C_i(h)
   are split equally: with transfers summing to zero, max sum ln(C_non_i - C_i
   - p_i) has the closed form C_non_i - C_i - p_i = S/N, so payment
   p_i = C_non_i(h) - C_i(h) - S/N (positive = pays). S/N is split in integers,
   the remainder one minor unit each to the first microgrids by id.
   If S <= 0 nobody trades in h: every microgrid runs its disagreement hour.
   Microgrids outside the coalition run their disagreement hour and pay
   nothing (a microgrid that gains nothing is not forced to trade), so nobody
   is worse off than alone: ``individually_rational`` is checked and reported.
6. Prices: the money on each trade is the unique flow on the trade tree that
   makes every trader's receipts equal its payment; the trade's price is that
   amount per kWh (rounded; the amount is authoritative). A zero-volume tree
   cell that carries money becomes a `Transfer`. Because every member's cost
   falls by the same amount, a member that gains little by itself is paid by
   those that gain much: a buyer with a small own gain can receive money, so
   a trade price can be below the feed-in tariff or even negative.

Costs (C_i, C_non_i) are exact integers computed from the rounded schedules
(`model.period_cost_e12`) and include the small flow wear term of `Market`, so
a microgrid's settled money differs from its bargained cost by that term.

``executed_periods`` > 1 executes several leading periods of one clearing (the
day-ahead comparison of M5): every microgrid then follows the cooperative plan
in each of those hours (switching single microgrids to their disagreement hour
would break storage continuity), each hour's coalition splits its own savings,
and individual rationality is reported, not enforced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

import numpy as np

from meterchain import codec
from meterchain.errors import CodecError
from meterchain.market import qp as qp_mod
from meterchain.market.errors import InvalidModel, InvalidRequest, InvalidResult
from meterchain.market.model import (
    Dispatch,
    Market,
    Microgrid,
    TradeRequest,
    cost_e12,
    period_cost_e12,
)
from meterchain.market.units import (
    COST_SCALE,
    div_round,
    price_per_kwh,
    to_int_array,
    to_ints_cumulative,
    to_ints_with_total,
)

DEFAULT_SOLVER = "piqp"


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


@dataclass(frozen=True)
class WindowTrade:
    """Planned bilateral trade in window period ``period`` (absolute hour): seller -> buyer, Wh."""

    period: int
    seller: str
    buyer: str
    energy_wh: int


@dataclass(frozen=True)
class Trade:
    """Executed-hour trade: the buyer pays ``amount`` minor units for ``energy_wh`` from the seller.

    ``price_per_kwh`` is amount per kWh rounded (display and M5 penalties);
    ``amount`` is authoritative. It can be negative if the bargain makes a
    seller pay (rare: a seller whose own costs fall by trading).
    """

    seller: str
    buyer: str
    energy_wh: int
    amount: int
    price_per_kwh: int


@dataclass(frozen=True)
class Transfer:
    """Money between two traders with no energy (a zero-volume cell of the trade tree)."""

    payer: str
    payee: str
    amount: int


@dataclass(frozen=True)
class ExecutedHour:
    """Everything decided for one executed hour (per-microgrid tuples follow ``microgrids``).

    ``standalone``/``standalone_cost``: the disagreement hour (dispatch, cost);
    ``dispatch``/``cost``: what each microgrid runs and its cost before
    payments; ``payments``: stage-2 money (positive = pays, sums to zero);
    final cost = cost + payment. Costs are money minor units.
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
            "saving": self.saving,
            "payments": list(self.payments),
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
    (C_non_i and C_i, money minor units, before payments).
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_digest": self.request_digest,
            "solver": self.solver,
            "first_period": self.first_period,
            "periods": self.periods,
            "microgrids": list(self.microgrids),
            "plan": [p.to_list() for p in self.plan],
            "window_trades": [
                [w.period, w.seller, w.buyer, w.energy_wh] for w in self.window_trades
            ],
            "standalone_cost": list(self.standalone_cost),
            "cooperative_cost": list(self.cooperative_cost),
            "executed": [e.to_dict() for e in self.executed],
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
            "saving",
            "payments",
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
    period, saving = v["period"], v["saving"]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in (period, saving)):
        raise InvalidResult("period and saving must be integers")
    return ExecutedHour(
        period=period,
        coalition=_strs(v["coalition"], "coalition"),
        standalone=tuple(Dispatch.from_list(d, "standalone") for d in v["standalone"]),
        dispatch=tuple(Dispatch.from_list(d, "dispatch") for d in v["dispatch"]),
        standalone_cost=_ints(v["standalone_cost"], "executed.standalone_cost", n),
        cost=_ints(v["cost"], "executed.cost", n),
        saving=saving,
        payments=_ints(v["payments"], "executed.payments", n),
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
    )


# ---------------------------------------------------------------------------
# stage 1: solve and round


def clear(request: ClearingRequest, *, solver: str = DEFAULT_SOLVER) -> ClearingResult:
    """Clear one window (SC1): disagreement point, stage 1, rounding, trades, stage 2.

    Pure and deterministic for a given solver build. Raises `InfeasibleWindow`
    naming a microgrid whose own model has no feasible schedule, `SolverFailure`
    if the solver gives up.
    """
    alone_plans, coop_plans = solve_plans(request, solver=solver)
    return assemble(
        request,
        coop_plans,
        standalone_rows=[[p.at(h) for p in alone_plans] for h in range(request.executed_periods)],
        standalone_cost=window_costs(request, alone_plans),
        solver=solver,
    )


def solve_plans(
    request: ClearingRequest, *, solver: str = DEFAULT_SOLVER
) -> tuple[list[MicrogridPlan], list[MicrogridPlan]]:
    """(disagreement plans, cooperative plans), rounded to integers by `units`."""
    mgs = request.microgrids
    alone_qp = qp_mod.build(request.market, mgs, cooperative=False)
    x_alone = qp_mod.solve_standalone(alone_qp, request.ids, solver)
    coop_qp = qp_mod.build(request.market, mgs, cooperative=True)
    x_coop = qp_mod.solve(coop_qp, solver)
    return _round_plans(alone_qp, x_alone, mgs), _round_plans(coop_qp, x_coop, mgs)


def _column(qp: qp_mod.WindowQP, x: np.ndarray, name: str) -> np.ndarray:
    """Solver values of one variable type as an (N, T) array in W/Wh, 0 where absent."""
    idx = qp.index[name]
    out = np.zeros(idx.shape)
    mask = idx >= 0
    out[mask] = x[idx[mask]] * 1000.0
    return out


def _round_plans(
    qp: qp_mod.WindowQP, x: np.ndarray, mgs: Sequence[Microgrid]
) -> list[MicrogridPlan]:
    n, t_len = len(mgs), mgs[0].periods
    ren = np.array([m.renewable_w for m in mgs], dtype=np.int64)
    load = np.array([m.load_w for m in mgs], dtype=np.int64)
    green = np.array([m.green_demand_w for m in mgs], dtype=np.int64)

    pmin = np.array([[m.gas.p_min_w if m.gas else 0] for m in mgs], dtype=float)
    pmax = np.array([[m.gas.p_max_w if m.gas else 0] for m in mgs], dtype=float)
    gas = to_int_array(np.clip(_column(qp, x, "gas"), pmin, pmax))
    chmax = np.array([[m.storage.charge_max_w if m.storage else 0] for m in mgs])
    dismax = np.array([[m.storage.discharge_max_w if m.storage else 0] for m in mgs])
    charge = np.clip(to_ints_cumulative(np.clip(_column(qp, x, "charge"), 0, None)), 0, chmax)
    discharge = np.clip(
        to_ints_cumulative(np.clip(_column(qp, x, "discharge"), 0, None)), 0, dismax
    )

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
            sell[:, t] = to_ints_with_total(s_f[:, t].tolist(), total, cap_s[:, t].tolist())
            buy[:, t] = to_ints_with_total(b_f[:, t].tolist(), total, cap_buy[:, t].tolist())
        both = np.minimum(sell, buy)  # selling and buying at once only pays fees twice
        sell -= both
        buy -= both
    grid = load + charge + sell - ren - gas - discharge - buy

    plans = []
    gas_l, ch_l, dis_l = gas.tolist(), charge.tolist(), discharge.tolist()
    grid_l, sell_l, buy_l = grid.tolist(), sell.tolist(), buy.tolist()
    for i, mg in enumerate(mgs):
        soc = soc_series(mg, ch_l[i], dis_l[i])
        plans.append(
            MicrogridPlan(
                mg.id,
                tuple(gas_l[i]),
                tuple(ch_l[i]),
                tuple(dis_l[i]),
                tuple(grid_l[i]),
                tuple(sell_l[i]),
                tuple(buy_l[i]),
                tuple(soc),
            )
        )
    return plans


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
    """Each microgrid's exact window cost of its plan, money minor units (rounded once)."""
    market = request.market
    out = []
    for mg, p in zip(request.microgrids, plans, strict=True):
        total = 0
        for t in range(mg.periods):
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
        out.append(div_round(total, COST_SCALE))
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


def tree_money(
    cells: Sequence[tuple[int, int, int]], seller_need: Sequence[int], buyer_need: Sequence[int]
) -> list[int]:
    """Money on each cell (buyer -> seller) so sellers receive ``seller_need`` and buyers pay
    ``buyer_need``: the unique flow on the spanning tree, found by peeling leaves."""
    n_s, n_b = len(seller_need), len(buyer_need)
    need = list(seller_need) + list(buyer_need)
    edges: list[list[int]] = [[] for _ in range(n_s + n_b)]
    for e, (i, j, _) in enumerate(cells):
        edges[i].append(e)
        edges[n_s + j].append(e)
    money = [0] * len(cells)
    done = [False] * len(cells)
    degree = [len(es) for es in edges]
    stack = [v for v in range(n_s + n_b) if degree[v] == 1]
    while stack:
        v = stack.pop()
        if degree[v] != 1:
            continue
        e = next(e for e in edges[v] if not done[e])
        i, j, _ = cells[e]
        u = n_s + j if v == i else i
        money[e] = need[v]
        need[v] = 0
        need[u] -= money[e]
        done[e] = True
        degree[v] -= 1
        degree[u] -= 1
        if degree[u] == 1:
            stack.append(u)
    if not all(done) or any(need):
        raise ValueError("payments do not balance on the trade tree")
    return money


def equal_shares(saving: int, members: int) -> list[int]:
    """Split ``saving`` (minor units) equally; the first ``saving mod members`` get one more."""
    q, r = divmod(saving, members)
    return [q + 1 if k < r else q for k in range(members)]


def _executed_hour(
    request: ClearingRequest,
    plans: Sequence[MicrogridPlan],
    h: int,
    alone_rows: Sequence[Dispatch],
) -> ExecutedHour:
    ids = request.ids
    n = len(ids)
    single = request.executed_periods == 1
    coop_rows = [p.at(h) for p in plans]
    alone_cost = [hour_cost(request, i, h, alone_rows[i]) for i in range(n)]
    coop_cost = [hour_cost(request, i, h, coop_rows[i]) for i in range(n)]
    traders = [i for i in range(n) if coop_rows[i].sell_w or coop_rows[i].buy_w]
    saving = sum(alone_cost[i] - coop_cost[i] for i in traders)
    if single and (saving <= 0 or not traders):
        coalition: list[int] = []
        saving = 0
        dispatch = list(alone_rows)
        cost = list(alone_cost)
    elif single:
        coalition = traders
        members = set(traders)
        dispatch = [coop_rows[i] if i in members else alone_rows[i] for i in range(n)]
        cost = [coop_cost[i] if i in members else alone_cost[i] for i in range(n)]
    else:
        coalition = traders
        dispatch = coop_rows
        cost = coop_cost
    payments = [0] * n
    if coalition:
        for i, share in zip(coalition, equal_shares(saving, len(coalition)), strict=True):
            payments[i] = alone_cost[i] - cost[i] - share
    # Sellers by the price they receive, buyers by the price they pay (then id): the
    # north-west corner then pairs like with like, so each trade's price stays close to
    # both sides' average prices.
    index = {mg_id: k for k, mg_id in enumerate(ids)}
    sellers = sorted(
        ((ids[i], dispatch[i].sell_w) for i in range(n) if dispatch[i].sell_w > 0),
        key=lambda s: (Fraction(-payments[index[s[0]]], s[1]), s[0]),
    )
    buyers = sorted(
        ((ids[i], dispatch[i].buy_w) for i in range(n) if dispatch[i].buy_w > 0),
        key=lambda b: (Fraction(payments[index[b[0]]], b[1]), b[0]),
    )
    cells = north_west_corner(sellers, buyers)
    money = tree_money(
        cells,
        [-payments[index[s]] for s, _ in sellers],
        [payments[index[b]] for b, _ in buyers],
    )
    trades = []
    transfers = []
    for (i, j, wh), amount in zip(cells, money, strict=True):
        seller, buyer = sellers[i][0], buyers[j][0]
        if wh > 0:
            trades.append(Trade(seller, buyer, wh, amount, price_per_kwh(amount, wh)))
        elif amount > 0:
            transfers.append(Transfer(buyer, seller, amount))
        elif amount < 0:
            transfers.append(Transfer(seller, buyer, -amount))
    rational = all(cost[i] + payments[i] <= alone_cost[i] for i in range(n))
    return ExecutedHour(
        period=request.first_period + h,
        coalition=tuple(ids[i] for i in coalition),
        standalone=tuple(alone_rows),
        dispatch=tuple(dispatch),
        standalone_cost=tuple(alone_cost),
        cost=tuple(cost),
        saving=saving,
        payments=tuple(payments),
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
    solver: str,
) -> ClearingResult:
    """The deterministic part of clearing: window costs, trades and stage 2 from integer inputs.

    ``plans`` are the cooperative schedules, ``standalone_rows[h]`` the
    disagreement dispatch of every microgrid in executed period h,
    ``standalone_cost`` the disagreement window costs. Same inputs, same result
    bytes: `verify` runs this on a proposal's own inputs and compares exactly.
    """
    ids = request.ids
    window_trades = []
    for t in range(request.periods):
        sellers = [(p.id, p.sell_w[t]) for p in plans if p.sell_w[t] > 0]
        buyers = [(p.id, p.buy_w[t]) for p in plans if p.buy_w[t] > 0]
        for i, j, wh in north_west_corner(sellers, buyers):
            if wh > 0:
                window_trades.append(
                    WindowTrade(request.first_period + t, sellers[i][0], buyers[j][0], wh)
                )
    executed = tuple(
        _executed_hour(request, plans, h, standalone_rows[h])
        for h in range(request.executed_periods)
    )
    return ClearingResult(
        request_digest=request.digest,
        solver=solver,
        first_period=request.first_period,
        periods=request.periods,
        microgrids=ids,
        plan=tuple(plans),
        window_trades=tuple(window_trades),
        standalone_cost=tuple(standalone_cost),
        cooperative_cost=tuple(window_costs(request, plans)),
        executed=executed,
    )
