"""Reputation, credit grades and performance bonds (M18), as pure integer state transitions.

After each trade both sides rate each other from 1 to 5 stars. A participant's
score is a bounded integer in 0..1000 (fixed point, identical on every node):

    quality   = (W * m + sum of ratings) / (W + count)          Bayesian average, stars
    rating    = RATING_POINTS * (quality - 1) / 4               0..RATING_POINTS
    activity  = ACTIVITY_POINTS * trades / (trades + H)         0..ACTIVITY_POINTS
    score     = rating + activity                               (all floored integers)

with prior mean m (3 stars) and prior weight W, so one early rating moves a newcomer
only a little, and H trades earn half the activity points. Good ratings raise the
score, and so does every completed trade. The credit grade (A best .. E) follows
from the score and sets the bond a participant must post: base * percent(grade) /
100, smaller for better grades.

Enforcement runs whenever a participant receives a rating (a "review"):
- below `warn_below` an active participant is warned (event Warned); back above, it
  is reinstated (event Reinstated);
- below `fine_below` it is fined `fine` minor units from its bond (event Fined; the
  money goes to the market reserve, tracked in `fines_collected`);
- below `expel_below`, or at its `max_fines`-th fine, or when the bond cannot cover
  a fine, it is expelled (event Expelled): no more trades or ratings for it;
- when its grade's bond exceeds what it has posted, a BondCall asks for the top-up,
  and `may_trade` is false until it is posted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from meterchain.market.errors import MarketError

SCORE_MAX = 1000
GRADES = ("A", "B", "C", "D", "E")


class ReputationError(MarketError):
    """A reputation request was refused; subclasses say why."""

    reason = "reputation"


class UnknownParticipant(ReputationError):
    reason = "unknown_participant"


class AlreadyRegistered(ReputationError):
    reason = "already_registered"


class InvalidRating(ReputationError):
    reason = "invalid_rating"


class UnknownTrade(ReputationError):
    reason = "unknown_trade"


class DuplicateTrade(ReputationError):
    reason = "duplicate_trade"


class NotAParty(ReputationError):
    reason = "not_a_party"


class AlreadyRated(ReputationError):
    reason = "already_rated"


class ParticipantExpelled(ReputationError):
    reason = "expelled"


class Standing(StrEnum):
    ACTIVE = "active"
    WARNED = "warned"
    EXPELLED = "expelled"


@dataclass(frozen=True)
class ReputationPolicy:
    """Parameters of the score, the grades, the bonds and the sanctions (integers)."""

    prior_mean_milli: int = 3000
    prior_weight: int = 5
    rating_points: int = 800
    activity_points: int = 200
    activity_half: int = 10
    grade_floors: tuple[int, int, int, int] = (800, 650, 400, 250)
    bond_base: int = 1_000_000
    bond_percent: tuple[int, int, int, int, int] = (50, 75, 100, 150, 200)
    warn_below: int = 350
    fine_below: int = 250
    expel_below: int = 150
    fine: int = 100_000
    max_fines: int = 3

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                raise ReputationError(f"policy {name} must be non-negative integers")
        if not 1000 <= self.prior_mean_milli <= 5000 or self.prior_weight < 1:
            raise ReputationError("prior mean must be 1..5 stars and prior weight >= 1")
        if self.rating_points + self.activity_points != SCORE_MAX or self.activity_half < 1:
            raise ReputationError(f"rating and activity points must add up to {SCORE_MAX}")
        if list(self.grade_floors) != sorted(self.grade_floors, reverse=True):
            raise ReputationError("grade floors must fall from A to D")
        if list(self.bond_percent) != sorted(self.bond_percent):
            raise ReputationError("bond percentages must rise from A to E")
        if not self.expel_below <= self.fine_below <= self.warn_below <= SCORE_MAX:
            raise ReputationError("need expel_below <= fine_below <= warn_below <= 1000")


@dataclass(frozen=True)
class Participant:
    """One trader's record: ratings received, completed trades, bond and sanctions."""

    name: str
    ratings: int = 0
    stars: int = 0
    trades: int = 0
    bond: int = 0
    warnings: int = 0
    fines: int = 0
    standing: Standing = Standing.ACTIVE


@dataclass(frozen=True)
class TradeRatings:
    """A completed trade awaiting ratings; each side rates the other once."""

    trade_id: str
    buyer: str
    seller: str
    rated_by: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ReputationBook:
    """All participants and open rating slots. Never mutated: operations return a new book."""

    policy: ReputationPolicy = field(default_factory=ReputationPolicy)
    participants: Mapping[str, Participant] = field(default_factory=dict)
    trades: Mapping[str, TradeRatings] = field(default_factory=dict)
    fines_collected: int = 0


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registered:
    name: str


@dataclass(frozen=True)
class BondPosted:
    name: str
    amount: int
    bond: int


@dataclass(frozen=True)
class Rated:
    trade_id: str
    rater: str
    ratee: str
    stars: int
    score: int
    grade: str


@dataclass(frozen=True)
class Warned:
    name: str
    score: int


@dataclass(frozen=True)
class Reinstated:
    name: str
    score: int


@dataclass(frozen=True)
class Fined:
    name: str
    amount: int
    bond: int


@dataclass(frozen=True)
class Expelled:
    name: str
    score: int
    why: str


@dataclass(frozen=True)
class BondCall:
    name: str
    grade: str
    required: int
    posted: int


Event = Registered | BondPosted | Rated | Warned | Reinstated | Fined | Expelled | BondCall


# --- score, grade, bond -------------------------------------------------------------------


def score(policy: ReputationPolicy, p: Participant) -> int:
    """Reputation score 0..1000 (integer fixed point; see the module docstring)."""
    # Quality in milli-stars, floored; then rating points from the 1..5 star range.
    quality = (policy.prior_weight * policy.prior_mean_milli + 1000 * p.stars) // (
        policy.prior_weight + p.ratings
    )
    rating = policy.rating_points * (quality - 1000) // 4000
    activity = policy.activity_points * p.trades // (p.trades + policy.activity_half)
    return rating + activity


def grade(policy: ReputationPolicy, value: int) -> str:
    """Credit grade A..E for a score."""
    for letter, floor in zip(GRADES, policy.grade_floors, strict=False):
        if value >= floor:
            return letter
    return GRADES[-1]


def required_bond(policy: ReputationPolicy, letter: str) -> int:
    """Performance bond (minor units) a participant of grade `letter` must post."""
    if letter not in GRADES:
        raise ReputationError(f"unknown grade {letter!r}")
    return policy.bond_base * policy.bond_percent[GRADES.index(letter)] // 100


def standing_of(book: ReputationBook, name: str) -> tuple[int, str, int]:
    """(score, grade, required bond) of a registered participant."""
    p = _get(book, name)
    value = score(book.policy, p)
    letter = grade(book.policy, value)
    return value, letter, required_bond(book.policy, letter)


def scores(book: ReputationBook) -> dict[str, int]:
    """Every participant's score, e.g. for the listing recommendation (expelled count as 0)."""
    return {
        name: 0 if p.standing == Standing.EXPELLED else score(book.policy, p)
        for name, p in book.participants.items()
    }


def may_trade(book: ReputationBook, name: str) -> bool:
    """True if `name` is registered, not expelled and has posted its grade's bond."""
    p = book.participants.get(name)
    if p is None or p.standing == Standing.EXPELLED:
        return False
    return p.bond >= standing_of(book, name)[2]


def admitted(book: ReputationBook) -> frozenset[str]:
    """Everyone who may trade now (for ListingBook.admitted)."""
    return frozenset(name for name in book.participants if may_trade(book, name))


# --- transitions --------------------------------------------------------------------------


def _get(book: ReputationBook, name: str) -> Participant:
    p = book.participants.get(name)
    if p is None:
        raise UnknownParticipant(f"{name!r} is not registered")
    return p


def _active(book: ReputationBook, name: str) -> Participant:
    p = _get(book, name)
    if p.standing == Standing.EXPELLED:
        raise ParticipantExpelled(f"{name} has been expelled")
    return p


def _with(book: ReputationBook, *people: Participant) -> ReputationBook:
    participants = dict(book.participants)
    for p in people:
        participants[p.name] = p
    return replace(book, participants=participants)


def register(book: ReputationBook, name: str) -> tuple[ReputationBook, tuple[Event, ...]]:
    """Add a newcomer (prior score, no trades, no bond)."""
    if not isinstance(name, str) or not name:
        raise ReputationError(f"participant name must be non-empty text, got {name!r}")
    if name in book.participants:
        raise AlreadyRegistered(f"{name} is already registered")
    return _with(book, Participant(name)), (Registered(name),)


def post_bond(
    book: ReputationBook, name: str, amount: int
) -> tuple[ReputationBook, tuple[Event, ...]]:
    """Add `amount` minor units to the performance bond of `name`."""
    p = _active(book, name)
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ReputationError(f"bond amount must be a positive integer, got {amount!r}")
    p = replace(p, bond=p.bond + amount)
    return _with(book, p), (BondPosted(name, amount, p.bond),)


def record_trade(
    book: ReputationBook, trade_id: str, buyer: str, seller: str
) -> tuple[ReputationBook, tuple[Event, ...]]:
    """A trade between `buyer` and `seller` completed: count it and open its rating slots."""
    if not isinstance(trade_id, str) or not trade_id:
        raise ReputationError(f"trade id must be non-empty text, got {trade_id!r}")
    if trade_id in book.trades:
        raise DuplicateTrade(f"trade {trade_id} is already recorded")
    if buyer == seller:
        raise ReputationError(f"{buyer} cannot trade with itself")
    b = _active(book, buyer)
    s = _active(book, seller)
    trades = dict(book.trades)
    trades[trade_id] = TradeRatings(trade_id, buyer, seller)
    new = _with(book, replace(b, trades=b.trades + 1), replace(s, trades=s.trades + 1))
    return replace(new, trades=trades), ()


def rate(
    book: ReputationBook, trade_id: str, rater: str, stars: int
) -> tuple[ReputationBook, tuple[Event, ...]]:
    """`rater` gives its counterparty in `trade_id` 1..5 stars; the counterparty is reviewed."""
    slot = book.trades.get(trade_id)
    if slot is None:
        raise UnknownTrade(f"no trade {trade_id!r} awaiting ratings")
    if rater not in (slot.buyer, slot.seller):
        raise NotAParty(f"{rater!r} is not a party to trade {trade_id}")
    if rater in slot.rated_by:
        raise AlreadyRated(f"{rater} has already rated trade {trade_id}")
    if isinstance(stars, bool) or not isinstance(stars, int) or not 1 <= stars <= 5:
        raise InvalidRating(f"a rating is 1..5 stars, got {stars!r}")
    ratee = slot.seller if rater == slot.buyer else slot.buyer
    target = _active(book, ratee)
    target = replace(target, ratings=target.ratings + 1, stars=target.stars + stars)
    trades = dict(book.trades)
    rated_by = slot.rated_by | {rater}
    if len(rated_by) == 2:
        del trades[trade_id]
    else:
        trades[trade_id] = replace(slot, rated_by=rated_by)
    book = replace(_with(book, target), trades=trades)
    value, letter, _ = standing_of(book, ratee)
    events: list[Event] = [Rated(trade_id, rater, ratee, stars, value, letter)]
    book, sanctions = review(book, ratee)
    return book, tuple(events) + sanctions


def review(book: ReputationBook, name: str) -> tuple[ReputationBook, tuple[Event, ...]]:
    """Apply warnings, fines, expulsion and bond calls for `name`'s current score."""
    policy = book.policy
    p = _get(book, name)
    if p.standing == Standing.EXPELLED:
        return book, ()
    value = score(policy, p)
    events: list[Event] = []
    collected = book.fines_collected
    expel_why = ""
    if value < policy.warn_below and p.standing == Standing.ACTIVE:
        p = replace(p, standing=Standing.WARNED, warnings=p.warnings + 1)
        events.append(Warned(name, value))
    elif value >= policy.warn_below and p.standing == Standing.WARNED:
        p = replace(p, standing=Standing.ACTIVE)
        events.append(Reinstated(name, value))
    if value < policy.expel_below:
        expel_why = f"score {value} below {policy.expel_below}"
    elif value < policy.fine_below:
        amount = min(policy.fine, p.bond)
        p = replace(p, bond=p.bond - amount, fines=p.fines + 1)
        collected += amount
        events.append(Fined(name, amount, p.bond))
        if amount < policy.fine:
            expel_why = "bond exhausted by fines"
        elif p.fines >= policy.max_fines:
            expel_why = f"{p.fines} fines"
    if expel_why:
        p = replace(p, standing=Standing.EXPELLED)
        events.append(Expelled(name, value, expel_why))
    else:
        letter = grade(policy, value)
        required = required_bond(policy, letter)
        if p.bond < required:
            events.append(BondCall(name, letter, required, p.bond))
    return replace(_with(book, p), fines_collected=collected), tuple(events)
