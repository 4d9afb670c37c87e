"""SC2 settlement of an executed hour from metered values (M5, M6): a ledger of integer money.

API: ``settle(request, result, metered, period=None) -> Settlement``, pure and
deterministic. ``metered`` has one `MeteredHour` per microgrid of the request
(integer Wh for the hour). The result must be the committed `ClearingResult`
of ``request``; ``period`` picks the executed hour (default: the first).

Metered values are checked first: a value no installation of the microgrid
could produce in one hour (`check_physical`) is refused with the reason.
Microgrids left out of the clearing (``result.excluded``) are settled for
their deposit and grid exchange only.

Rules, in the order the ledger lists them:

1. Deposits (SC1): every requesting microgrid's deposit moves to the reserve
   (each settled hour holds and refunds its clearing's deposits, so a
   day-ahead clearing settled hour by hour does so 24 times).
2. Deliveries (M5): a seller's actual green generation serves its own green
   demand first; what is left goes to its buyers, pro rata to the cleared
   volumes (integer Wh, largest remainder, ties to the earlier trade); the rest
   is exported (step 6).
3. Energy: a buyer pays the cleared amount only for delivered energy
   (amount * delivered / cleared, rounded half to even).
4. Shortfall: for each kWh short the seller pays the buyer c_j + max(0,
   lambda_t - pi_ij): the buyer's green loss coefficient plus what it pays
   the grid above the cleared price for the replacement energy.
5. Wheeling (M4): phi/2 per delivered kWh from each side to the grid company;
   bargaining transfers (`clearing.Transfer`, the Nash equalisation on top of
   the energy price) are paid as cleared ("bargaining-transfer").
6. Grid: the microgrid's exchange with the grid company is its metered net
   import minus its net inter-microgrid position (received - delivered):
   bought at its retail price lambda_t, or sold at the feed-in tariff gamma.
7. Deposit refund: the reserve returns every deposit except that of a seller
   that delivered less than ``market.deposit_forfeit_below_pct`` % of its
   cleared sales (a fake or reckless offer); a forfeited deposit stays in the
   reserve.

Every ledger entry moves a positive amount from a payer to a payee, so money
is conserved by construction: the balances of microgrids, grid company
(``GRID_COMPANY``) and reserve (``RESERVE``) add up to exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from meterchain import codec
from meterchain.market.clearing import ClearingRequest, ClearingResult, ExecutedHour
from meterchain.market.errors import SettlementError
from meterchain.market.model import GRID_COMPANY, MAX_POWER_W, RESERVE, Microgrid
from meterchain.market.units import WH_PER_KWH, div_round, energy_money, pro_rata, split_pro_rata


@dataclass(frozen=True)
class MeteredHour:
    """Metered energy of one microgrid in one hour (Wh, from signed readings).

    ``grid_import_wh``/``grid_export_wh`` are measured at the point of common
    coupling and include energy wheeled to or from other microgrids.
    """

    microgrid: str
    green_generation_wh: int
    green_demand_wh: int
    load_wh: int
    grid_import_wh: int
    grid_export_wh: int

    FIELDS = (
        "green_generation_wh",
        "green_demand_wh",
        "load_wh",
        "grid_import_wh",
        "grid_export_wh",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.microgrid, str) or not self.microgrid:
            raise SettlementError("metered microgrid id must be non-empty text")
        for name in self.FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SettlementError(
                    f"microgrid {self.microgrid}: metered {name} ({value!r}) "
                    "must be an integer >= 0"
                )
        if self.green_demand_wh > self.load_wh:
            raise SettlementError(
                f"microgrid {self.microgrid}: metered green_demand_wh ({self.green_demand_wh}) "
                f"> load_wh ({self.load_wh})"
            )

    def to_list(self) -> list[int | str]:
        return [self.microgrid, *(getattr(self, name) for name in self.FIELDS)]


@dataclass(frozen=True)
class Delivery:
    """Energy of one cleared trade: cleared, delivered and short (Wh)."""

    seller: str
    buyer: str
    cleared_wh: int
    delivered_wh: int

    @property
    def short_wh(self) -> int:
        return self.cleared_wh - self.delivered_wh


@dataclass(frozen=True)
class LedgerEntry:
    """``amount`` (> 0 money minor units) moves from ``payer`` to ``payee`` for ``reason``."""

    payer: str
    payee: str
    amount: int
    reason: str


@dataclass(frozen=True)
class Settlement:
    """SC2 output for one executed hour."""

    period: int
    clearing_digest: bytes
    deliveries: tuple[Delivery, ...]
    entries: tuple[LedgerEntry, ...]
    forfeited: tuple[str, ...]

    def balances(self) -> dict[str, int]:
        """Net money in (+) or out (-) per party; sums to zero."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.payer] = out.get(e.payer, 0) - e.amount
            out[e.payee] = out.get(e.payee, 0) + e.amount
        return out

    def total(self, reason: str) -> int:
        """Sum of all entries with ``reason`` (money minor units)."""
        return sum(e.amount for e in self.entries if e.reason == reason)

    @property
    def penalty_total(self) -> int:
        """Deviation penalties paid by sellers for energy short (M5), minor units."""
        return self.total("shortfall")

    @property
    def short_wh(self) -> int:
        return sum(d.short_wh for d in self.deliveries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "clearing_digest": self.clearing_digest,
            "deliveries": [
                [d.seller, d.buyer, d.cleared_wh, d.delivered_wh] for d in self.deliveries
            ],
            "entries": [[e.payer, e.payee, e.amount, e.reason] for e in self.entries],
            "forfeited": list(self.forfeited),
        }

    @cached_property
    def digest(self) -> bytes:
        return codec.digest(self.to_dict())


def _executed(result: ClearingResult, period: int | None) -> tuple[int, ExecutedHour]:
    if not result.executed:
        raise SettlementError("clearing result has no executed hour")
    if period is None:
        return 0, result.executed[0]
    for k, hour in enumerate(result.executed):
        if hour.period == period:
            return k, hour
    raise SettlementError(f"hour {period} was not executed by this clearing")


def settle(
    request: ClearingRequest,
    result: ClearingResult,
    metered: Sequence[MeteredHour],
    *,
    period: int | None = None,
) -> Settlement:
    """Settle one executed hour of ``result`` against ``metered`` values (see module doc)."""
    if result.request_digest != request.digest:
        raise SettlementError("clearing result does not belong to this request")
    left_out = [mg_id for mg_id, _ in result.excluded]
    if sorted((*result.microgrids, *left_out)) != list(request.ids) or set(result.microgrids) & set(
        left_out
    ):
        raise SettlementError("clearing result lists other microgrids than the request")
    if result.microgrids:
        _, hour = _executed(result, period)
        hour_period, trades, transfers = hour.period, hour.trades, hour.transfers
    else:  # nobody could take part: only the grid and the deposits are settled
        hour_period = request.first_period if period is None else period
        trades, transfers = (), ()
    by_id: dict[str, MeteredHour] = {}
    for m in metered:
        if not isinstance(m, MeteredHour):
            raise SettlementError("metered values must be MeteredHour records")
        if m.microgrid in by_id:
            raise SettlementError(f"microgrid {m.microgrid}: metered twice")
        by_id[m.microgrid] = m
    missing = [mg_id for mg_id in request.ids if mg_id not in by_id]
    if missing:
        raise SettlementError(f"microgrid {missing[0]}: no metered values for hour {hour_period}")
    extra = sorted(set(by_id) - set(request.ids))
    if extra:
        raise SettlementError(f"microgrid {extra[0]}: metered but not in the clearing")

    market = request.market
    models = {r.microgrid.id: r.microgrid for r in request.requests}
    deposits = {r.microgrid.id: r.deposit for r in request.requests}
    t = hour_period - request.first_period
    if not 0 <= t < request.periods:
        raise SettlementError(f"hour {hour_period} is outside the clearing window")
    for mg_id in request.ids:
        check_physical(by_id[mg_id], models[mg_id])
    entries: list[LedgerEntry] = []

    def pay(payer: str, payee: str, amount: int, reason: str) -> None:
        if amount < 0:
            payer, payee, amount = payee, payer, -amount
        if amount:
            entries.append(LedgerEntry(payer, payee, amount, reason))

    for mg_id in request.ids:
        pay(mg_id, RESERVE, deposits[mg_id], "deposit")

    # Deliveries: green generation after own green demand, pro rata over the seller's trades.
    delivered = [0] * len(trades)
    by_seller: dict[str, list[int]] = {}
    for k, trade in enumerate(trades):
        by_seller.setdefault(trade.seller, []).append(k)
    for seller, ks in by_seller.items():
        m = by_id[seller]
        available = max(0, m.green_generation_wh - m.green_demand_wh)
        cleared = [trades[k].energy_wh for k in ks]
        parts = split_pro_rata(min(available, sum(cleared)), cleared)
        for k, part in zip(ks, parts, strict=True):
            delivered[k] = part

    received_wh = dict.fromkeys(request.ids, 0)
    delivered_wh = dict.fromkeys(request.ids, 0)
    deliveries = []
    for trade, done in zip(trades, delivered, strict=True):
        deliveries.append(Delivery(trade.seller, trade.buyer, trade.energy_wh, done))
        received_wh[trade.buyer] += done
        delivered_wh[trade.seller] += done
        pay(trade.buyer, trade.seller, pro_rata(trade.amount, done, trade.energy_wh), "energy")
        short = trade.energy_wh - done
        if short:
            buyer = models[trade.buyer]
            rate = buyer.green_loss.coefficient_per_kwh + max(
                0, buyer.retail_price_per_kwh[t] - trade.price_per_kwh
            )
            pay(trade.seller, trade.buyer, energy_money(short, rate), "shortfall")
        fee_side = div_round(done * market.wheeling_fee_per_kwh, 2 * WH_PER_KWH)
        pay(trade.seller, GRID_COMPANY, fee_side, "wheeling")
        pay(trade.buyer, GRID_COMPANY, fee_side, "wheeling")
    for transfer in transfers:
        pay(transfer.payer, transfer.payee, transfer.amount, "bargaining-transfer")

    for mg_id in request.ids:
        m = by_id[mg_id]
        net_import = m.grid_import_wh - m.grid_export_wh
        grid_wh = net_import - (received_wh[mg_id] - delivered_wh[mg_id])
        model = models[mg_id]
        if grid_wh > 0:
            pay(mg_id, GRID_COMPANY, energy_money(grid_wh, model.retail_price_per_kwh[t]), "retail")
        elif grid_wh < 0:
            pay(
                GRID_COMPANY, mg_id, energy_money(-grid_wh, model.feed_in_tariff_per_kwh), "feed-in"
            )

    forfeited = []
    cleared_sales: dict[str, int] = {}
    for trade in trades:
        cleared_sales[trade.seller] = cleared_sales.get(trade.seller, 0) + trade.energy_wh
    for mg_id in request.ids:
        sold = cleared_sales.get(mg_id, 0)
        if sold and delivered_wh[mg_id] * 100 < sold * market.deposit_forfeit_below_pct:
            if deposits[mg_id]:
                forfeited.append(mg_id)
            continue
        pay(RESERVE, mg_id, deposits[mg_id], "deposit-refund")

    return Settlement(
        period=hour_period,
        clearing_digest=result.digest,
        deliveries=tuple(deliveries),
        entries=tuple(entries),
        forfeited=tuple(forfeited),
    )


METER_SLACK = 10
"""How far above its model a metered value may go before it is refused as physically impossible."""


def check_physical(metered: MeteredHour, model: Microgrid) -> None:
    """Refuse metered values no installation of this microgrid can produce in one hour.

    Each value is compared with the microgrid's size in its own model (its
    largest load, renewable output, gas turbine, storage power and grid import
    limit over the window): more than ``METER_SLACK`` times that size plus
    1 MWh, or more than 10 GWh, is a meter or unit fault, not energy.
    Deviations from the forecast are normal and stay far below this.
    """
    size = max(model.load_w) + max(model.renewable_w)
    if model.gas is not None:
        size += model.gas.p_max_w
    if model.storage is not None:
        size += max(model.storage.charge_max_w, model.storage.discharge_max_w)
    if model.grid_import_limit_w is not None:
        size += model.grid_import_limit_w
    limit = min(METER_SLACK * size + 1_000_000, MAX_POWER_W)
    for name in MeteredHour.FIELDS:
        value = getattr(metered, name)
        if value > limit:
            raise SettlementError(
                f"microgrid {metered.microgrid}: metered {name} ({value} Wh) is physically "
                f"impossible in one hour (limit {limit} Wh from its model)"
            )


def metered_from_dispatch(
    microgrid: str,
    dispatch_gas_w: int,
    dispatch_charge_w: int,
    dispatch_discharge_w: int,
    green_generation_wh: int,
    green_demand_wh: int,
    load_wh: int,
) -> MeteredHour:
    """Meter readings of an hour in which gas and storage followed the dispatch and the grid
    absorbed every deviation (the simulation used by the rolling driver and the demo)."""
    net = load_wh + dispatch_charge_w - green_generation_wh - dispatch_gas_w - dispatch_discharge_w
    return MeteredHour(
        microgrid=microgrid,
        green_generation_wh=green_generation_wh,
        green_demand_wh=green_demand_wh,
        load_wh=load_wh,
        grid_import_wh=max(0, net),
        grid_export_wh=max(0, -net),
    )


def parties_sum(settlement: Settlement) -> int:
    """Sum of all parties' balances: zero for every settlement (money is conserved)."""
    return sum(settlement.balances().values())


__all__ = [
    "Delivery",
    "LedgerEntry",
    "MeteredHour",
    "Settlement",
    "check_physical",
    "metered_from_dispatch",
    "parties_sum",
    "settle",
]
