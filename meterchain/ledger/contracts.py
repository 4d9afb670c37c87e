"""The contract client's rule (M26, M17): what a due trade order pays and who forfeits.

Pure and deterministic: the aggregator uses `due_actions` to fire contracts and
`ledger verify` re-computes `order_outcome` for every recorded firing. An order
is due once its delivery hour has been settled, at the start of hour delivery+2.
The buyer prepaid the whole order (escrow); it pays the agreed price for the
energy actually delivered and gets the rest back. Delivered energy is the
order's share (pro rata to contracted energy, M5) of the seller's metered export
and of the buyer's metered import in the delivery hour. A party that delivered
or took less than contracted defaults and forfeits its deposit in proportion
to the shortfall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meterchain.ledger.readings import HOUR
from meterchain.ledger.transactions import Tx

if TYPE_CHECKING:
    from meterchain.ledger.state import LedgerState, Order


@dataclass(frozen=True)
class Outcome:
    """Energy in Wh, money in minor units; forfeits are (party, amount, reason)."""

    delivered_wh: int
    payment: int
    refund: int
    forfeits: tuple[tuple[str, int, str], ...]


def money_for(price_per_kwh: int, energy_wh: int) -> int:
    """Minor units for `energy_wh` Wh at `price_per_kwh` minor units per kWh, rounded half up."""
    return (2 * price_per_kwh * energy_wh + 1000) // 2000


def escrow(order: Order) -> int:
    """What the buyer prepays for the whole order, in minor units."""
    return money_for(order.price, order.energy_wh)


def order_outcome(state: LedgerState, order: Order, now: int) -> Outcome | None:
    """The outcome of a due order, or None while it is not yet due at time `now`."""
    if now < (order.delivery + 2) * HOUR:
        return None
    hour = order.delivery
    metered = state.metered(hour)
    peers = [
        o for o in state.orders.values() if o.delivery == hour and o.status in ("open", "fired")
    ]
    seller_total = sum(o.energy_wh for o in peers if o.seller == order.seller)
    buyer_total = sum(o.energy_wh for o in peers if o.buyer == order.buyer)
    seller_export = metered.get(order.seller, {}).get("export_wh", 0)
    buyer_import = metered.get(order.buyer, {}).get("import_wh", 0)
    seller_share = min(order.energy_wh, seller_export * order.energy_wh // seller_total)
    buyer_share = min(order.energy_wh, buyer_import * order.energy_wh // buyer_total)
    delivered = min(seller_share, buyer_share)
    payment = money_for(order.price, delivered)
    forfeits = []
    for party, share, verb in (
        (order.seller, seller_share, "delivered"),
        (order.buyer, buyer_share, "took"),
    ):
        if share < order.energy_wh:
            amount = order.deposit * (order.energy_wh - share) // order.energy_wh
            if amount:
                forfeits.append(
                    (party, amount, f"{verb} {share} of {order.energy_wh} Wh in hour {hour}")
                )
    return Outcome(delivered, payment, escrow(order) - payment, tuple(forfeits))


def due_actions(state: LedgerState, now: int) -> list[Tx]:
    """Transactions firing every due open order and forfeiting its defaulters' deposits."""
    txs: list[Tx] = []
    for order in sorted(state.orders.values(), key=lambda o: o.id):
        if order.status != "open":
            continue
        outcome = order_outcome(state, order, now)
        if outcome is None:
            continue
        txs.append(
            Tx.make(
                "contract_fire",
                {
                    "order": order.id,
                    "delivered_wh": outcome.delivered_wh,
                    "payment": outcome.payment,
                    "refund": outcome.refund,
                },
            )
        )
        for party, amount, reason in outcome.forfeits:
            txs.append(
                Tx.make(
                    "deposit_forfeit",
                    {"order": order.id, "party": party, "amount": amount, "reason": reason},
                )
            )
    return txs
