"""The ledger's replicated state: the rules every transaction must satisfy, applied in order.

`LedgerState` starts from a genesis transaction and applies each block's
transactions; a transaction that breaks a rule raises `TxError` naming the rule.
The same code runs when the aggregator forms a block, when a consensus agent
reviews a proposal and when `ledger verify` replays the whole ledger, so all
three agree by construction. Records are frozen and replaced, never edited, and
the maps that grow with the ledger's history are persistent (`History`), so
`copy()` is a snapshot whose cost does not grow with the ledger: a reviewer
applies a proposal to it and throws it away.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import immutables

from meterchain import reading
from meterchain.errors import MeterChainError, RejectedReading
from meterchain.keys import PublicKey
from meterchain.ledger.merkle import root_of_hashes
from meterchain.ledger.readings import (
    HOUR,
    LedgerReading,
    ReadingFormatError,
    columns,
    payload_fields,
)
from meterchain.ledger.transactions import Tx, TxError, statement
from meterchain.market import certificates as certs
from meterchain.quorum import Member, Membership, QuorumError
from meterchain.registry import Registry, make_meter

# Hours of per-meter register snapshots kept for settlement; older hours are settled.
SNAPSHOT_WINDOW_HOURS = 72
# Hours of market activity kept for re-running suspect reports (M19): five weeks.
ACTIVITY_HOURS = 35 * 24
SELLER_ROLES = frozenset({"microgrid", "generator"})
BUYER_ROLES = frozenset({"microgrid", "consumer"})
VETOABLE = frozenset(
    {"order", "order_change", "clearing", "settlement", "cert_issue", "cert_transfer"}
)

ReadingRow = tuple[bytes, str, int, int, int, int, bytes]

K = TypeVar("K")
V = TypeVar("V")


class History(MutableMapping[K, V]):
    """A dict-like map whose `copy()` is O(1): a persistent HAMT (`immutables.Map`) inside.

    Writes replace the inner map (O(log n), sharing structure), so a copy taken
    before is unaffected; the state's all-history maps use it so a snapshot costs
    the same on day 1 and in year 3.
    """

    __slots__ = ("_map",)

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        self._map: immutables.Map[K, V] = immutables.Map(items or {})

    def __getitem__(self, key: K) -> V:
        return self._map[key]

    def __setitem__(self, key: K, value: V) -> None:
        self._map = self._map.set(key, value)

    def __delitem__(self, key: K) -> None:
        self._map = self._map.delete(key)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __iter__(self) -> Iterator[K]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def get(self, key: K, default: Any = None) -> Any:  # type: ignore[override]
        return self._map.get(key, default)

    def copy(self) -> History[K, V]:
        other: History[K, V] = History.__new__(History)
        other._map = self._map
        return other

    def __repr__(self) -> str:
        return f"History({dict(self._map)!r})"


def _history() -> History[Any, Any]:
    """An empty `History` (a typed default factory for the state's history fields)."""
    return History()


class ReadingSource(Protocol):
    """Committed readings a transaction may consult, each with its (height, tx index)."""

    def reading(self, digest: bytes) -> tuple[LedgerReading, int, int] | None: ...

    def meter_readings(
        self, meter_id: str, after_seq: int, upto_seq: int
    ) -> list[tuple[LedgerReading, int, int]]:
        """A meter's readings with after_seq < seq <= upto_seq, by sequence."""
        ...


class BatchError(TxError):
    """A reading batch does not match its readings; the message names the reading."""


@dataclass(frozen=True)
class Participant:
    id: str
    role: str
    key: PublicKey
    active: bool = True
    exit_mode: str | None = None


@dataclass(frozen=True)
class MeterEntry:
    id: str
    owner: str
    key: PublicKey
    source: str
    active: bool = True


@dataclass(frozen=True)
class Order:
    """A multi-signed trade order (M11/M27) and its current terms."""

    id: str
    seller: str
    buyer: str
    grid: str
    dispatch: str
    energy_wh: int
    price: int  # minor units per kWh
    delivery: int  # hour index
    deposit: int  # minor units per party
    version: int
    status: str  # open, fired, vetoed
    tx: bytes  # hash of the transaction that set the current terms


@dataclass(frozen=True)
class TxRecord:
    height: int
    idx: int
    kind: str
    vetoed_by: bytes | None = None


@dataclass(frozen=True)
class Clearing:
    """A committed clearing: the SC1 request and result bytes for one delivery hour."""

    hour: int
    round: int
    request: bytes
    result: bytes
    tx: bytes


@dataclass
class TxContext:
    """Where a transaction sits and what it may consult while it is applied."""

    height: int
    idx: int
    time: int  # the block's time, Unix seconds
    rows: Sequence[tuple[int, ReadingRow]] = ()  # a reading batch's stored readings
    check_signatures: bool = True
    readings: ReadingSource | None = None


@dataclass
class LedgerState:
    market: str
    regulator: PublicKey
    membership: Membership
    participants: dict[str, Participant] = field(default_factory=dict)
    banned: set[str] = field(default_factory=set)
    meters: dict[str, MeterEntry] = field(default_factory=dict)
    orders: History[str, Order] = field(default_factory=_history)
    # Green certificates (M22): the market contract's immutable registry, replaced on change.
    certificates: certs.CertificateRegistry = field(default_factory=certs.CertificateRegistry)
    clearings: History[int, Clearing] = field(default_factory=_history)
    settlements: History[int, bytes] = field(default_factory=_history)
    txs: History[bytes, TxRecord] = field(default_factory=_history)
    # meter -> hour -> (first seq, first import, first export, last seq, last import, last export)
    snapshots: dict[str, History[int, tuple[int, int, int, int, int, int]]] = field(
        default_factory=dict
    )
    latest_hour: int = 0
    pending_membership: Membership | None = None
    pending_forfeits: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    # The weak centre (M25, M21) and monitoring (M19): records by hour / report hash.
    network: bytes | None = None  # canonical CBOR of the recorded grid network
    congestion: History[int, bytes] = field(default_factory=_history)  # hour -> congestion record
    remedies: History[int, bytes] = field(default_factory=_history)  # hour -> remedy tx hash
    reports: History[bytes, tuple[str, ...]] = field(default_factory=_history)  # report -> suspects
    decisions: History[tuple[bytes, str], bytes] = field(default_factory=_history)
    # What the monitoring contract reads, per hour, for ACTIVITY_HOURS (M19): trade rows
    # and capacity rows; suspect reports are re-run on it. Hours below the floor are gone.
    activity: History[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = field(
        default_factory=_history
    )
    activity_floor: int = 0
    # Remedy inputs by delivery hour (M21): (owner, Wh, price per kWh) storage reserve
    # offers and (holder, seller, buyer, Wh, rate per kWh) transmission rights.
    reserves: dict[int, tuple[tuple[str, int, int], ...]] = field(default_factory=dict)
    rights: dict[int, tuple[tuple[str, str, str, int, int], ...]] = field(default_factory=dict)
    height: int = -1
    time: int = 0
    _registry: Registry | None = None

    # --- construction and snapshots ------------------------------------------------
    @classmethod
    def from_genesis(cls, tx: Tx, market: str) -> LedgerState:
        """The state a genesis transaction founds; checks the regulator signed the membership."""
        if tx.kind != "genesis":
            raise TxError(f"the first transaction must be genesis, not {tx.kind}")
        body = tx.body
        if body["market"] != market:
            raise TxError(f"genesis names market {body['market']!r}, header says {market!r}")
        regulator = _key(body["regulator"], "regulator")
        membership = _membership(market, body["epoch"], body["members"], body["regulator_sig"])
        try:
            membership.verify(regulator)
        except QuorumError as exc:
            raise TxError(f"genesis: {exc}") from exc
        state = cls(market, regulator, membership)
        state.txs[tx.hash] = TxRecord(0, 0, "genesis")
        state.time = body["time"]
        return state

    def copy(self) -> LedgerState:
        """An independent snapshot: records are immutable, history maps persistent (O(1) copy)."""
        other = replace(self)
        other.participants = dict(self.participants)
        other.banned = set(self.banned)
        other.meters = dict(self.meters)
        other.orders = self.orders.copy()
        other.clearings = self.clearings.copy()
        other.settlements = self.settlements.copy()
        other.txs = self.txs.copy()
        other.snapshots = {m: h.copy() for m, h in self.snapshots.items()}
        other.pending_forfeits = {k: list(v) for k, v in self.pending_forfeits.items()}
        other.congestion = self.congestion.copy()
        other.remedies = self.remedies.copy()
        other.reports = self.reports.copy()
        other.decisions = self.decisions.copy()
        other.activity = self.activity.copy()
        other.reserves = dict(self.reserves)
        other.rights = dict(self.rights)
        return other

    def registry(self) -> Registry:
        """The active meters as a `meterchain.registry.Registry` for `reading.verify`."""
        if self._registry is None:
            self._registry = Registry(
                make_meter(m.id, m.key, m.owner, m.source) for m in self.meters.values() if m.active
            )
        return self._registry

    # --- blocks ---------------------------------------------------------------------
    def begin_block(self, height: int, time: int) -> None:
        if time < self.time:
            raise TxError(f"block time {time} is before the previous block's {self.time}")
        self.height = height
        self.time = time

    def end_block(self) -> None:
        """Close a block: every due forfeit must have been recorded; new membership applies."""
        for order, forfeits in sorted(self.pending_forfeits.items()):
            if forfeits:
                party, amount, _ = forfeits[0]
                raise TxError(
                    f"order {order}: deposit forfeit of {amount} by {party} is missing "
                    "from the block that fired it"
                )
        self.pending_forfeits.clear()
        if self.pending_membership is not None:
            self.membership = self.pending_membership
            self.pending_membership = None

    def apply(self, tx: Tx, ctx: TxContext) -> int:
        """Apply one transaction; returns the number of reading signatures checked."""
        if tx.kind == "genesis":
            raise TxError("genesis may only be the first transaction of block 0")
        tx_hash = tx.hash
        if tx_hash in self.txs:
            earlier = self.txs[tx_hash]
            raise TxError(f"replay of the transaction in block {earlier.height} tx {earlier.idx}")
        handler: Callable[[Tx, TxContext], int | None] = getattr(self, f"_apply_{tx.kind}")
        checked = handler(tx, ctx) or 0
        self.txs[tx_hash] = TxRecord(ctx.height, ctx.idx, tx.kind)
        return checked

    # --- regulator-signed records --------------------------------------------------
    def _regulator_signed(self, tx: Tx) -> None:
        if not self.regulator.verify(tx.body["regulator_sig"], tx.statement(self.market)):
            raise TxError("regulator signature does not verify")

    def _apply_membership(self, tx: Tx, ctx: TxContext) -> None:
        body = tx.body
        if body["epoch"] <= self.membership.epoch:
            raise TxError(f"membership epoch {body['epoch']} is not after {self.membership.epoch}")
        membership = _membership(self.market, body["epoch"], body["members"], body["regulator_sig"])
        try:
            membership.verify(self.regulator)
        except QuorumError as exc:
            raise TxError(str(exc)) from exc
        # The block announcing a new membership is still certified by the old one.
        self.pending_membership = membership

    def _apply_participant(self, tx: Tx, ctx: TxContext) -> None:
        self._regulator_signed(tx)
        pid = tx.body["id"]
        if pid in self.banned:
            raise TxError(f"participant {pid} is permanently banned")
        current = self.participants.get(pid)
        if current is not None and current.active:
            raise TxError(f"participant {pid} is already admitted")
        self.participants[pid] = Participant(pid, tx.body["role"], _key(tx.body["key"], "key"))

    def _apply_participant_exit(self, tx: Tx, ctx: TxContext) -> None:
        self._regulator_signed(tx)
        pid, mode = tx.body["id"], tx.body["mode"]
        current = self._active_participant(pid)
        if mode in ("voluntary", "inactive"):
            open_orders = sorted(
                o.id for o in self.orders.values() if o.status == "open" and pid in _parties(o)
            )
            if open_orders:
                raise TxError(f"participant {pid} has open orders {open_orders}: cannot exit")
        self.participants[pid] = replace(current, active=False, exit_mode=mode)
        if mode == "banned":
            self.banned.add(pid)
        for meter in list(self.meters.values()):
            if meter.owner == pid and meter.active:
                self.meters[meter.id] = replace(meter, active=False)
                self._registry = None

    def _apply_meter(self, tx: Tx, ctx: TxContext) -> None:
        self._regulator_signed(tx)
        body = tx.body
        current = self.meters.get(body["id"])
        if current is not None and current.active:
            raise TxError(f"meter {body['id']} is already registered")
        self._active_participant(body["owner"])
        key = _key(body["key"], "key")
        for other in self.meters.values():
            if other.active and other.key.point == key.point:
                raise TxError(f"meter {body['id']}: key already registered to meter {other.id}")
        self.meters[body["id"]] = MeterEntry(body["id"], body["owner"], key, body["source"])
        self._registry = None
        if body["source"] in reading.RENEWABLE_SOURCES:
            known = self.certificates.meters.get(body["id"])
            if known is None:
                self.certificates, _ = certs.register_meter(
                    self.certificates, body["id"], body["owner"], body["source"]
                )
            elif (known.owner, known.source) != (body["owner"], body["source"]):
                # Certificates already issued name the first owner; a meter id is not reused.
                raise TxError(f"meter {body['id']} earned certificates for {known.owner} before")

    def _apply_meter_exit(self, tx: Tx, ctx: TxContext) -> None:
        self._regulator_signed(tx)
        meter = self.meters.get(tx.body["id"])
        if meter is None or not meter.active:
            raise TxError(f"meter {tx.body['id']} is not registered")
        self.meters[meter.id] = replace(meter, active=False)
        self._registry = None

    def _apply_veto(self, tx: Tx, ctx: TxContext) -> None:
        self._regulator_signed(tx)
        target = tx.body["target"]
        record = self.txs.get(target)
        if record is None:
            raise TxError(f"veto target {target.hex()[:16]} is not a recorded transaction")
        if record.kind not in VETOABLE:
            raise TxError(f"a {record.kind} transaction cannot be vetoed")
        if record.vetoed_by is not None:
            raise TxError(f"transaction {target.hex()[:16]} is already vetoed")
        if record.kind in ("order", "order_change"):
            order = next((o for o in self.orders.values() if o.tx == target), None)
            if order is None or order.status != "open":
                raise TxError(
                    f"veto target {target.hex()[:16]} is not the current terms of an open order"
                    " (a recorded trade is never modified)"
                )
            self.orders[order.id] = replace(order, status="vetoed")
        self.txs[target] = replace(record, vetoed_by=tx.hash)

    # --- readings ---------------------------------------------------------------------
    def _apply_readings(self, tx: Tx, ctx: TxContext) -> int:
        body = tx.body
        hour, rows = body["hour"], ctx.rows
        if len(rows) != body["count"]:
            raise BatchError(f"holds {len(rows)} readings, the batch says {body['count']}")
        registry = self.registry() if ctx.check_signatures else None
        leaves: list[bytes] = []
        sha256 = hashlib.sha256
        meters = self.meters
        prev: tuple[str, int] = ("", -1)
        checked = 0
        # Per meter: first and last (seq, import, export) in this batch, for the hour snapshot.
        runs: list[list[Any]] = []
        run: list[Any] = []
        # The hot loop of `ledger verify`: keep it to hashing, one decode and comparisons.
        for i, (pos, row) in enumerate(rows):
            digest, meter_id, seq, time, imp, exp, cose = row
            if pos != i:
                raise BatchError(f"reading position {pos} where {i} was expected")
            if sha256(cose).digest() != digest:
                raise BatchError(f"reading {i}: stored digest does not match its signed bytes")
            try:
                signed_columns = columns(cose)
            except ReadingFormatError as exc:
                raise BatchError(f"reading {i}: {exc}") from exc
            if signed_columns != row[1:6]:
                names = [
                    name
                    for name, a, b in zip(
                        ("meter_id", "seq", "time", "import_wh", "export_wh"),
                        signed_columns,
                        row[1:6],
                        strict=True,
                    )
                    if a != b
                ]
                verb = "does" if len(names) == 1 else "do"
                raise BatchError(
                    f"reading {i}: stored {', '.join(names)} {verb} not match its signed bytes"
                )
            if time // HOUR != hour:
                raise BatchError(f"reading {i} ({meter_id}:{seq}) is not in hour {hour}")
            if (meter_id, seq) <= prev:
                raise BatchError(f"reading {i} ({meter_id}:{seq}) is out of (meter, seq) order")
            if meter_id != prev[0]:
                # A new meter's run of readings (the batch is sorted by meter, then seq).
                meter = meters.get(meter_id)
                if meter is None or not meter.active:
                    raise BatchError(f"reading {i}: meter {meter_id} is not registered")
                if run:
                    runs.append(run)
                run = [meter_id, seq, imp, exp, seq, imp, exp]
            else:
                run[4:7] = seq, imp, exp
            prev = (meter_id, seq)
            if registry is not None:
                try:
                    reading.verify(cose, registry)
                except RejectedReading as exc:
                    raise BatchError(f"reading {i} ({meter_id}:{seq}): {exc}") from exc
                checked += 1
            leaves.append(sha256(b"\x00" + digest).digest())
        if run:
            runs.append(run)
        if root_of_hashes(leaves) != body["root"]:
            raise BatchError("Merkle root mismatch")
        for meter_id, *ends in runs:
            self._snapshot(meter_id, hour, *ends)
        day = self.latest_hour // 24
        self.latest_hour = max(self.latest_hour, hour)
        if self.latest_hour // 24 != day:
            self._drop_unreadable_snapshots(ctx.time // HOUR)
        return checked

    def _snapshot(
        self, meter_id: str, hour: int, s0: int, i0: int, e0: int, s1: int, i1: int, e1: int
    ) -> None:
        """Merge a meter's first and last readings of a batch into its hour snapshot."""
        hours = self.snapshots.get(meter_id)
        if hours is None:  # not setdefault: that would build a History for every call
            hours = self.snapshots[meter_id] = History()
        cur = hours.get(hour)
        if cur is None:
            hours[hour] = (s0, i0, e0, s1, i1, e1)
            return
        first = (s0, i0, e0) if s0 < cur[0] else cur[:3]
        last = (s1, i1, e1) if s1 > cur[3] else cur[3:]
        hours[hour] = (*first, *last)

    def _drop_unreadable_snapshots(self, block_hour: int) -> None:
        """Keep of each meter's hour snapshots only what a settlement or a contract can still read.

        The energy of hour H reads the snapshot of H (or the latest before it) and
        the latest before H. Hours below `floor` are never asked for again: a
        clearing is recorded before its hour ends and an order or its change names a
        delivery hour not yet begun, so every hour still to be settled or fired is
        an unsettled clearing's, an open order's, or from the block's hour on; and
        a settled hour's remedies (M21) read its energy again as long as its
        reserves and rights are kept, SNAPSHOT_WINDOW_HOURS behind the latest hour.
        Below the floor a meter keeps only its latest snapshot (the start of its
        next energy), so the state stays bounded by meters x open hours, not
        meters x ledger hours, with every energy it can still give unchanged.
        Runs when the readings reach a new day: the same blocks on every member.
        """
        floor = min(
            [
                block_hour,
                self.latest_hour - SNAPSHOT_WINDOW_HOURS,
                *(h for h in self.clearings if h not in self.settlements),
                *(o.delivery for o in self.orders.values() if o.status == "open"),
            ]
        )
        for hours in self.snapshots.values():
            for h in sorted(h for h in hours if h < floor)[:-1]:
                del hours[h]

    def meter_energy(self, meter_id: str, hour: int) -> tuple[int, int]:
        """Imported and exported Wh of one meter in `hour`, from its cumulative registers."""
        hours = self.snapshots.get(meter_id, {})
        end = max((h for h in hours if h <= hour), default=None)
        if end is None:
            return 0, 0
        before = max((h for h in hours if h < hour), default=None)
        last = hours[end]
        if before is not None:
            start = hours[before][4], hours[before][5]
        elif end == hour:
            start = last[1], last[2]
        else:
            return 0, 0
        return max(0, last[4] - start[0]), max(0, last[5] - start[1])

    def metered(self, hour: int) -> dict[str, dict[str, int]]:
        """Metered Wh per participant in `hour`: import, export and renewable (green) export."""
        totals: dict[str, dict[str, int]] = {}
        for meter in sorted(self.meters.values(), key=lambda m: m.id):
            if meter.id not in self.snapshots:
                continue
            imp, exp = self.meter_energy(meter.id, hour)
            t = totals.setdefault(meter.owner, {"import_wh": 0, "export_wh": 0, "green_wh": 0})
            t["import_wh"] += imp
            t["export_wh"] += exp
            if meter.source in reading.RENEWABLE_SOURCES:
                t["green_wh"] += exp
        return totals

    # --- market results -------------------------------------------------------------
    def _apply_clearing(self, tx: Tx, ctx: TxContext) -> None:
        from meterchain.ledger import settle

        body = tx.body
        if body["hour"] in self.clearings:
            raise TxError(f"hour {body['hour']} already has a committed clearing")
        if (body["hour"] + 1) * HOUR <= ctx.time:
            raise TxError(f"hour {body['hour']} is over: its clearing comes too late")
        settle.check_clearing(self.market, self.membership, body)
        self.clearings[body["hour"]] = Clearing(
            body["hour"], body["round"], body["request"], body["result"], tx.hash
        )

    def _apply_settlement(self, tx: Tx, ctx: TxContext) -> None:
        from meterchain.ledger import settle

        body = tx.body
        hour = body["hour"]
        if hour in self.settlements:
            raise TxError(f"hour {hour} is already settled")
        if ctx.time < (hour + 1) * HOUR:
            raise TxError(f"hour {hour} cannot be settled before it has ended")
        clearing = self.clearings.get(hour)
        if clearing is None or clearing.tx != body["clearing"]:
            raise TxError(f"settlement of hour {hour} does not refer to its committed clearing")
        if self.txs[clearing.tx].vetoed_by is not None:
            raise TxError(f"the clearing of hour {hour} was vetoed; it cannot be settled")
        request, result = settle.committed_clearing(self, hour)
        metered = settle.metered_for(self, hour, request, result)
        if settle.encode_metered(metered) != body["metered"]:
            raise TxError(
                f"metered values of hour {hour} differ from those the ledger's readings give"
            )
        if settle.execute(request, result, metered) != body["result"]:
            raise TxError(f"re-executed settlement of hour {hour} differs from the recorded one")
        self.settlements[hour] = tx.hash
        self._prune_snapshots()
        self._record_activity(hour, clearing, body)

    # --- the weak centre (M24, M25, M21) and violation monitoring (M19) -----------------
    def _apply_grid_network(self, tx: Tx, ctx: TxContext) -> None:
        from meterchain.ledger.weakcentre import network_from

        self._regulator_signed(tx)
        network_from(tx.body["network"])
        self.network = tx.body["network"]

    def _apply_congestion(self, tx: Tx, ctx: TxContext) -> None:
        from meterchain.ledger.weakcentre import check_congestion

        check_congestion(self, dict(tx.body))
        self.congestion[tx.body["hour"]] = tx.body["record"]

    def _apply_remedy(self, tx: Tx, ctx: TxContext) -> None:
        from meterchain.ledger.weakcentre import check_remedy

        check_remedy(self, dict(tx.body))
        self.remedies[tx.body["hour"]] = tx.hash

    def _record_activity(
        self, hour: int, clearing: Clearing, settlement: Mapping[str, Any]
    ) -> None:
        """Keep what the monitoring contract reads of a settled hour (M19)."""
        from meterchain.ledger.monitor import clearing_rows
        from meterchain.market.congestion import Adjustment

        record = self.congestion.get(hour)
        cuts = Adjustment.from_cbor(record).cuts if record else ()
        kept = [c.kept_wh for c in cuts] if cuts else None  # a price notice cuts nothing
        trades, capacity = clearing_rows(hour, clearing.result, kept, settlement)
        earlier = self.activity.get(hour, ((), ()))
        self.activity[hour] = (earlier[0] + trades, earlier[1] + capacity)
        floor = self.latest_hour - ACTIVITY_HOURS
        for old in [h for h in self.activity if h < floor]:
            del self.activity[old]
            self.activity_floor = max(self.activity_floor, old + 1)

    def monitoring_activity(self, from_hour: int, to_hour: int, related: Any = ()) -> Any:
        """The monitor's input (`meterchain.market.monitoring.Activity`) for a window of hours."""
        from meterchain.market.monitoring import Activity

        if from_hour < self.activity_floor:
            raise TxError(f"hours before {self.activity_floor} are past the monitoring window")
        hours = [h for h in sorted(self.activity) if from_hour <= h < to_hour]
        trades = tuple(t for h in hours for t in self.activity[h][0])
        capacity = tuple(c for h in hours for c in self.activity[h][1])
        return Activity(from_hour, to_hour, trades, capacity, (), tuple(related))

    def _future_hour(self, tx: Tx, ctx: TxContext) -> int:
        hour = tx.body["hour"]
        if hour * HOUR < ctx.time:
            raise TxError(f"delivery hour {hour} has already begun")
        return hour

    def _apply_reserve_offer(self, tx: Tx, ctx: TxContext) -> None:
        b = tx.body
        self._owner_signed(tx, b["owner"])
        hour = self._future_hour(tx, ctx)
        if b["energy_wh"] == 0:
            raise TxError("a reserve offer needs energy")
        offer = (b["owner"], b["energy_wh"], b["price"])
        self.reserves[hour] = (*self.reserves.get(hour, ()), offer)

    def _apply_transmission_right(self, tx: Tx, ctx: TxContext) -> None:
        b = tx.body
        self._owner_signed(tx, b["holder"])
        hour = self._future_hour(tx, ctx)
        self._active_participant(b["seller"], SELLER_ROLES)
        self._active_participant(b["buyer"], BUYER_ROLES)
        if b["seller"] == b["buyer"] or b["energy_wh"] == 0:
            raise TxError("a transmission right covers energy of a trade between two parties")
        right = (b["holder"], b["seller"], b["buyer"], b["energy_wh"], b["rate"])
        self.rights[hour] = (*self.rights.get(hour, ()), right)

    def _apply_suspect_report(self, tx: Tx, ctx: TxContext) -> None:
        from meterchain.market.monitoring import MonitoringError, check_report, parse_suspect_report

        try:
            report = parse_suspect_report(tx.body["report"])
        except MonitoringError as exc:
            raise TxError(f"suspect report: {exc}") from exc
        if report["to_hour"] * HOUR > ctx.time:
            raise TxError("suspect report covers hours that have not ended")
        related = [tuple(pair) for pair in report["related"]]
        try:
            activity = self.monitoring_activity(report["from_hour"], report["to_hour"], related)
            check_report(activity, report)
        except MonitoringError as exc:
            raise TxError(f"suspect report: {exc}") from exc
        self.reports[tx.hash] = tuple(row[0] for row in report["suspects"])

    def _apply_regulator_decision(self, tx: Tx, ctx: TxContext) -> None:
        self._regulator_signed(tx)
        b = tx.body
        suspects = self.reports.get(b["report"])
        if suspects is None:
            raise TxError(f"report {b['report'].hex()[:16]} is not a recorded suspect report")
        if b["participant"] not in suspects:
            raise TxError(f"participant {b['participant']} is not a suspect of that report")
        if (b["report"], b["participant"]) in self.decisions:
            raise TxError(f"the regulator already decided on {b['participant']} for that report")
        if (b["action"] == "fine") != (b["fine"] > 0):
            raise TxError("a fine needs a positive amount, and only a fine has one")
        if b["action"] == "expel":
            current = self._active_participant(b["participant"])
            self.participants[current.id] = replace(current, active=False, exit_mode="expelled")
            for meter in list(self.meters.values()):
                if meter.owner == current.id and meter.active:
                    self.meters[meter.id] = replace(meter, active=False)
                    self._registry = None
        self.decisions[(b["report"], b["participant"])] = tx.hash

    def _prune_snapshots(self) -> None:
        oldest = self.latest_hour - SNAPSHOT_WINDOW_HOURS
        for hours in self.snapshots.values():
            for h in [h for h in hours if h < oldest]:
                del hours[h]
        for by_hour in (self.reserves, self.rights):  # remedy inputs of settled hours (M21)
            for h in [h for h in by_hour if h < oldest]:
                del by_hour[h]

    # --- trade orders (M11, M27) and the contract client (M26) -------------------------
    def _active_participant(self, pid: str, roles: frozenset[str] | None = None) -> Participant:
        p = self.participants.get(pid)
        if p is None or not p.active:
            raise TxError(f"participant {pid} is not admitted")
        if roles is not None and p.role not in roles:
            raise TxError(f"participant {pid} is a {p.role}, not one of {sorted(roles)}")
        return p

    def _check_order_signatures(
        self, tx: Tx, buyer: str, seller: str, grid: str, dispatch: str
    ) -> None:
        message = tx.statement(self.market)
        if not self.regulator.verify(tx.body["audit"], message):
            raise TxError("the trading centre's audit signature does not verify")
        dispatcher = self._active_participant(dispatch, frozenset({"dispatch"}))
        if not dispatcher.key.verify(tx.body["security"], message):
            raise TxError(f"the dispatch centre {dispatch}'s security check does not verify")
        signatures: Mapping[str, bytes] = tx.body["signatures"]
        need = {buyer, seller, grid}
        if set(signatures) != need:
            missing = sorted(need - set(signatures))
            extra = sorted(set(signatures) - need)
            raise TxError(
                f"order needs signatures of {sorted(need)}: missing {missing}, extra {extra}"
            )
        for party in sorted(need):
            if not self._active_participant(party).key.verify(signatures[party], message):
                raise TxError(f"signature of {party} does not verify")

    def _apply_order(self, tx: Tx, ctx: TxContext) -> None:
        b = tx.body
        if b["id"] in self.orders:
            raise TxError(f"order {b['id']} already exists")
        if b["seller"] == b["buyer"]:
            raise TxError("seller and buyer must differ")
        if b["creator"] not in (b["seller"], b["buyer"]):
            raise TxError(f"creator {b['creator']} is neither the seller nor the buyer")
        if b["energy_wh"] == 0:
            raise TxError("order energy must be positive")
        if b["created"] > ctx.time:
            raise TxError("order is created after the block that records it")
        if b["delivery"] * HOUR < ctx.time:
            raise TxError(f"delivery hour {b['delivery']} has already begun")
        self._active_participant(b["seller"], SELLER_ROLES)
        self._active_participant(b["buyer"], BUYER_ROLES)
        self._active_participant(b["grid"], frozenset({"grid"}))
        self._check_order_signatures(tx, b["buyer"], b["seller"], b["grid"], b["dispatch"])
        self.orders[b["id"]] = Order(
            b["id"], b["seller"], b["buyer"], b["grid"], b["dispatch"], b["energy_wh"],
            b["price"], b["delivery"], b["deposit"], 0, "open", tx.hash,
        )  # fmt: skip

    def _apply_order_change(self, tx: Tx, ctx: TxContext) -> None:
        b = tx.body
        order = self.orders.get(b["order"])
        if order is None:
            raise TxError(f"order {b['order']} does not exist")
        if order.status != "open":
            raise TxError(f"order {order.id} is {order.status}; it can no longer change")
        if b["version"] != order.version + 1:
            raise TxError(f"order {order.id} change must be version {order.version + 1}")
        if order.delivery * HOUR <= ctx.time or b["delivery"] * HOUR < ctx.time:
            raise TxError(f"order {order.id}: delivery has begun, terms are fixed")
        if b["energy_wh"] == 0:
            raise TxError("order energy must be positive")
        # A change needs every original signer again (M27).
        self._check_order_signatures(tx, order.buyer, order.seller, order.grid, order.dispatch)
        self.orders[order.id] = replace(
            order,
            energy_wh=b["energy_wh"],
            price=b["price"],
            delivery=b["delivery"],
            version=b["version"],
            tx=tx.hash,
        )

    def _apply_contract_fire(self, tx: Tx, ctx: TxContext) -> None:
        from meterchain.ledger.contracts import order_outcome

        b = tx.body
        order = self.orders.get(b["order"])
        if order is None or order.status != "open":
            raise TxError(f"order {b['order']} is not open")
        outcome = order_outcome(self, order, ctx.time)
        if outcome is None:
            raise TxError(f"order {order.id} is not due before hour {order.delivery + 2}")
        got = (b["delivered_wh"], b["payment"], b["refund"])
        want = (outcome.delivered_wh, outcome.payment, outcome.refund)
        if got != want:
            raise TxError(
                f"order {order.id}: fired with delivered/payment/refund {got}, "
                f"the contract gives {want}"
            )
        self.orders[order.id] = replace(order, status="fired")
        from meterchain.ledger.monitor import order_row

        row = order_row(
            order.delivery,
            order.seller,
            order.buyer,
            order.energy_wh,
            order.price,
            b["delivered_wh"],
        )
        earlier = self.activity.get(order.delivery, ((), ()))
        self.activity[order.delivery] = (earlier[0] + (row,), earlier[1])
        self.pending_forfeits[order.id] = list(outcome.forfeits)

    def _apply_deposit_forfeit(self, tx: Tx, ctx: TxContext) -> None:
        b = tx.body
        due = self.pending_forfeits.get(b["order"])
        if not due:
            raise TxError(f"order {b['order']}: no deposit forfeit is due")
        party, amount, reason = due[0]
        if (b["party"], b["amount"], b["reason"]) != (party, amount, reason):
            raise TxError(
                f"order {b['order']}: forfeit {b['party']}/{b['amount']} differs from the "
                f"contract's {party}/{amount} ({reason})"
            )
        due.pop(0)

    # --- green certificates (M22) -------------------------------------------------------
    def _count_readings(
        self, meter_id: str, to_seq: int, source: ReadingSource | None, height: int
    ) -> tuple[certs.CertificateRegistry, list[str]]:
        """The certificate registry after counting a meter's readings up to `to_seq`, and
        the ids of the certificates they earn."""
        meter = self.meters.get(meter_id)
        if meter is None or not meter.active:
            raise TxError(f"meter {meter_id} is not registered")
        account = self.certificates.accounts.get(meter.id)
        if account is None:
            raise TxError(f"meter {meter.id} is {meter.source}, not a renewable source")
        if to_seq <= account.last_seq:
            raise TxError(f"meter {meter.id}: readings up to seq {account.last_seq} are counted")
        if source is None:
            raise TxError("certificate issue needs the ledger's readings to check its origin")
        found = source.meter_readings(meter.id, account.last_seq, to_seq)
        # Only readings of earlier blocks count, so the block former (which sees only
        # committed blocks) and a later verification count exactly the same readings.
        counted = [_cert_reading(r) for r, h, _ in found if h < height]
        if not counted or counted[-1].seq != to_seq:
            raise TxError(f"meter {meter.id}: reading seq {to_seq} is not on the ledger")
        try:
            registry, events = certs.issue_from_readings(self.certificates, counted)
        except certs.CertificateError as exc:
            raise TxError(str(exc)) from exc
        return registry, [e.certificate.cert_id for e in events if isinstance(e, certs.Issued)]

    def earnable_certificates(
        self, meter_id: str, to_seq: int, source: ReadingSource, height: int
    ) -> list[str]:
        """Certificate ids an issue up to `to_seq` in block `height` would create (none: [])."""
        try:
            return self._count_readings(meter_id, to_seq, source, height)[1]
        except TxError:
            return []

    def _apply_cert_issue(self, tx: Tx, ctx: TxContext) -> None:
        """Count a renewable meter's committed readings up to `to_seq`; record what they earn."""
        b = tx.body
        registry, issued = self._count_readings(b["meter"], b["to_seq"], ctx.readings, ctx.height)
        if issued != b["certs"]:
            raise TxError(
                f"meter {b['meter']}: the readings earn {issued}, the issue says {b['certs']}"
            )
        self.certificates = registry

    def _owner_signed(self, tx: Tx, owner: str) -> None:
        holder = self._active_participant(owner)
        if not holder.key.verify(tx.body["owner_sig"], statement(self.market, tx.kind, tx.body)):
            raise TxError(f"signature of owner {owner} does not verify")

    def _apply_cert_transfer(self, tx: Tx, ctx: TxContext) -> None:
        b = tx.body
        self._active_participant(b["to"])
        self._owner_signed(tx, b["from"])
        registry = self.certificates
        try:
            for cert_id in _distinct(b["certs"]):
                registry, _ = certs.transfer(registry, cert_id, b["from"], b["to"])
        except certs.CertificateError as exc:
            raise TxError(str(exc)) from exc
        self.certificates = registry

    def _apply_cert_retire(self, tx: Tx, ctx: TxContext) -> None:
        b = tx.body
        self._owner_signed(tx, b["owner"])
        registry = self.certificates
        try:
            for cert_id in _distinct(b["certs"]):
                registry, _ = certs.retire(registry, cert_id, b["owner"], b["period"])
        except certs.CertificateError as exc:
            raise TxError(str(exc)) from exc
        self.certificates = registry

    # --- queries ---------------------------------------------------------------------
    def certificate_balances(self) -> dict[str, dict[str, int]]:
        """Per owner: certificates held (not retired) and retired."""
        out: dict[str, dict[str, int]] = {}
        for cert in self.certificates.certificates.values():
            entry = out.setdefault(cert.owner, {"held": 0, "retired": 0})
            entry["retired" if cert.retired else "held"] += 1
        return out


@dataclass(frozen=True)
class _CertReading:
    """A committed reading as the certificate contract reads it (register, flags, source)."""

    meter_id: str
    seq: int
    digest: bytes
    export_wh: int
    source: object
    counter_reset: bool


def _cert_reading(r: LedgerReading) -> _CertReading:
    fields = payload_fields(r.cose)
    flags = fields.get(7, 0)
    reset = isinstance(flags, int) and bool(flags & reading.FLAG_COUNTER_RESET)
    return _CertReading(r.meter_id, r.seq, r.digest, r.export_wh, fields.get(8), reset)


def _distinct(items: Sequence[str]) -> Sequence[str]:
    if len(set(items)) != len(items):
        raise TxError("a certificate is listed twice")
    return items


def _parties(order: Order) -> tuple[str, str]:
    return order.seller, order.buyer


def _key(point: bytes, what: str) -> PublicKey:
    try:
        return PublicKey.from_point(point)
    except MeterChainError as exc:
        raise TxError(f"{what}: {exc}") from exc


def _membership(market: str, epoch: int, members: Any, signature: bytes) -> Membership:
    try:
        return Membership(
            market,
            epoch,
            tuple(Member(node, _key(point, f"member {node}")) for node, point in members),
            signature,
        )
    except QuorumError as exc:
        raise TxError(str(exc)) from exc


def membership_fields(membership: Membership) -> dict[str, Any]:
    """The epoch/members/regulator_sig fields of a genesis or membership transaction."""
    return {
        "epoch": membership.epoch,
        "members": [[m.node_id, m.public_key.point] for m in membership.members],
        "regulator_sig": membership.regulator_signature,
    }
