"""Listing market (M14), taker recommendations (M15) and escrow with deviation settlement (M17).

A pure, deterministic state machine: `apply(book, request)` returns a new
`ListingBook` and the events it caused, or raises a `ListingError` subclass and
leaves the book it was given untouched (books are never mutated). `process` sorts a
batch by (time, seq) and turns refused requests into `Rejected` events, so every
node that feeds the same requests gets the same book and the same events.

Trading rules
- Sellers list energy (Wh) at a price (minor units per kWh) for a coming delivery
  period; buyers take all or part of the listings they choose. The reverse works the
  same way: buyers list, sellers take. A listing for period P is open until P starts
  (time >= P * period_s); it then expires and whatever was not taken is released.
- Requests carry (time, seq); a request not strictly after the last one applied is
  refused (OutOfOrder). Listing ids are "L1", "L2", ... and take ids "T1", ... in
  order of acceptance.
- The buyer always pays. A buy listing locks its whole value when posted (so a
  seller's take never fails for lack of buyer funds); a take of a sell listing
  debits the buyer's balance then. Either way the money for a take, plus the
  postage-stamp transmission fee when the book has a zone graph, sits in escrow.

Escrow settlement (M17), per take of Q Wh at price pi, with metered delivery Q_s
(seller, attributed to this take) and metered use Q_b (buyer):
- first the contract: the agreed quantity Q is settled at the listing price pi, so
  the seller is paid Q at pi out of the prepayment, the buyer is refunded whatever
  it prepaid beyond that amount, and the fee goes to the grid account;
- then the deviations, with the balancing reserve at the two-price rule (the
  listing-platform paper, eqs. 2-3): a long position (over-delivery Q_s > Q,
  under-use Q_b < Q) is paid a * |dQ| by the reserve (a = down-regulation price),
  a short position (under-delivery Q_s < Q, over-use Q_b > Q) pays a' * |dQ| to
  the reserve (a' = up-regulation price), a <= a'. So a seller short by dQ pays
  a' * dQ (the reserve delivered that energy to the buyer, who paid pi for it),
  not pi + a';
- a failed take (vetoed, not executed) returns the whole prepayment and fee.
Every event that moves money lists its `flows` (account -> change, with the pseudo
account ESCROW for money the book holds); they sum to zero except for deposits and
withdrawals, which move money across the market's boundary. Balances may go
negative only through deviation charges (debts the performance bond answers for).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from meterchain.market.errors import MarketError
from meterchain.market.units import div_round
from meterchain.market.zones import (
    REPUTATION_MAX,
    RankingWeights,
    ZoneError,
    ZoneGraph,
    cheapest_path,
    delivered_cost,
)

RESERVE = "@reserve"
GRID = "@grid"
ESCROW = "@escrow"


class Side(StrEnum):
    """Which side posted a listing: SELL listings are taken by buyers, BUY by sellers."""

    SELL = "sell"
    BUY = "buy"


class ListingStatus(StrEnum):
    OPEN = "open"
    FILLED = "filled"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class TakeStatus(StrEnum):
    ESCROWED = "escrowed"
    SETTLED = "settled"
    FAILED = "failed"


# --- errors -------------------------------------------------------------------------------


class ListingError(MarketError):
    """A listing-market request was refused; subclasses say why."""

    reason = "listing"


class InvalidRequest(ListingError):
    reason = "invalid_request"


class OutOfOrder(ListingError):
    reason = "out_of_order"


class UnknownListing(ListingError):
    reason = "unknown_listing"


class ListingClosed(ListingError):
    reason = "listing_closed"


class ListingExpired(ListingClosed):
    reason = "listing_expired"


class OverTake(ListingError):
    reason = "over_take"


class SelfTake(ListingError):
    reason = "self_take"


class NotOwner(ListingError):
    reason = "not_owner"


class NotAdmitted(ListingError):
    reason = "not_admitted"


class InsufficientFunds(ListingError):
    reason = "insufficient_funds"


class WrongPeriod(ListingError):
    reason = "wrong_period"


class UnknownTake(ListingError):
    reason = "unknown_take"


class TakeClosed(ListingError):
    reason = "take_closed"


class TooEarly(ListingError):
    reason = "too_early"


# --- configuration, state ---------------------------------------------------------------


@dataclass(frozen=True)
class BookRules:
    """Market parameters every node must share.

    period_s: delivery period length, seconds (period P starts at P * period_s).
    max_periods_ahead: how far ahead a listing may be (1 = the next period only).
    quantity_per_price: quantity units the price is quoted for (1000: Wh at a price per
        kWh; 1: a price per item, as for green certificates).
    sides: which sides may post listings (a one-way market allows only SELL).
    down_price: a, minor units per price unit paid by the reserve for surplus energy.
    up_price: a', minor units per price unit charged by the reserve for shortfall.
    settle_on_take: the commodity changes hands when taken (green certificates), so
        a take settles at once in full; otherwise (energy) settlement waits for metering
        after the delivery period has ended.
    """

    period_s: int = 3600
    max_periods_ahead: int = 1
    quantity_per_price: int = 1000
    sides: frozenset[Side] = frozenset({Side.SELL, Side.BUY})
    down_price: int = 0
    up_price: int = 0
    settle_on_take: bool = False

    def __post_init__(self) -> None:
        for name in ("period_s", "max_periods_ahead", "quantity_per_price"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise InvalidRequest(f"rule {name} must be a positive integer")
        if not (_is_int(self.down_price) and _is_int(self.up_price)):
            raise InvalidRequest("regulation prices must be integers")
        if not 0 <= self.down_price <= self.up_price:
            raise InvalidRequest("regulation prices need 0 <= down_price <= up_price")
        if not self.sides or not set(self.sides) <= set(Side):
            raise InvalidRequest(f"sides must be a non-empty subset of {list(Side)}")

    def period_start(self, period: int) -> int:
        return period * self.period_s

    def current_period(self, time: int) -> int:
        return time // self.period_s


@dataclass(frozen=True)
class Listing:
    """One listing; `remaining` is what can still be taken, `locked` the buy-side money held."""

    listing_id: str
    owner: str
    side: Side
    period: int
    quantity: int
    remaining: int
    price: int
    zone: str | None
    carbon_g_per_kwh: int
    time: int
    seq: int
    status: ListingStatus = ListingStatus.OPEN
    locked: int = 0


@dataclass(frozen=True)
class TakeRecord:
    """One accepted take: who buys from whom, how much, and what sits in escrow for it."""

    take_id: str
    listing_id: str
    buyer: str
    seller: str
    period: int
    quantity: int
    price: int
    prepaid: int
    fee: int
    path: tuple[str, ...]
    time: int
    seq: int
    status: TakeStatus = TakeStatus.ESCROWED


@dataclass(frozen=True)
class ListingBook:
    """The whole market state. Never mutated: every operation returns a new book."""

    rules: BookRules = field(default_factory=BookRules)
    network: ZoneGraph | None = None
    listings: Mapping[str, Listing] = field(default_factory=dict)
    takes: Mapping[str, TakeRecord] = field(default_factory=dict)
    balances: Mapping[str, int] = field(default_factory=dict)
    # Line capacity left per delivery period that is still open for takes.
    capacity: Mapping[int, ZoneGraph] = field(default_factory=dict)
    clock: tuple[int, int] = (-1, -1)
    listing_count: int = 0
    take_count: int = 0
    # Who may post and take (e.g. reputation.admitted(): registered, not expelled, bond
    # posted); None admits everybody. Deposits, settlement and refunds are never barred.
    admitted: frozenset[str] | None = None

    def balance(self, account: str) -> int:
        return self.balances.get(account, 0)

    def escrowed(self) -> int:
        """Money the book holds: locks of open buy listings plus prepayments and fees in escrow."""
        locks = sum(x.locked for x in self.listings.values())
        held = sum(
            t.prepaid + t.fee for t in self.takes.values() if t.status == TakeStatus.ESCROWED
        )
        return locks + held

    def total_money(self) -> int:
        """All money in the market (balances incl. reserve and grid, plus escrow)."""
        return sum(self.balances.values()) + self.escrowed()


# --- requests -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Deposit:
    time: int
    seq: int
    party: str
    amount: int


@dataclass(frozen=True)
class Withdraw:
    time: int
    seq: int
    party: str
    amount: int


@dataclass(frozen=True)
class PostListing:
    time: int
    seq: int
    owner: str
    side: Side
    period: int
    quantity: int
    price: int
    zone: str | None = None
    carbon_g_per_kwh: int = 0


@dataclass(frozen=True)
class TakeListing:
    time: int
    seq: int
    taker: str
    listing_id: str
    quantity: int
    zone: str | None = None


@dataclass(frozen=True)
class CancelListing:
    time: int
    seq: int
    owner: str
    listing_id: str


@dataclass(frozen=True)
class SettleTake:
    """Metered outcome of one take: `delivered` by the seller, `consumed` by the buyer (Wh)."""

    time: int
    seq: int
    take_id: str
    delivered: int
    consumed: int


@dataclass(frozen=True)
class FailTake:
    time: int
    seq: int
    take_id: str
    reason: str


@dataclass(frozen=True)
class Tick:
    """Time passes: listings whose delivery period has started expire."""

    time: int
    seq: int


Request = (
    Deposit | Withdraw | PostListing | TakeListing | CancelListing | SettleTake | FailTake | Tick
)

# --- events -------------------------------------------------------------------------------

Flows = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Deposited:
    party: str
    amount: int


@dataclass(frozen=True)
class Withdrawn:
    party: str
    amount: int


@dataclass(frozen=True)
class Listed:
    listing: Listing
    flows: Flows


@dataclass(frozen=True)
class Taken:
    take: TakeRecord
    flows: Flows


@dataclass(frozen=True)
class Closed:
    """A listing left the book: filled, cancelled by its owner, or expired."""

    listing_id: str
    status: ListingStatus
    released: int
    flows: Flows


@dataclass(frozen=True)
class Settled:
    take_id: str
    delivered: int
    consumed: int
    flows: Flows


@dataclass(frozen=True)
class Failed:
    take_id: str
    reason: str
    flows: Flows


@dataclass(frozen=True)
class Rejected:
    time: int
    seq: int
    reason: str
    message: str


Event = Deposited | Withdrawn | Listed | Taken | Closed | Settled | Failed | Rejected


# --- entry points -------------------------------------------------------------------------


def apply(book: ListingBook, request: Request) -> tuple[ListingBook, tuple[Event, ...]]:
    """Apply one request after everything already in `book`.

    Refusals raise a MarketError subclass (a ListingError, or a ZoneError such as
    NoFeasiblePath when no path can carry a take); `book` itself never changes.
    """
    swept, expired = _advance(book, request)
    new_book, events = _execute(swept, request)
    return new_book, expired + events


def process(
    book: ListingBook, requests: Iterable[Request]
) -> tuple[ListingBook, tuple[Event, ...]]:
    """Apply a batch in (time, seq) order; refused requests become Rejected events.

    Time still passes for a refused request (its expiries happen and its (time, seq)
    is consumed), so a replay of the same request is refused as out of order.
    """
    batch = list(requests)
    for request in batch:
        if not (_is_int(request.time) and _is_int(request.seq)):
            raise InvalidRequest(f"request without integer (time, seq): {request!r}")
    events: list[Event] = []
    for request in sorted(batch, key=lambda r: (r.time, r.seq)):
        try:
            book, expired = _advance(book, request)
        except MarketError as exc:
            events.append(Rejected(request.time, request.seq, _reason(exc), str(exc)))
            continue
        events.extend(expired)
        try:
            book, done = _execute(book, request)
        except MarketError as exc:
            events.append(Rejected(request.time, request.seq, _reason(exc), str(exc)))
            continue
        events.extend(done)
    return book, tuple(events)


def open_listings(book: ListingBook, time: int) -> tuple[Listing, ...]:
    """Listings that can still be taken at `time`, in (time, seq) order."""
    live = [
        x
        for x in book.listings.values()
        if x.status == ListingStatus.OPEN and time < book.rules.period_start(x.period)
    ]
    return tuple(sorted(live, key=lambda x: (x.time, x.seq)))


@dataclass(frozen=True)
class Recommendation:
    """One listing as a taker would see it, with the parts of its delivered-cost score."""

    listing_id: str
    counterparty: str
    quantity: int
    price: int
    fee_per_kwh: int
    path: tuple[str, ...]
    reputation: int
    carbon_g_per_kwh: int
    score: int


def recommend(
    book: ListingBook,
    *,
    taker: str,
    taker_side: Side,
    zone: str | None,
    energy_wh: int,
    time: int,
    weights: RankingWeights,
    reputation: Mapping[str, int],
) -> tuple[Recommendation, ...]:
    """Rank open listings for a taker by delivered cost (M15), best first.

    `taker_side` is the side the taker is on: a BUY taker sees SELL listings and vice
    versa. Each listing is scored for min(its remaining, energy_wh) Wh on the cheapest
    path that can carry it (listings no path can serve are left out). A counterparty
    missing from `reputation` counts as 0, the worst score. Ties go to the older listing.
    """
    if not _is_int(energy_wh) or energy_wh <= 0:
        raise InvalidRequest(f"energy must be a positive integer Wh, got {energy_wh!r}")
    wanted = Side.SELL if taker_side == Side.BUY else Side.BUY
    ranked: list[tuple[tuple[int, int, int], Recommendation]] = []
    for listing in open_listings(book, time):
        if listing.side != wanted or listing.owner == taker:
            continue
        quantity = min(listing.remaining, energy_wh)
        path: tuple[str, ...] = ()
        rate = 0
        if book.network is not None:
            if zone is None or listing.zone is None:
                raise InvalidRequest("this market has zones: the taker must give its zone")
            seller_zone, buyer_zone = (
                (listing.zone, zone) if taker_side == Side.BUY else (zone, listing.zone)
            )
            graph = book.capacity.get(listing.period, book.network)
            try:
                route = cheapest_path(graph, seller_zone, buyer_zone, quantity)
            except ZoneError:
                continue
            path, rate = route.zones, route.fee_per_kwh
        rep = min(max(reputation.get(listing.owner, 0), 0), REPUTATION_MAX)
        score = delivered_cost(
            weights,
            price=listing.price,
            fee_per_kwh=rate,
            reputation=rep,
            carbon_g_per_kwh=listing.carbon_g_per_kwh,
            taker_buys=taker_side == Side.BUY,
        )
        rec = Recommendation(
            listing.listing_id,
            listing.owner,
            quantity,
            listing.price,
            rate,
            path,
            rep,
            listing.carbon_g_per_kwh,
            score,
        )
        ranked.append(((score, listing.time, listing.seq), rec))
    ranked.sort(key=lambda item: item[0])
    return tuple(rec for _, rec in ranked)


# --- internals ----------------------------------------------------------------------------


def _reason(exc: MarketError) -> str:
    """Stable reason label of a refusal (errors outside this module's family say "market")."""
    return getattr(exc, "reason", "market")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_party(name: object, what: str) -> str:
    if not isinstance(name, str) or not name or name.startswith("@"):
        raise InvalidRequest(f"{what} must be a non-empty name not starting with '@': {name!r}")
    return name


def _check_admitted(book: ListingBook, name: str) -> None:
    if book.admitted is not None and name not in book.admitted:
        raise NotAdmitted(f"{name} may not trade (not admitted, expelled or bond missing)")


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequest(f"{what} must be a positive integer, got {value!r}")
    return value


def _non_negative(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _amount(price: int, quantity: int, per: int) -> int:
    """Money (minor units) for `quantity` at `price` per `per` quantity units, shared rounding."""
    return div_round(price * quantity, per)


def _flows(changes: Mapping[str, int]) -> Flows:
    return tuple(sorted((k, v) for k, v in changes.items() if v))


def _add(balances: dict[str, int], changes: Mapping[str, int]) -> None:
    for account, delta in changes.items():
        if account != ESCROW and delta:
            balances[account] = balances.get(account, 0) + delta


def _advance(book: ListingBook, request: Request) -> tuple[ListingBook, tuple[Event, ...]]:
    """Check ordering, move the clock to the request and expire what its time closes."""
    if not (_is_int(request.time) and _is_int(request.seq)) or request.time < 0:
        raise InvalidRequest("time and seq must be integers, time >= 0")
    if (request.time, request.seq) <= book.clock:
        raise OutOfOrder(
            f"request ({request.time}, {request.seq}) is not after {book.clock}; "
            "requests apply in strictly increasing (time, seq)"
        )
    rules = book.rules
    listings = dict(book.listings)
    balances = dict(book.balances)
    events: list[Event] = []
    due = [
        x
        for x in book.listings.values()
        if x.status == ListingStatus.OPEN and request.time >= rules.period_start(x.period)
    ]
    for listing in sorted(due, key=lambda x: (x.time, x.seq)):
        changes = {ESCROW: -listing.locked, listing.owner: listing.locked}
        _add(balances, changes)
        listings[listing.listing_id] = replace(listing, status=ListingStatus.EXPIRED, locked=0)
        events.append(
            Closed(listing.listing_id, ListingStatus.EXPIRED, listing.remaining, _flows(changes))
        )
    capacity = {p: g for p, g in book.capacity.items() if request.time < rules.period_start(p)}
    return (
        replace(
            book,
            listings=listings,
            balances=balances,
            capacity=capacity,
            clock=(request.time, request.seq),
        ),
        tuple(events),
    )


def _execute(book: ListingBook, request: Request) -> tuple[ListingBook, tuple[Event, ...]]:
    if isinstance(request, Deposit):
        return _deposit(book, request)
    if isinstance(request, Withdraw):
        return _withdraw(book, request)
    if isinstance(request, PostListing):
        return _post(book, request)
    if isinstance(request, TakeListing):
        return _take(book, request)
    if isinstance(request, CancelListing):
        return _cancel(book, request)
    if isinstance(request, SettleTake):
        return _settle(book, request)
    if isinstance(request, FailTake):
        return _fail(book, request)
    if isinstance(request, Tick):
        return book, ()
    raise InvalidRequest(f"unknown request type {type(request).__name__}")


def _deposit(book: ListingBook, req: Deposit) -> tuple[ListingBook, tuple[Event, ...]]:
    party = _check_party(req.party, "party")
    amount = _positive(req.amount, "deposit")
    balances = dict(book.balances)
    balances[party] = balances.get(party, 0) + amount
    return replace(book, balances=balances), (Deposited(party, amount),)


def _withdraw(book: ListingBook, req: Withdraw) -> tuple[ListingBook, tuple[Event, ...]]:
    party = _check_party(req.party, "party")
    amount = _positive(req.amount, "withdrawal")
    if book.balance(party) < amount:
        raise InsufficientFunds(f"{party} has {book.balance(party)}, cannot withdraw {amount}")
    balances = dict(book.balances)
    balances[party] -= amount
    return replace(book, balances=balances), (Withdrawn(party, amount),)


def _post(book: ListingBook, req: PostListing) -> tuple[ListingBook, tuple[Event, ...]]:
    rules = book.rules
    owner = _check_party(req.owner, "owner")
    _check_admitted(book, owner)
    if req.side not in rules.sides:
        raise InvalidRequest(f"this market does not accept {req.side!s} listings")
    quantity = _positive(req.quantity, "listed quantity")
    price = _non_negative(req.price, "price")
    carbon = _non_negative(req.carbon_g_per_kwh, "carbon intensity")
    period = req.period
    now = rules.current_period(req.time)
    if not _is_int(period) or not now < period <= now + rules.max_periods_ahead:
        raise WrongPeriod(
            f"listing for period {period!r} at time {req.time}: allowed "
            f"{now + 1}..{now + rules.max_periods_ahead}"
        )
    if book.network is not None:
        if req.zone is None:
            raise InvalidRequest("this market has zones: a listing must name its zone")
        if req.zone not in book.network.fees:
            raise InvalidRequest(f"unknown zone {req.zone!r}")
    locked = 0
    changes: dict[str, int] = {}
    if req.side == Side.BUY:
        locked = _amount(price, quantity, rules.quantity_per_price)
        if book.balance(owner) < locked:
            raise InsufficientFunds(
                f"{owner} has {book.balance(owner)}, a buy listing needs {locked} locked"
            )
        changes = {owner: -locked, ESCROW: locked}
    number = book.listing_count + 1
    listing = Listing(
        listing_id=f"L{number}",
        owner=owner,
        side=Side(req.side),
        period=period,
        quantity=quantity,
        remaining=quantity,
        price=price,
        zone=req.zone,
        carbon_g_per_kwh=carbon,
        time=req.time,
        seq=req.seq,
        locked=locked,
    )
    balances = dict(book.balances)
    _add(balances, changes)
    listings = dict(book.listings)
    listings[listing.listing_id] = listing
    new = replace(book, listings=listings, balances=balances, listing_count=number)
    return new, (Listed(listing, _flows(changes)),)


def _open_listing(book: ListingBook, listing_id: str) -> Listing:
    listing = book.listings.get(listing_id)
    if listing is None:
        raise UnknownListing(f"no listing {listing_id!r}")
    if listing.status == ListingStatus.EXPIRED:
        raise ListingExpired(f"listing {listing_id} expired when period {listing.period} began")
    if listing.status != ListingStatus.OPEN:
        raise ListingClosed(f"listing {listing_id} is {listing.status!s}")
    return listing


def _take(book: ListingBook, req: TakeListing) -> tuple[ListingBook, tuple[Event, ...]]:
    rules = book.rules
    taker = _check_party(req.taker, "taker")
    _check_admitted(book, taker)
    quantity = _positive(req.quantity, "taken quantity")
    listing = _open_listing(book, req.listing_id)
    if listing.owner == taker:
        raise SelfTake(f"{taker} cannot take its own listing {listing.listing_id}")
    if quantity > listing.remaining:
        raise OverTake(
            f"listing {listing.listing_id} has {listing.remaining} left, {quantity} requested"
        )
    if listing.side == Side.SELL:
        buyer, seller = taker, listing.owner
    else:
        buyer, seller = listing.owner, taker

    path: tuple[str, ...] = ()
    fee = 0
    capacity = dict(book.capacity)
    if book.network is not None:
        if req.zone is None or req.zone not in book.network.fees or listing.zone is None:
            raise InvalidRequest(f"this market has zones: taker zone {req.zone!r} is not one")
        seller_zone, buyer_zone = (
            (listing.zone, req.zone) if listing.side == Side.SELL else (req.zone, listing.zone)
        )
        graph = capacity.get(listing.period, book.network)
        route = cheapest_path(graph, seller_zone, buyer_zone, quantity)
        capacity[listing.period] = graph.with_flow(route.zones, quantity)
        path, fee = route.zones, route.fee

    per = rules.quantity_per_price
    changes: dict[str, int] = {}
    if listing.side == Side.SELL:
        energy_money = _amount(listing.price, quantity, per)
        if book.balance(buyer) < energy_money + fee:
            raise InsufficientFunds(
                f"{buyer} has {book.balance(buyer)}, the take needs {energy_money + fee}"
            )
        changes = {buyer: -(energy_money + fee), ESCROW: energy_money + fee}
        locked = 0
    else:
        # Moving the lock by differences of the cumulative amount keeps the sum of all
        # takes equal to the amount locked at posting, whatever the rounding.
        done = listing.quantity - listing.remaining
        energy_money = _amount(listing.price, done + quantity, per) - _amount(
            listing.price, done, per
        )
        if book.balance(buyer) < fee:
            raise InsufficientFunds(f"{buyer} has {book.balance(buyer)}, the fee is {fee}")
        changes = {buyer: -fee, ESCROW: fee}
        locked = listing.locked - energy_money

    number = book.take_count + 1
    take = TakeRecord(
        take_id=f"T{number}",
        listing_id=listing.listing_id,
        buyer=buyer,
        seller=seller,
        period=listing.period,
        quantity=quantity,
        price=listing.price,
        prepaid=energy_money,
        fee=fee,
        path=path,
        time=req.time,
        seq=req.seq,
    )
    remaining = listing.remaining - quantity
    balances = dict(book.balances)
    _add(balances, changes)
    events: list[Event] = [Taken(take, _flows(changes))]
    updated = replace(listing, remaining=remaining, locked=locked)
    if remaining == 0:
        release = {ESCROW: -locked, listing.owner: locked}
        _add(balances, release)
        updated = replace(updated, status=ListingStatus.FILLED, locked=0)
        events.append(Closed(listing.listing_id, ListingStatus.FILLED, 0, _flows(release)))
    if rules.settle_on_take:
        flows = settlement_flows(rules, take, quantity, quantity)
        _add(balances, dict(flows))
        take = replace(take, status=TakeStatus.SETTLED)
        events.insert(1, Settled(take.take_id, quantity, quantity, flows))
    listings = dict(book.listings)
    listings[listing.listing_id] = updated
    takes = dict(book.takes)
    takes[take.take_id] = take
    new = replace(
        book,
        listings=listings,
        takes=takes,
        balances=balances,
        capacity=capacity,
        take_count=number,
    )
    return new, tuple(events)


def _cancel(book: ListingBook, req: CancelListing) -> tuple[ListingBook, tuple[Event, ...]]:
    listing = _open_listing(book, req.listing_id)
    if listing.owner != req.owner:
        raise NotOwner(f"{req.owner!r} does not own listing {listing.listing_id}")
    changes = {ESCROW: -listing.locked, listing.owner: listing.locked}
    balances = dict(book.balances)
    _add(balances, changes)
    listings = dict(book.listings)
    listings[listing.listing_id] = replace(listing, status=ListingStatus.CANCELLED, locked=0)
    event = Closed(listing.listing_id, ListingStatus.CANCELLED, listing.remaining, _flows(changes))
    return replace(book, listings=listings, balances=balances), (event,)


def _escrowed_take(book: ListingBook, take_id: str) -> TakeRecord:
    take = book.takes.get(take_id)
    if take is None:
        raise UnknownTake(f"no take {take_id!r}")
    if take.status != TakeStatus.ESCROWED:
        raise TakeClosed(f"take {take_id} is already {take.status!s}")
    return take


def settlement_flows(rules: BookRules, take: TakeRecord, delivered: int, consumed: int) -> Flows:
    """Money moved when `take` settles with the metered `delivered` and `consumed` quantities.

    See the module docstring for the rule; the result sums to zero over all accounts
    with ESCROW giving up exactly the take's prepayment and fee.
    """
    per = rules.quantity_per_price
    changes: dict[str, int] = {}

    def move(account: str, delta: int) -> None:
        changes[account] = changes.get(account, 0) + delta

    agreed = min(take.prepaid, _amount(take.price, take.quantity, per))
    move(ESCROW, -(take.prepaid + take.fee))
    move(take.seller, agreed)
    move(take.buyer, take.prepaid - agreed)
    move(GRID, take.fee)
    for party, surplus in (
        (take.seller, delivered - take.quantity),
        (take.buyer, take.quantity - consumed),
    ):
        if surplus > 0:
            pay = _amount(rules.down_price, surplus, per)
            move(party, pay)
            move(RESERVE, -pay)
        elif surplus < 0:
            charge = _amount(rules.up_price, -surplus, per)
            move(party, -charge)
            move(RESERVE, charge)
    return _flows(changes)


def _settle(book: ListingBook, req: SettleTake) -> tuple[ListingBook, tuple[Event, ...]]:
    take = _escrowed_take(book, req.take_id)
    delivered = _non_negative(req.delivered, "delivered energy")
    consumed = _non_negative(req.consumed, "consumed energy")
    end = book.rules.period_start(take.period + 1)
    if req.time < end:
        raise TooEarly(f"take {take.take_id} settles after its delivery period ends at {end}")
    flows = settlement_flows(book.rules, take, delivered, consumed)
    balances = dict(book.balances)
    _add(balances, dict(flows))
    takes = dict(book.takes)
    takes[take.take_id] = replace(take, status=TakeStatus.SETTLED)
    new = replace(book, takes=takes, balances=balances)
    return new, (Settled(take.take_id, delivered, consumed, flows),)


def _fail(book: ListingBook, req: FailTake) -> tuple[ListingBook, tuple[Event, ...]]:
    take = _escrowed_take(book, req.take_id)
    if not isinstance(req.reason, str) or not req.reason:
        raise InvalidRequest("a failed take needs a reason")
    changes = {ESCROW: -(take.prepaid + take.fee), take.buyer: take.prepaid + take.fee}
    balances = dict(book.balances)
    _add(balances, changes)
    capacity = dict(book.capacity)
    if take.path and take.period in capacity:
        # Before delivery starts the line capacity goes back to the market.
        capacity[take.period] = capacity[take.period].with_flow(take.path, -take.quantity)
    takes = dict(book.takes)
    takes[take.take_id] = replace(take, status=TakeStatus.FAILED)
    new = replace(book, takes=takes, balances=balances, capacity=capacity)
    return new, (Failed(take.take_id, req.reason, _flows(changes)),)
