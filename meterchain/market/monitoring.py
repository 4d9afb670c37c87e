"""Violation monitoring (M19): indicators per participant over a window and a fixed scoring model.

Any node can run it on the same ledger data and gets the same report:
``monitor(activity, model=CURRENT) -> MonitoringReport``. Pure, integers only.

Indicators (per mille of the participant's own activity in the window):

* ``deviation`` -- share of its sales that delivered less than
  ``1 - deviation_tolerance`` of the contracted energy (repeated deviations);
* ``wash`` -- share of its traded energy that went to or came from a related
  account (``Activity.related``), or that came straight back in the same hour
  (A sells to B and B sells to A: a round trip that moves money, not energy);
* ``price_outlier`` -- share of its trades, in hours with at least
  ``min_hour_trades`` trades, priced more than ``outlier_k`` robust deviations
  (median absolute deviation, at least ``price_floor`` per kWh) from the
  hour's median price;
* ``unpaid`` -- share of the money it owed that it did not pay;
* ``withheld`` -- share of its spare green energy (metered) that it did not
  offer to the market.

The scoring model is a fixed linear threshold classifier over hinge features:
each indicator earns ``weight * clamp((value - low) / (high - low), 0, 1)``
points (integer arithmetic), and a participant whose points reach
``threshold`` is a suspect. An indicator is only scored with at least
``min_events`` events behind it, so one unlucky hour cannot make a suspect.
The parameters are part of the contract: a model is named by its version
and identified by the digest of its parameters, ``MODELS`` holds the
released ones, and ``model_for(version, digest)`` refuses a model whose
parameters differ from the released version (no silent retraining: a new
calibration is a new version).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from meterchain import codec
from meterchain.errors import CodecError
from meterchain.market.errors import MarketError

INDICATORS = ("deviation", "wash", "price_outlier", "unpaid", "withheld")
PER_MILLE = 1000


class MonitoringError(MarketError):
    """Monitoring input or model is malformed, or a model is not the released one."""


@dataclass(frozen=True)
class TradeRow:
    """One executed trade: seller -> buyer, contracted and delivered Wh, price per kWh."""

    hour: int
    seller: str
    buyer: str
    energy_wh: int
    price_per_kwh: int
    delivered_wh: int


@dataclass(frozen=True)
class CapacityRow:
    """A participant's metered spare green energy in an hour and what it offered (Wh)."""

    hour: int
    participant: str
    spare_wh: int
    offered_wh: int


@dataclass(frozen=True)
class PaymentRow:
    """Money a participant owed for an hour and what it paid (minor units)."""

    hour: int
    payer: str
    due: int
    paid: int


def _uint(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MonitoringError(f"{what} must be an integer >= 0, got {value!r}")


def _name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise MonitoringError(f"{what} must be a non-empty id, got {value!r}")


@dataclass(frozen=True)
class Activity:
    """Everything the monitor looks at for one window of hours ``[from_hour, to_hour)``."""

    from_hour: int
    to_hour: int
    trades: tuple[TradeRow, ...] = ()
    capacity: tuple[CapacityRow, ...] = ()
    payments: tuple[PaymentRow, ...] = ()
    related: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _uint(self.from_hour, "from_hour")
        _uint(self.to_hour, "to_hour")
        if self.to_hour <= self.from_hour:
            raise MonitoringError(f"window [{self.from_hour}, {self.to_hour}) is empty")
        for rows, cls in ((self.trades, TradeRow), (self.capacity, CapacityRow),
                          (self.payments, PaymentRow)):  # fmt: skip
            if not isinstance(rows, tuple) or not all(isinstance(r, cls) for r in rows):
                raise MonitoringError(f"activity rows must be a tuple of {cls.__name__} records")
        for t in self.trades:
            _name(t.seller, "trade seller")
            _name(t.buyer, "trade buyer")
            for f in ("hour", "energy_wh", "price_per_kwh", "delivered_wh"):
                _uint(getattr(t, f), f"trade {t.seller}->{t.buyer} {f}")
            if t.seller == t.buyer:
                raise MonitoringError(f"trade {t.seller}->{t.buyer}: parties must differ")
            if t.delivered_wh > t.energy_wh:
                raise MonitoringError(
                    f"trade {t.seller}->{t.buyer} hour {t.hour}: delivered {t.delivered_wh} Wh "
                    f"> contracted {t.energy_wh} Wh"
                )
        for c in self.capacity:
            _name(c.participant, "capacity participant")
            for f in ("hour", "spare_wh", "offered_wh"):
                _uint(getattr(c, f), f"capacity of {c.participant} {f}")
        for p in self.payments:
            _name(p.payer, "payment payer")
            for f in ("hour", "due", "paid"):
                _uint(getattr(p, f), f"payment of {p.payer} {f}")
        for pair in self.related:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise MonitoringError(f"related accounts {pair!r} must be two different ids")
            _name(pair[0], "related account")
            _name(pair[1], "related account")
        for row in (*self.trades, *self.capacity, *self.payments):
            if not self.from_hour <= row.hour < self.to_hour:
                raise MonitoringError(
                    f"hour {row.hour} is outside the window [{self.from_hour}, {self.to_hour})"
                )

    @property
    def participants(self) -> tuple[str, ...]:
        names = {t.seller for t in self.trades} | {t.buyer for t in self.trades}
        names |= {c.participant for c in self.capacity} | {p.payer for p in self.payments}
        return tuple(sorted(names))


@dataclass(frozen=True)
class Ramp:
    """One indicator's hinge: no points at or below ``low``, ``weight`` points at ``high``."""

    low: int
    high: int
    weight: int


@dataclass(frozen=True)
class ScoringModel:
    """The monitoring contract's fixed parameters (per mille, points, counts)."""

    version: str
    ramps: tuple[tuple[str, Ramp], ...]
    threshold: int
    deviation_tolerance: int  # per mille of contracted energy a sale may miss
    outlier_k: int  # robust deviations from the hour's median
    price_floor: int  # least robust deviation, minor units per kWh
    min_hour_trades: int
    min_events: int

    def __post_init__(self) -> None:
        names = tuple(name for name, _ in self.ramps)
        if names != INDICATORS:
            raise MonitoringError(f"model {self.version}: ramps must be {list(INDICATORS)}")
        for name, r in self.ramps:
            if not 0 <= r.low < r.high <= PER_MILLE or r.weight < 0:
                raise MonitoringError(f"model {self.version}: ramp {name} is out of range")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "ramps": [[n, r.low, r.high, r.weight] for n, r in self.ramps],
            "threshold": self.threshold,
            "deviation_tolerance": self.deviation_tolerance,
            "outlier_k": self.outlier_k,
            "price_floor": self.price_floor,
            "min_hour_trades": self.min_hour_trades,
            "min_events": self.min_events,
        }

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the canonical parameters: what a suspect report names."""
        return codec.digest(self.to_dict())


# Calibrated on seeded markets (tests/market/test_violation_monitoring.py): one clear abuse
# alone reaches the threshold, two half-strength ones together do too.
M19_V1 = ScoringModel(
    version="m19-v1",
    ramps=(
        ("deviation", Ramp(200, 400, 600)),
        ("wash", Ramp(150, 350, 600)),
        ("price_outlier", Ramp(170, 300, 600)),
        ("unpaid", Ramp(100, 140, 600)),
        ("withheld", Ramp(200, 400, 600)),
    ),
    threshold=500,
    deviation_tolerance=200,
    outlier_k=4,
    price_floor=200,
    min_hour_trades=5,
    min_events=6,
)
MODELS: dict[str, ScoringModel] = {M19_V1.version: M19_V1}
CURRENT = M19_V1


def model_for(version: str, digest: bytes) -> ScoringModel:
    """The released model ``version``, refused unless its parameters have ``digest``."""
    model = MODELS.get(version)
    if model is None:
        raise MonitoringError(f"unknown monitoring model {version!r} (known: {sorted(MODELS)})")
    if model.digest != digest:
        raise MonitoringError(
            f"monitoring model {version} has other parameters than the released one "
            "(a recalibrated model needs a new version)"
        )
    return model


@dataclass(frozen=True)
class ParticipantScore:
    """A participant's indicator values (per mille), event counts, points and verdict."""

    participant: str
    values: tuple[int, ...]  # in INDICATORS order
    events: tuple[int, ...]
    points: tuple[int, ...]
    score: int
    suspect: bool

    @property
    def reasons(self) -> tuple[str, ...]:
        """The indicators that earned points, strongest first."""
        ranked = sorted(zip(self.points, INDICATORS, strict=True), key=lambda pn: (-pn[0], pn[1]))
        return tuple(name for pts, name in ranked if pts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "participant": self.participant,
            "indicators": dict(zip(INDICATORS, self.values, strict=True)),
            "events": dict(zip(INDICATORS, self.events, strict=True)),
            "score": self.score,
            "suspect": self.suspect,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class MonitoringReport:
    """The monitor's output for one window; ``suspects`` is what goes to the regulator."""

    model_version: str
    model_digest: bytes
    from_hour: int
    to_hour: int
    scores: tuple[ParticipantScore, ...]
    related: tuple[tuple[str, str], ...] = field(default=())

    @property
    def suspects(self) -> tuple[ParticipantScore, ...]:
        return tuple(s for s in self.scores if s.suspect)

    def suspect_dict(self) -> dict[str, Any]:
        """The canonical suspect report: window, model, the related accounts it was given and
        each suspect's indicator values and events (INDICATORS order)."""
        return {
            "model": self.model_version,
            "model_digest": self.model_digest,
            "from_hour": self.from_hour,
            "to_hour": self.to_hour,
            "related": [list(pair) for pair in self.related],
            "suspects": [
                [s.participant, s.score, list(s.values), list(s.events)] for s in self.suspects
            ],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model_version,
            "model_digest": self.model_digest.hex(),
            "window": [self.from_hour, self.to_hour],
            "participants": [s.to_dict() for s in self.scores],
            "suspects": [s.participant for s in self.suspects],
        }


def _median(values: Sequence[int]) -> int:
    """Lower median of integers (deterministic, no float)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def _ratio(part: int, whole: int) -> int:
    return part * PER_MILLE // whole if whole else 0


def _related(pairs: Iterable[tuple[str, str]]) -> set[frozenset[str]]:
    return {frozenset(p) for p in pairs}


def indicator_values(
    activity: Activity, model: ScoringModel
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per participant: (indicator values per mille, events behind each), INDICATORS order."""
    people = activity.participants
    zero = dict.fromkeys(people, 0)
    sales, short_sales = dict(zero), dict(zero)
    traded_wh, wash_wh, trades_n = dict(zero), dict(zero), dict(zero)
    priced_n, outliers = dict(zero), dict(zero)
    related = _related(activity.related)
    by_hour: dict[int, list[TradeRow]] = {}
    for t in activity.trades:
        by_hour.setdefault(t.hour, []).append(t)
        if t.energy_wh:
            sales[t.seller] += 1
            if t.delivered_wh * PER_MILLE < t.energy_wh * (PER_MILLE - model.deviation_tolerance):
                short_sales[t.seller] += 1
        for party in (t.seller, t.buyer):
            traded_wh[party] += t.energy_wh
            trades_n[party] += 1
        if frozenset((t.seller, t.buyer)) in related:
            wash_wh[t.seller] += t.energy_wh
            wash_wh[t.buyer] += t.energy_wh
    for rows in by_hour.values():
        flows: dict[tuple[str, str], int] = {}
        for t in rows:
            flows[(t.seller, t.buyer)] = flows.get((t.seller, t.buyer), 0) + t.energy_wh
        for (a, b), wh in flows.items():
            back = flows.get((b, a), 0)
            if back and a < b and frozenset((a, b)) not in related:
                round_trip = 2 * min(wh, back)  # both legs of the loop
                wash_wh[a] += round_trip
                wash_wh[b] += round_trip
        if len(rows) < model.min_hour_trades:
            continue
        median = _median([t.price_per_kwh for t in rows])
        spread = max(model.price_floor, _median([abs(t.price_per_kwh - median) for t in rows]))
        for t in rows:
            far = abs(t.price_per_kwh - median) > model.outlier_k * spread
            for party in (t.seller, t.buyer):
                priced_n[party] += 1
                outliers[party] += far
    spare, withheld, capacity_n = dict(zero), dict(zero), dict(zero)
    for c in activity.capacity:
        if c.spare_wh:
            spare[c.participant] += c.spare_wh
            withheld[c.participant] += max(0, c.spare_wh - c.offered_wh)
            capacity_n[c.participant] += 1
    due, unpaid, payments_n = dict(zero), dict(zero), dict(zero)
    for p in activity.payments:
        if p.due:
            due[p.payer] += p.due
            unpaid[p.payer] += max(0, p.due - p.paid)
            payments_n[p.payer] += 1
    out = {}
    for name in people:
        values = (
            _ratio(short_sales[name], sales[name]),
            min(PER_MILLE, _ratio(wash_wh[name], traded_wh[name])),
            _ratio(outliers[name], priced_n[name]),
            _ratio(unpaid[name], due[name]),
            _ratio(withheld[name], spare[name]),
        )
        events = (sales[name], trades_n[name], priced_n[name], payments_n[name], capacity_n[name])
        out[name] = (values, events)
    return out


def score(
    model: ScoringModel, values: Sequence[int], events: Sequence[int]
) -> tuple[tuple[int, ...], int]:
    """Points per indicator and their sum under ``model`` (integers)."""
    points = []
    for (_, ramp), value, n in zip(model.ramps, values, events, strict=True):
        if n < model.min_events:
            points.append(0)
            continue
        over = min(max(value - ramp.low, 0), ramp.high - ramp.low)
        points.append(ramp.weight * over // (ramp.high - ramp.low))
    return tuple(points), sum(points)


def monitor(activity: Activity, model: ScoringModel = CURRENT) -> MonitoringReport:
    """Score every participant of ``activity`` and name the suspects (module doc)."""
    scores = []
    for name, (values, events) in sorted(indicator_values(activity, model).items()):
        points, total = score(model, values, events)
        scores.append(
            ParticipantScore(name, values, events, points, total, total >= model.threshold)
        )
    return MonitoringReport(
        model.version,
        model.digest,
        activity.from_hour,
        activity.to_hour,
        tuple(scores),
        tuple(sorted((min(a, b), max(a, b)) for a, b in activity.related)),
    )


def settled_hour_rows(
    hour: int,
    trades: Sequence[tuple[str, str, int, int]],
    cuts: Sequence[int] | None,
    deliveries: Sequence[Sequence[Any]],
    metered: Sequence[Sequence[Any]],
) -> tuple[tuple[TradeRow, ...], tuple[CapacityRow, ...]]:
    """What a settled clearing hour tells the monitor (the ledger's view, M19).

    ``trades``: the cleared (seller, buyer, Wh, price per kWh); ``cuts``: the Wh
    kept of each after the weak centre's congestion cut, or None; ``deliveries``
    and ``metered``: the settlement's rows ([seller, buyer, cleared, delivered]
    and [microgrid, green generation, green demand, ...]). A cut is neither a
    deviation (the contracted energy is what was kept) nor withholding (the
    seller offered what it cleared).
    """
    rows, offered = [], {}
    kept = list(cuts) if cuts is not None else [wh for _, _, wh, _ in trades]
    for (seller, buyer, wh, price), keep, delivery in zip(trades, kept, deliveries, strict=True):
        offered[seller] = offered.get(seller, 0) + wh
        if keep:
            rows.append(TradeRow(hour, seller, buyer, keep, max(0, price), min(keep, delivery[3])))
    capacity = tuple(
        CapacityRow(hour, row[0], max(0, row[1] - row[2]), offered.get(row[0], 0))
        for row in metered
    )
    return tuple(rows), capacity


def parse_suspect_report(data: bytes) -> dict[str, Any]:
    """A recorded suspect report (``MonitoringReport.suspect_dict`` as canonical CBOR), checked
    for shape and for naming a released model; raises MonitoringError."""
    try:
        value = codec.decode(data)
    except CodecError as exc:
        raise MonitoringError(f"suspect report is not canonical CBOR: {exc}") from exc
    keys = {"model", "model_digest", "from_hour", "to_hour", "related", "suspects"}
    if not isinstance(value, dict) or set(value) != keys:
        raise MonitoringError(f"a suspect report must be a map with keys {sorted(keys)}")
    if not isinstance(value["model"], str) or not isinstance(value["model_digest"], bytes):
        raise MonitoringError("a suspect report names its model by version and digest")
    model_for(value["model"], value["model_digest"])
    _uint(value["from_hour"], "from_hour")
    _uint(value["to_hour"], "to_hour")
    if value["to_hour"] <= value["from_hour"]:
        raise MonitoringError("a suspect report's window is empty")
    related = value["related"]
    if not isinstance(related, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and x for x in p)
        for p in related
    ):
        raise MonitoringError("a suspect report's related accounts are pairs of ids")
    rows = value["suspects"]
    if not isinstance(rows, list) or not rows:
        raise MonitoringError("a suspect report lists at least one suspect")
    for row in rows:
        if (
            not isinstance(row, list)
            or len(row) != 4
            or not isinstance(row[0], str)
            or not row[0]
            or not all(isinstance(v, list) and len(v) == len(INDICATORS) for v in row[2:])
        ):
            raise MonitoringError(f"malformed suspect row {row!r}")
        for v in (row[1], *row[2], *row[3]):
            _uint(v, f"suspect {row[0]} value")
    if len({row[0] for row in rows}) != len(rows):
        raise MonitoringError("a suspect report names a participant twice")
    return value


def check_report(activity: Activity, recorded: Mapping[str, Any]) -> None:
    """A node's check of a recorded suspect report: re-run the monitor, compare exactly."""
    model = model_for(recorded.get("model", ""), recorded.get("model_digest", b""))
    mine = monitor(activity, model).suspect_dict()
    if mine != dict(recorded):
        raise MonitoringError("suspect report differs from the monitoring contract's result")


__all__ = [
    "CURRENT",
    "INDICATORS",
    "MODELS",
    "Activity",
    "CapacityRow",
    "MonitoringError",
    "MonitoringReport",
    "ParticipantScore",
    "PaymentRow",
    "ScoringModel",
    "TradeRow",
    "check_report",
    "indicator_values",
    "model_for",
    "monitor",
    "parse_suspect_report",
    "score",
    "settled_hour_rows",
]
