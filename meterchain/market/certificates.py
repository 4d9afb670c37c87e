"""Green certificates (M22): issuance from verified renewable readings, transfer, single
retirement, renewable-quota compliance with shortfall fines, and a one-way certificate
market built on the listing book.

Issuance. Registered renewable meters earn one certificate per `unit_wh` (default
1 MWh) of verified generation. `issue` takes records (meter_id, seq, digest,
energy_wh, source): the interval energy of one verified signed reading and the
digest of its signed bytes; `issue_from_readings` takes verified readings
themselves (meterchain.reading.Reading) and derives the interval energy from the
rise of their cumulative export register. Energy below a whole unit carries over per meter, so
nothing is lost, and every certificate lists the exact share of each reading it
was made from (a reading may be split between two certificates); summed over a
meter's certificates and its carry, the shares give back every reading's energy.
A reading is counted once: its seq must exceed the meter's last counted seq.

Lifecycle. A certificate belongs to one participant; it can be transferred while
active and not on offer, and retired once (for a compliance period) by its owner;
a retired certificate can be neither transferred nor retired again.

Quota. A participant must cover num/den of its consumption in a period with
certificates it retired for that period; each whole or part certificate short
costs a fine. Shortfalls are covered by buying on the certificate market, where
only renewable generators list (one-way) and a take transfers the certificates
and pays the seller at once.

All state is immutable; every operation returns a new registry plus events and
raises a CertificateError subclass (leaving its input untouched) when refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from meterchain.market import listing as book_ops
from meterchain.market.errors import MarketError
from meterchain.market.listing import (
    BookRules,
    CancelListing,
    Closed,
    Deposit,
    ListingBook,
    PostListing,
    Side,
    TakeListing,
    Taken,
    Tick,
)
from meterchain.reading import RENEWABLE_SOURCES

UNIT_WH = 1_000_000


class CertificateError(MarketError):
    """A certificate request was refused; subclasses say why."""

    reason = "certificate"


class UnregisteredMeter(CertificateError):
    reason = "unregistered_meter"


class NotRenewable(CertificateError):
    reason = "not_renewable"


class WrongSource(CertificateError):
    reason = "wrong_source"


class ReadingAlreadyCounted(CertificateError):
    reason = "reading_already_counted"


class BadRecord(CertificateError):
    reason = "bad_record"


class UnknownCertificate(CertificateError):
    reason = "unknown_certificate"


class NotCertificateOwner(CertificateError):
    reason = "not_certificate_owner"


class CertificateRetired(CertificateError):
    reason = "certificate_retired"


class AlreadyRetired(CertificateRetired):
    reason = "already_retired"


class CertificateOnOffer(CertificateError):
    reason = "certificate_on_offer"


class AlreadyAssessed(CertificateError):
    reason = "already_assessed"


class NotAGenerator(CertificateError):
    reason = "not_a_generator"


class GenerationRecord(Protocol):
    """What issuance needs from a verified reading (meterchain.reading's type qualifies if it
    carries these attributes; `energy_wh` is the interval generation the reading closes)."""

    @property
    def meter_id(self) -> str: ...

    @property
    def seq(self) -> int: ...

    @property
    def digest(self) -> bytes: ...

    @property
    def energy_wh(self) -> int: ...

    @property
    def source(self) -> str: ...


class RegisterReading(Protocol):
    """A verified reading with cumulative registers, as meterchain.reading.Reading is."""

    @property
    def meter_id(self) -> str: ...

    @property
    def seq(self) -> int: ...

    @property
    def digest(self) -> bytes: ...

    @property
    def export_wh(self) -> int: ...

    @property
    def source(self) -> str: ...

    @property
    def counter_reset(self) -> bool: ...


@dataclass(frozen=True)
class MeteredGeneration:
    """A plain GenerationRecord: one verified reading's interval generation."""

    meter_id: str
    seq: int
    digest: bytes
    energy_wh: int
    source: str


@dataclass(frozen=True)
class ReadingShare:
    """The part (Wh) of one signed reading (by digest and seq) a certificate was made from."""

    digest: bytes
    seq: int
    energy_wh: int


@dataclass(frozen=True)
class RenewableMeter:
    meter_id: str
    owner: str
    source: str


@dataclass(frozen=True)
class MeterAccount:
    """Issuance progress of one meter: last counted seq, uncertified shares, certificates made."""

    last_seq: int = -1
    carry: tuple[ReadingShare, ...] = ()
    issued: int = 0
    export_wh: int | None = None  # last export register seen (issue_from_readings only)

    @property
    def carry_wh(self) -> int:
        return sum(s.energy_wh for s in self.carry)


@dataclass(frozen=True)
class Certificate:
    """One certificate: `energy_wh` of `source` energy from `meter_id`, traceable to readings."""

    cert_id: str
    meter_id: str
    source: str
    owner: str
    energy_wh: int
    readings: tuple[ReadingShare, ...]
    retired_by: str | None = None
    retired_for: int | None = None
    on_offer: str | None = None

    @property
    def retired(self) -> bool:
        return self.retired_by is not None


@dataclass(frozen=True)
class CertificateRegistry:
    """Registered renewable meters, issuance progress and every certificate ever issued."""

    unit_wh: int = UNIT_WH
    meters: Mapping[str, RenewableMeter] = field(default_factory=dict)
    accounts: Mapping[str, MeterAccount] = field(default_factory=dict)
    certificates: Mapping[str, Certificate] = field(default_factory=dict)
    assessed: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.unit_wh, bool) or not isinstance(self.unit_wh, int) or self.unit_wh < 1:
            raise CertificateError(f"certificate unit must be positive integer Wh: {self.unit_wh}")

    def holdings(self, owner: str) -> tuple[Certificate, ...]:
        """Active (not retired) certificates of `owner`, by id."""
        return tuple(
            c for _, c in sorted(self.certificates.items()) if c.owner == owner and not c.retired
        )


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeterRegistered:
    meter: RenewableMeter


@dataclass(frozen=True)
class Issued:
    certificate: Certificate


@dataclass(frozen=True)
class Rebaselined:
    """A meter's export register was taken as the new starting point (no energy counted)."""

    meter_id: str
    seq: int
    export_wh: int
    why: str


@dataclass(frozen=True)
class Transferred:
    cert_id: str
    sender: str
    recipient: str


@dataclass(frozen=True)
class Retired:
    cert_id: str
    owner: str
    period: int


@dataclass(frozen=True)
class Compliance:
    """Quota outcome for one participant and period (energy in Wh, fine in minor units)."""

    participant: str
    period: int
    consumption_wh: int
    required_wh: int
    covered_wh: int
    shortfall_wh: int
    shortfall_certificates: int
    fine: int


@dataclass(frozen=True)
class Assessed:
    compliance: Compliance


Event = MeterRegistered | Issued | Rebaselined | Transferred | Retired | Assessed


# --- registry operations ------------------------------------------------------------------


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or value.startswith("@"):
        raise CertificateError(f"{what} must be a non-empty name not starting with '@': {value!r}")
    return value


def register_meter(
    registry: CertificateRegistry, meter_id: str, owner: str, source: str
) -> tuple[CertificateRegistry, tuple[Event, ...]]:
    """Register a renewable meter of `source` type owned by `owner`."""
    _name(meter_id, "meter id")
    _name(owner, "owner")
    if source not in RENEWABLE_SOURCES:
        raise NotRenewable(f"source {source!r} is not renewable ({sorted(RENEWABLE_SOURCES)})")
    if meter_id in registry.meters:
        raise CertificateError(f"meter {meter_id} is already registered")
    meter = RenewableMeter(meter_id, owner, source)
    meters = dict(registry.meters)
    meters[meter_id] = meter
    accounts = dict(registry.accounts)
    accounts[meter_id] = MeterAccount()
    return replace(registry, meters=meters, accounts=accounts), (MeterRegistered(meter),)


def _check_identity(
    registry: CertificateRegistry, meter_id: str, seq: object, digest: object, source: str
) -> RenewableMeter:
    meter = registry.meters.get(meter_id)
    if meter is None:
        raise UnregisteredMeter(f"meter {meter_id!r} is not a registered renewable meter")
    if source != meter.source:
        raise WrongSource(f"meter {meter_id} is registered as {meter.source}, got {source!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise BadRecord(f"meter {meter_id}: seq must be an integer >= 0, got {seq!r}")
    if not isinstance(digest, bytes) or not digest:
        raise BadRecord(f"meter {meter_id} seq {seq}: digest must be non-empty bytes")
    return meter


def _accrue(
    meter: RenewableMeter,
    account: MeterAccount,
    share: ReadingShare,
    unit: int,
    certificates: dict[str, Certificate],
    events: list[Event],
) -> MeterAccount:
    """Add one reading's energy to the meter's carry and cut whole certificates from it."""
    if share.seq <= account.last_seq:
        raise ReadingAlreadyCounted(
            f"meter {meter.meter_id}: seq {share.seq} is not after the last counted seq "
            f"{account.last_seq}"
        )
    carry = list(account.carry)
    if share.energy_wh:
        carry.append(share)
    issued = account.issued
    while sum(s.energy_wh for s in carry) >= unit:
        parts: list[ReadingShare] = []
        need = unit
        while need:
            head = carry[0]
            used = min(head.energy_wh, need)
            parts.append(ReadingShare(head.digest, head.seq, used))
            need -= used
            if used == head.energy_wh:
                carry.pop(0)
            else:
                carry[0] = ReadingShare(head.digest, head.seq, head.energy_wh - used)
        issued += 1
        cert = Certificate(
            cert_id=f"{meter.meter_id}-{issued}",
            meter_id=meter.meter_id,
            source=meter.source,
            owner=meter.owner,
            energy_wh=unit,
            readings=tuple(parts),
        )
        certificates[cert.cert_id] = cert
        events.append(Issued(cert))
    return replace(account, last_seq=share.seq, carry=tuple(carry), issued=issued)


def issue(
    registry: CertificateRegistry, records: Iterable[GenerationRecord]
) -> tuple[CertificateRegistry, tuple[Event, ...]]:
    """Count verified generation records (in the order given) and issue whole certificates.

    All or nothing: one bad record (unregistered meter, wrong source, seq not after
    the meter's last, malformed fields) refuses the whole batch.
    """
    accounts = dict(registry.accounts)
    certificates = dict(registry.certificates)
    events: list[Event] = []
    for record in records:
        meter = _check_identity(registry, record.meter_id, record.seq, record.digest, record.source)
        energy = record.energy_wh
        if isinstance(energy, bool) or not isinstance(energy, int) or energy < 0:
            raise BadRecord(f"meter {meter.meter_id} seq {record.seq}: energy must be Wh >= 0")
        share = ReadingShare(record.digest, record.seq, energy)
        accounts[meter.meter_id] = _accrue(
            meter, accounts[meter.meter_id], share, registry.unit_wh, certificates, events
        )
    return replace(registry, accounts=accounts, certificates=certificates), tuple(events)


def issue_from_readings(
    registry: CertificateRegistry, readings: Iterable[RegisterReading]
) -> tuple[CertificateRegistry, tuple[Event, ...]]:
    """Issue from verified readings' cumulative export registers (meterchain.reading.Reading).

    A generator meter's output is its export register; a reading's energy is the
    rise of that register since the meter's previous counted reading, credited to
    this reading's digest. The first reading of a meter only sets the baseline, and
    so does a reading flagged counter-reset (the energy since the last reading is
    unknown, and a certificate must never claim energy nobody measured): both give a
    Rebaselined event. A register lower than before without the flag is refused
    (the sequence guard refuses it too). All or nothing, like `issue`.
    """
    accounts = dict(registry.accounts)
    certificates = dict(registry.certificates)
    events: list[Event] = []
    for r in readings:
        meter = _check_identity(registry, r.meter_id, r.seq, r.digest, r.source)
        register = r.export_wh
        if isinstance(register, bool) or not isinstance(register, int) or register < 0:
            raise BadRecord(f"meter {meter.meter_id} seq {r.seq}: export register must be Wh >= 0")
        account = accounts[meter.meter_id]
        if account.export_wh is None or r.counter_reset:
            if r.seq <= account.last_seq:
                raise ReadingAlreadyCounted(
                    f"meter {meter.meter_id}: seq {r.seq} is not after the last counted seq "
                    f"{account.last_seq}"
                )
            why = "first reading" if account.export_wh is None else "counter reset"
            accounts[meter.meter_id] = replace(account, last_seq=r.seq, export_wh=register)
            events.append(Rebaselined(meter.meter_id, r.seq, register, why))
            continue
        if register < account.export_wh:
            raise BadRecord(
                f"meter {meter.meter_id} seq {r.seq}: export register {register} below "
                f"{account.export_wh} without the counter-reset flag"
            )
        share = ReadingShare(r.digest, r.seq, register - account.export_wh)
        account = _accrue(meter, account, share, registry.unit_wh, certificates, events)
        accounts[meter.meter_id] = replace(account, export_wh=register)
    return replace(registry, accounts=accounts, certificates=certificates), tuple(events)


def _certificate(registry: CertificateRegistry, cert_id: str) -> Certificate:
    cert = registry.certificates.get(cert_id)
    if cert is None:
        raise UnknownCertificate(f"no certificate {cert_id!r}")
    return cert


def _movable(registry: CertificateRegistry, cert_id: str, owner: str) -> Certificate:
    cert = _certificate(registry, cert_id)
    if cert.owner != owner:
        raise NotCertificateOwner(f"{owner!r} does not own certificate {cert_id}")
    if cert.retired:
        raise AlreadyRetired(f"certificate {cert_id} was retired by {cert.retired_by}")
    if cert.on_offer is not None:
        raise CertificateOnOffer(f"certificate {cert_id} is on offer in listing {cert.on_offer}")
    return cert


def _put(registry: CertificateRegistry, *certs: Certificate) -> CertificateRegistry:
    certificates = dict(registry.certificates)
    for cert in certs:
        certificates[cert.cert_id] = cert
    return replace(registry, certificates=certificates)


def transfer(
    registry: CertificateRegistry, cert_id: str, sender: str, recipient: str
) -> tuple[CertificateRegistry, tuple[Event, ...]]:
    """Move an active certificate from its owner `sender` to `recipient`."""
    cert = _movable(registry, cert_id, sender)
    _name(recipient, "recipient")
    if recipient == sender:
        raise CertificateError(f"{sender} cannot transfer certificate {cert_id} to itself")
    new = _put(registry, replace(cert, owner=recipient))
    return new, (Transferred(cert_id, sender, recipient),)


def retire(
    registry: CertificateRegistry, cert_id: str, owner: str, period: int
) -> tuple[CertificateRegistry, tuple[Event, ...]]:
    """Retire a certificate for compliance `period`; only its owner can, and only once."""
    cert = _movable(registry, cert_id, owner)
    if isinstance(period, bool) or not isinstance(period, int) or period < 0:
        raise CertificateError(f"compliance period must be an integer >= 0, got {period!r}")
    new = _put(registry, replace(cert, retired_by=owner, retired_for=period))
    return new, (Retired(cert_id, owner, period),)


def trace(registry: CertificateRegistry, cert_id: str) -> tuple[ReadingShare, ...]:
    """The signed readings (digest, seq, Wh used) a certificate was issued from."""
    return _certificate(registry, cert_id).readings


@dataclass(frozen=True)
class QuotaPolicy:
    """Renewable quota share_num/share_den of consumption; fine per certificate short (minor)."""

    share_num: int
    share_den: int
    fine_per_certificate: int

    def __post_init__(self) -> None:
        values = (self.share_num, self.share_den, self.fine_per_certificate)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise CertificateError("quota policy values must be integers >= 0")
        if self.share_den == 0 or self.share_num > self.share_den:
            raise CertificateError("quota share must be a fraction num/den with 0 <= num <= den")


def compliance(
    registry: CertificateRegistry,
    participant: str,
    period: int,
    consumption_wh: int,
    policy: QuotaPolicy,
) -> Compliance:
    """The quota position of `participant` for `period` (query, changes nothing)."""
    if isinstance(consumption_wh, bool) or not isinstance(consumption_wh, int):
        raise CertificateError(f"consumption must be integer Wh, got {consumption_wh!r}")
    if consumption_wh < 0:
        raise CertificateError(f"consumption must be >= 0 Wh, got {consumption_wh}")
    required = -(-consumption_wh * policy.share_num // policy.share_den)
    covered = sum(
        c.energy_wh
        for c in registry.certificates.values()
        if c.retired_by == participant and c.retired_for == period
    )
    shortfall = max(0, required - covered)
    short_certs = -(-shortfall // registry.unit_wh)
    return Compliance(
        participant=participant,
        period=period,
        consumption_wh=consumption_wh,
        required_wh=required,
        covered_wh=covered,
        shortfall_wh=shortfall,
        shortfall_certificates=short_certs,
        fine=short_certs * policy.fine_per_certificate,
    )


def assess(
    registry: CertificateRegistry,
    participant: str,
    period: int,
    consumption_wh: int,
    policy: QuotaPolicy,
) -> tuple[CertificateRegistry, tuple[Event, ...]]:
    """Close `participant`'s quota for `period`: fix the fine; a second assessment is refused."""
    _name(participant, "participant")
    if (participant, period) in registry.assessed:
        raise AlreadyAssessed(f"{participant} was already assessed for period {period}")
    result = compliance(registry, participant, period, consumption_wh, policy)
    new = replace(registry, assessed=registry.assessed | {(participant, period)})
    return new, (Assessed(result),)


# --- the one-way certificate market ---------------------------------------------------------


@dataclass(frozen=True)
class CertificateMarket:
    """Certificate registry plus a sell-only listing book priced per certificate.

    The book keeps this market's own cash balances (participants deposit first).
    `offers` maps each open listing to the certificates still on offer, in order.
    """

    registry: CertificateRegistry
    book: ListingBook
    offers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


MarketEvent = Event | book_ops.Event


def certificate_market(
    registry: CertificateRegistry, *, period_s: int = 3600, max_periods_ahead: int = 24 * 30
) -> CertificateMarket:
    """A market where listings for period P stay open until P starts (default up to 30 days)."""
    rules = BookRules(
        period_s=period_s,
        max_periods_ahead=max_periods_ahead,
        quantity_per_price=1,
        sides=frozenset({Side.SELL}),
        settle_on_take=True,
    )
    return CertificateMarket(registry=registry, book=ListingBook(rules=rules))


def _through_book(
    market: CertificateMarket,
    request: book_ops.Request,
    registry: CertificateRegistry | None = None,
    offered: Sequence[str] = (),
) -> tuple[CertificateMarket, tuple[MarketEvent, ...]]:
    """Apply one book request, then mirror its effects on the certificates."""
    book, book_events = book_ops.apply(market.book, request)
    registry = market.registry if registry is None else registry
    offers = dict(market.offers)
    events: list[MarketEvent] = list(book_events)
    for event in book_events:
        if isinstance(event, book_ops.Listed):
            offers[event.listing.listing_id] = tuple(offered)
        elif isinstance(event, Taken):
            take = event.take
            on_offer = offers.get(take.listing_id)
            if on_offer is None:
                raise CertificateError(f"listing {take.listing_id} carries no certificates")
            moved = [
                replace(registry.certificates[c], owner=take.buyer, on_offer=None)
                for c in on_offer[: take.quantity]
            ]
            registry = _put(registry, *moved)
            offers[take.listing_id] = on_offer[take.quantity :]
            events.extend(Transferred(c.cert_id, take.seller, take.buyer) for c in moved)
        elif isinstance(event, Closed):
            rest = offers.pop(event.listing_id, ())
            registry = _put(
                registry, *(replace(registry.certificates[c], on_offer=None) for c in rest)
            )
    return CertificateMarket(registry=registry, book=book, offers=offers), tuple(events)


def deposit(
    market: CertificateMarket, *, time: int, seq: int, party: str, amount: int
) -> tuple[CertificateMarket, tuple[MarketEvent, ...]]:
    """Put `amount` minor units into `party`'s certificate-market balance."""
    return _through_book(market, Deposit(time, seq, party, amount))


def offer_certificates(
    market: CertificateMarket,
    *,
    time: int,
    seq: int,
    seller: str,
    cert_ids: Sequence[str],
    price: int,
    period: int,
) -> tuple[CertificateMarket, tuple[MarketEvent, ...]]:
    """A renewable generator lists its certificates at `price` minor units each until `period`."""
    registry = market.registry
    if not any(m.owner == seller for m in registry.meters.values()):
        raise NotAGenerator(f"{seller!r} owns no registered renewable meter")
    if not cert_ids or len(set(cert_ids)) != len(cert_ids):
        raise CertificateError("an offer lists one or more distinct certificates")
    certs = [_movable(registry, c, seller) for c in cert_ids]
    listing_id = f"L{market.book.listing_count + 1}"
    locked = _put(registry, *(replace(c, on_offer=listing_id) for c in certs))
    request = PostListing(time, seq, seller, Side.SELL, period, len(cert_ids), price)
    return _through_book(market, request, registry=locked, offered=tuple(cert_ids))


def buy_certificates(
    market: CertificateMarket, *, time: int, seq: int, buyer: str, listing_id: str, count: int
) -> tuple[CertificateMarket, tuple[MarketEvent, ...]]:
    """Take `count` certificates from a listing: the buyer pays and receives them at once."""
    return _through_book(market, TakeListing(time, seq, buyer, listing_id, count))


def cancel_offer(
    market: CertificateMarket, *, time: int, seq: int, seller: str, listing_id: str
) -> tuple[CertificateMarket, tuple[MarketEvent, ...]]:
    """Withdraw the rest of a listing; its certificates come off offer."""
    return _through_book(market, CancelListing(time, seq, seller, listing_id))


def tick(
    market: CertificateMarket, *, time: int, seq: int
) -> tuple[CertificateMarket, tuple[MarketEvent, ...]]:
    """Let time pass: expired listings release their certificates."""
    return _through_book(market, Tick(time, seq))
