"""Failed execution (M21): remedies for a cleared or listed trade whose delivery fell short.

Pure and deterministic: ``remedy(case) -> RemedyPlan``. The case holds the
hour's failed trades (contracted vs metered Wh), the spare green offers of
other sellers, the reserve offered by storage, the financial transmission
rights (FTRs) bought for trades, and the remedies the operator enabled, in
the order to try them (``RemedyCase.order``, default reassign, storage, ftr).
Each failed trade is remedied in turn (seller, then buyer, then input order):

1. ``reassign`` -- contract transfer: the short energy goes to other sellers
   with spare offers, cheapest first (ties by id), never to the trade's own
   parties. Settled as a difference contract: the buyer pays the new seller
   what it contracted for, at most the offer (``min(pi, p')`` per kWh); when
   the offer is dearer than the contract, the defaulting seller pays the
   difference ``p' - pi``. So the buyer never pays more than its contract and
   the defaulter never profits from its default.
2. ``storage`` -- the same settlement with storage owners that offered
   reserve for the hour (at their reserve price).
3. ``ftr`` -- what is still short is compensated to the holders of FTRs
   bought for the trade: ``rate x short kWh`` up to the right's energy, paid
   by the issuer (the grid company). A compensated trade is closed: remedies
   listed after ``ftr`` are not tried for it.

``RemedyPlan.uncovered`` lists the energy no remedy replaced (Wh), including
energy compensated by an FTR (money, not energy).

Remedies settle after the hour's SC2 settlement, which billed the trade as
delivered (M5), so a covered kWh carries three corrections, each its own
entry: the buyer returns the M5 shortfall penalty it received for it
(``penalty-return``; the replacement, not the penalty, now makes it whole),
the grid company refunds the retail price the buyer paid for importing it
(``retail-reversal``), and the provider returns the feed-in tariff it was paid
for exporting it (``feed-in-reversal``): the energy that flowed through the
grid is re-attributed to the new contract. With listed trades (no SC2) these
rates are 0. Every entry moves a positive amount from payer to payee, so money
is conserved by construction. Energy in Wh, money in minor units, prices per kWh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from meterchain import codec
from meterchain.errors import CodecError
from meterchain.market.errors import MarketError
from meterchain.market.model import GRID_COMPANY
from meterchain.market.settlement import LedgerEntry
from meterchain.market.units import energy_money

REASSIGN = "reassign"
STORAGE = "storage"
FTR = "ftr"
REMEDIES = (REASSIGN, STORAGE, FTR)


class FailedExecutionError(MarketError):
    """A failed-execution case is malformed; the message names the field."""


def _uint(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FailedExecutionError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _party(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise FailedExecutionError(f"{what} must be a non-empty id, got {value!r}")
    return value


@dataclass(frozen=True)
class FailedTrade:
    """A trade that delivered less than contracted (Wh), with its prices (per kWh).

    ``penalty_per_kwh``: the M5 shortfall penalty the buyer received per kWh
    short; ``buyer_retail_per_kwh``: what the buyer paid the grid for the
    replacement import. Both 0 for a listed trade settled without SC2.
    """

    seller: str
    buyer: str
    contracted_wh: int
    delivered_wh: int
    price_per_kwh: int
    penalty_per_kwh: int = 0
    buyer_retail_per_kwh: int = 0

    def __post_init__(self) -> None:
        _party(self.seller, "failed trade seller")
        _party(self.buyer, "failed trade buyer")
        if self.seller == self.buyer:
            raise FailedExecutionError(f"trade {self.seller}->{self.buyer}: parties must differ")
        for name in (
            "contracted_wh",
            "delivered_wh",
            "price_per_kwh",
            "penalty_per_kwh",
            "buyer_retail_per_kwh",
        ):
            _uint(getattr(self, name), f"trade {self.seller}->{self.buyer} {name}")
        if self.delivered_wh > self.contracted_wh:
            raise FailedExecutionError(
                f"trade {self.seller}->{self.buyer}: delivered {self.delivered_wh} Wh > "
                f"contracted {self.contracted_wh} Wh"
            )

    @property
    def short_wh(self) -> int:
        return self.contracted_wh - self.delivered_wh


@dataclass(frozen=True)
class Offer:
    """Energy a party can take over in the hour: spare green (``reassign``) or storage reserve.

    ``feed_in_per_kwh`` is what the party was paid for exporting that energy
    to the grid in SC2 (returned when it is re-attributed), 0 for listings.
    """

    kind: str  # REASSIGN or STORAGE
    party: str
    energy_wh: int
    price_per_kwh: int
    feed_in_per_kwh: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (REASSIGN, STORAGE):
            raise FailedExecutionError(f"offer kind {self.kind!r} must be reassign or storage")
        _party(self.party, "offer party")
        for name in ("energy_wh", "price_per_kwh", "feed_in_per_kwh"):
            _uint(getattr(self, name), f"offer of {self.party} {name}")


@dataclass(frozen=True)
class TransmissionRight:
    """An FTR bought by ``holder`` for the trade seller -> buyer: pays ``rate`` per kWh short."""

    holder: str
    seller: str
    buyer: str
    energy_wh: int
    rate_per_kwh: int

    def __post_init__(self) -> None:
        for name in ("holder", "seller", "buyer"):
            _party(getattr(self, name), f"transmission right {name}")
        _uint(self.energy_wh, f"transmission right of {self.holder} energy_wh")
        _uint(self.rate_per_kwh, f"transmission right of {self.holder} rate_per_kwh")


@dataclass(frozen=True)
class RemedyCase:
    """Everything the contract needs for one hour (all integers)."""

    hour: int
    trades: tuple[FailedTrade, ...]
    offers: tuple[Offer, ...] = ()
    rights: tuple[TransmissionRight, ...] = ()
    order: tuple[str, ...] = REMEDIES

    def __post_init__(self) -> None:
        _uint(self.hour, "hour")
        order = tuple(self.order)
        if len(set(order)) != len(order) or any(r not in REMEDIES for r in order):
            raise FailedExecutionError(
                f"remedy order {list(order)!r} must list distinct remedies of {list(REMEDIES)}"
            )
        seen = set()
        for t in self.trades:
            if not isinstance(t, FailedTrade):
                raise FailedExecutionError("trades must be FailedTrade records")
            if (t.seller, t.buyer) in seen:
                raise FailedExecutionError(f"trade {t.seller}->{t.buyer} is listed twice")
            seen.add((t.seller, t.buyer))
        for o in self.offers:
            if not isinstance(o, Offer):
                raise FailedExecutionError("offers must be Offer records")
        for r in self.rights:
            if not isinstance(r, TransmissionRight):
                raise FailedExecutionError("rights must be TransmissionRight records")
        object.__setattr__(self, "order", order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hour": self.hour,
            "trades": [
                [
                    t.seller,
                    t.buyer,
                    t.contracted_wh,
                    t.delivered_wh,
                    t.price_per_kwh,
                    t.penalty_per_kwh,
                    t.buyer_retail_per_kwh,
                ]
                for t in self.trades
            ],
            "offers": [
                [o.kind, o.party, o.energy_wh, o.price_per_kwh, o.feed_in_per_kwh]
                for o in self.offers
            ],
            "rights": [
                [r.holder, r.seller, r.buyer, r.energy_wh, r.rate_per_kwh] for r in self.rights
            ],
            "order": list(self.order),
        }

    @classmethod
    def from_dict(cls, value: object) -> RemedyCase:
        keys = {"hour", "trades", "offers", "rights", "order"}
        if not isinstance(value, Mapping) or set(value) != keys:
            raise FailedExecutionError(f"a remedy case must be a map with keys {sorted(keys)}")
        try:
            return cls(
                hour=value["hour"],
                trades=tuple(FailedTrade(*row) for row in value["trades"]),
                offers=tuple(Offer(*row) for row in value["offers"]),
                rights=tuple(TransmissionRight(*row) for row in value["rights"]),
                order=tuple(value["order"]),
            )
        except TypeError as exc:
            raise FailedExecutionError(f"malformed remedy case: {exc}") from exc

    def to_cbor(self) -> bytes:
        return codec.encode(self.to_dict())

    @classmethod
    def from_cbor(cls, data: bytes) -> RemedyCase:
        try:
            return cls.from_dict(codec.decode(data))
        except CodecError as exc:
            raise FailedExecutionError(f"remedy case is not canonical CBOR: {exc}") from exc


@dataclass(frozen=True)
class Remedy:
    """One remedy applied to one failed trade, with the money it moves."""

    kind: str
    seller: str
    buyer: str
    provider: str  # the new seller, the storage owner, or the FTR holder
    energy_wh: int
    entries: tuple[LedgerEntry, ...]


@dataclass(frozen=True)
class RemedyPlan:
    """The contract's output for one hour: remedies in order and what is left uncovered."""

    hour: int
    remedies: tuple[Remedy, ...]
    uncovered: tuple[tuple[str, str, int], ...]  # (seller, buyer, Wh) nothing covered
    entries: tuple[LedgerEntry, ...] = field(default=())

    def balances(self) -> dict[str, int]:
        """Net money in (+) or out (-) per party; sums to zero."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.payer] = out.get(e.payer, 0) - e.amount
            out[e.payee] = out.get(e.payee, 0) + e.amount
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "hour": self.hour,
            "remedies": [
                [
                    r.kind,
                    r.seller,
                    r.buyer,
                    r.provider,
                    r.energy_wh,
                    [[e.payer, e.payee, e.amount, e.reason] for e in r.entries],
                ]
                for r in self.remedies
            ],
            "uncovered": [list(u) for u in self.uncovered],
        }

    @cached_property
    def digest(self) -> bytes:
        return codec.digest(self.to_dict())


def remedy(case: RemedyCase) -> RemedyPlan:
    """Apply the enabled remedies, in order, to every failed trade of the hour (module doc)."""
    left = {id(o): o.energy_wh for o in case.offers}
    rights_left = {id(r): r.energy_wh for r in case.rights}
    remedies: list[Remedy] = []
    uncovered: list[tuple[str, str, int]] = []
    trades = sorted(enumerate(case.trades), key=lambda kt: (kt[1].seller, kt[1].buyer, kt[0]))
    for _, trade in trades:
        short = trade.short_wh
        for kind in case.order:
            if not short:
                break
            if kind == FTR:
                got = _compensate(trade, short, case.rights, rights_left)
                remedies.extend(got)
                # FTRs pay money, they deliver no energy: the trade stays short.
                break
            offers = sorted(
                (
                    o
                    for o in case.offers
                    if o.kind == kind and o.party not in (trade.seller, trade.buyer)
                ),
                key=lambda o: (o.price_per_kwh, o.party),
            )
            for offer in offers:
                take = min(short, left[id(offer)])
                if not take:
                    continue
                left[id(offer)] -= take
                short -= take
                remedies.append(_transfer(kind, trade, offer, take))
                if not short:
                    break
        if short:
            uncovered.append((trade.seller, trade.buyer, short))
    entries = tuple(e for r in remedies for e in r.entries)
    return RemedyPlan(case.hour, tuple(remedies), tuple(uncovered), entries)


def _transfer(kind: str, trade: FailedTrade, offer: Offer, wh: int) -> Remedy:
    """Contract transfer of ``wh`` Wh from the defaulting seller to ``offer.party``."""
    entries: list[LedgerEntry] = []

    def pay(payer: str, payee: str, amount: int, reason: str) -> None:
        if amount > 0:
            entries.append(LedgerEntry(payer, payee, amount, reason))

    provider = offer.party
    pay(
        trade.buyer,
        provider,
        energy_money(wh, min(trade.price_per_kwh, offer.price_per_kwh)),
        f"{kind}-energy",
    )
    pay(
        trade.seller,
        provider,
        energy_money(wh, max(0, offer.price_per_kwh - trade.price_per_kwh)),
        f"{kind}-difference",
    )
    pay(trade.buyer, trade.seller, energy_money(wh, trade.penalty_per_kwh), "penalty-return")
    pay(GRID_COMPANY, trade.buyer, energy_money(wh, trade.buyer_retail_per_kwh), "retail-reversal")
    pay(provider, GRID_COMPANY, energy_money(wh, offer.feed_in_per_kwh), "feed-in-reversal")
    return Remedy(kind, trade.seller, trade.buyer, provider, wh, tuple(entries))


def _compensate(
    trade: FailedTrade,
    short: int,
    rights: Sequence[TransmissionRight],
    left: dict[int, int],
) -> list[Remedy]:
    """FTR payouts for ``short`` Wh of ``trade``: rights in holder order, each up to its energy."""
    out = []
    mine = sorted(
        (r for r in rights if (r.seller, r.buyer) == (trade.seller, trade.buyer)),
        key=lambda r: r.holder,
    )
    for right in mine:
        wh = min(short, left[id(right)])
        if not wh:
            continue
        left[id(right)] -= wh
        short -= wh
        amount = energy_money(wh, right.rate_per_kwh)
        entries = (LedgerEntry(GRID_COMPANY, right.holder, amount, "ftr-compensation"),)
        out.append(
            Remedy(FTR, trade.seller, trade.buyer, right.holder, wh, entries if amount else ())
        )
        if not short:
            break
    return out


__all__ = [
    "FTR",
    "REASSIGN",
    "REMEDIES",
    "STORAGE",
    "FailedExecutionError",
    "FailedTrade",
    "Offer",
    "Remedy",
    "RemedyCase",
    "RemedyPlan",
    "TransmissionRight",
    "remedy",
]
