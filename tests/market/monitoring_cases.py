"""Seeded markets with planted abusers for the M19 monitoring tests and the calibration figures.

`seeded_market(seed)` plays `hours` hours of a listing-style market among
`honest` participants with realistic bad luck (forecast shortfalls, the odd
late payment, heavy-tailed prices, spare energy not always offered) and one
planted abuser of each kind: repeated deviations, a wash-trading pair of
related accounts, a price manipulator, a non-payer and a capacity withholder.
"""

from __future__ import annotations

import random

from meterchain.market.monitoring import Activity, CapacityRow, PaymentRow, TradeRow

ABUSERS = {
    "x-deviator": "deviation",
    "x-wash-a": "wash",
    "x-wash-b": "wash",
    "x-pricer": "price_outlier",
    "x-nonpayer": "unpaid",
    "x-withholder": "withheld",
}


def seeded_market(seed: int, *, hours: int = 72, honest: int = 12) -> Activity:
    """One seeded window of trading (see module doc); abusers are named in ``ABUSERS``."""
    rng = random.Random(seed)
    people = [f"h{k:02d}" for k in range(honest)] + sorted(ABUSERS)
    trades: list[TradeRow] = []
    capacity: list[CapacityRow] = []
    payments: list[PaymentRow] = []
    start = 1000
    for hour in range(start, start + hours):
        base = rng.randint(4_000, 9_000)
        owed = dict.fromkeys(people, 0)
        for _ in range(rng.randint(6, 11)):
            seller, buyer = rng.sample(people, 2)
            energy = rng.randint(5_000, 50_000)
            price = round(base * (1 + rng.gauss(0, 0.04)))
            if rng.random() < 0.02:  # heavy tail: an honest but unusual deal
                price = round(base * (1 + rng.choice((-1, 1)) * rng.uniform(0.1, 0.3)))
            if "x-pricer" in (seller, buyer) and rng.random() < 0.5:
                price = round(base * rng.uniform(1.8, 3.0))
            roll = rng.random()
            if roll < 0.85:
                delivered = energy
            elif roll < 0.97:
                delivered = round(energy * (1 - rng.uniform(0, 0.15)))
            else:
                delivered = round(energy * (1 - rng.uniform(0.15, 0.5)))
            if seller == "x-deviator" and rng.random() < 0.65:
                delivered = round(energy * rng.uniform(0.3, 0.7))
            trades.append(TradeRow(hour, seller, buyer, energy, max(price, 0), delivered))
            owed[buyer] += delivered * max(price, 0) // 1000
        if rng.random() < 0.5:  # the wash pair round-trips energy between related accounts
            wh = rng.randint(20_000, 50_000)
            trades.append(TradeRow(hour, "x-wash-a", "x-wash-b", wh, base, wh))
            trades.append(TradeRow(hour, "x-wash-b", "x-wash-a", wh, base, wh))
        for name in people:
            due = owed[name]
            if due:
                paid = due
                if rng.random() < 0.03:
                    paid = round(due * rng.uniform(0.5, 0.9))
                if name == "x-nonpayer" and rng.random() < 0.5:
                    paid = round(due * rng.uniform(0, 0.4))
                payments.append(PaymentRow(hour, name, due, paid))
            if rng.random() < 0.5:
                spare = rng.randint(10_000, 80_000)
                share = rng.uniform(0.85, 1.0) if rng.random() < 0.9 else rng.uniform(0.5, 0.85)
                if name == "x-withholder":
                    share = rng.uniform(0.2, 0.5)
                capacity.append(CapacityRow(hour, name, spare, round(spare * share)))
    return Activity(
        start,
        start + hours,
        tuple(trades),
        tuple(capacity),
        tuple(payments),
        related=(("x-wash-a", "x-wash-b"),),
    )
