"""The one ingest path: signed reading bytes in, verified energy in SQLite out, exactly once.

The MQTT subscriber, the Modbus gateway and the benchmark all go through the
same two steps: `Ingest.check` decodes and verifies a reading
(`reading.verify` against the registry); `Ingest.commit` then, in one SQLite
transaction for a whole batch, passes each verified reading through the
sequence guard (replay, out-of-order, counters running backwards,
byte-identical duplicates) and folds it into hourly energy. Only after the
commit are the results returned, so callers acknowledge nothing that is not
on disk. A byte-identical copy of an accepted reading (an MQTT redelivery
after a crash, a board resending from its spool) is a `duplicate`: it is
acknowledged and changes nothing, which is what makes the accounting
exactly-once.

End-to-end delivery (edge_agent.delivery): for the meters of its own
microgrid the ingest keeps a watermark, the highest sequence handled without
a gap, advanced in the same transaction; a reading above a gap is deferred
(`DEFERRED`: not committed, the board sends it again). After the commit,
`on_watermarks` gets the watermark of every own meter in the batch, which the
broker link publishes as the acknowledgement that lets boards free their
spools. A reading refused for good (bad signature, counter rule, ...) counts
as handled; every refused reading is kept in the store's rejection log with
its bytes, so nothing a board frees is silently dropped. An unknown meter or
a clock too far ahead is not final (the registry or the clock may catch
up): such readings are logged and not acknowledged.

Rejected readings are counted by reason and logged calmly: ERROR the first
time a meter shows a reason, DEBUG while it repeats, INFO when the meter's
next reading is accepted.

The registry can be replaced while readings flow (`set_registry`, the
agent's reload): a reading checked against the old one may still be on its
way to `commit`, so a commit checks again the readings of every meter whose
entry changed or went (a re-keyed meter's old signatures fail; a removed
meter's readings are not final and stay on the board), and each commit
reads one registry from start to end.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cbor2 import CBORTag

from edge_agent.delivery import DEFAULT_GAP_HOLD_S, Watermarks
from edge_agent.store import AgentStore, Rejection
from meterchain import codec
from meterchain.calm import CalmLog
from meterchain.errors import CodecError, DuplicateReading, MeterChainError, RejectedReading
from meterchain.reading import DEFAULT_MAX_CLOCK_AHEAD_S, FLAG_GATEWAY_ATTESTED, Reading, verify
from meterchain.registry import Registry
from meterchain.sequence import Admission, MeterState

log = logging.getLogger("meterchain.agent.ingest")


class Guard(Protocol):
    """The sequence guard (meterchain.sequence.SequenceGuard) on the store's connection."""

    def state(self, meter_id: str) -> MeterState | None: ...

    def admit_many(
        self, readings: Iterable[Reading], *, received: int | None = None
    ) -> list[Admission | RejectedReading]:
        """Record each reading in the open transaction, or say which RejectedReading it is."""
        ...

    def committed(self) -> None:
        """The transaction holding the last `admit_many` committed."""
        ...


_COSE_TAGS = frozenset({codec.COSE_SIGN1_TAG})
VERIFIED_CACHE = 50_000  # recent verified readings (~30 MB) whose resends skip the check
# Refusals that may not hold later: the registry can gain the meter, the clock can catch up.
NOT_FINAL = frozenset({"unknown_meter", "clock_skew"})


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    DEFERRED = "deferred"  # above a sequence gap: not committed, the board sends it again


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reading: Reading | None = None
    reason: str = ""
    detail: str = ""
    owner: str = ""  # the accepted reading's microgrid
    payload: bytes = field(default=b"", repr=False)  # the bytes a refusal was about


def claimed_identity(payload: bytes) -> tuple[str, int] | None:
    """The (meter id, seq) a COSE_Sign1 reading claims, unverified; None if unreadable.

    Only canonical bytes count, as a board sends them (meterchain.codec).
    """
    try:
        envelope = codec.decode(payload, tags=_COSE_TAGS)
        if not isinstance(envelope, CBORTag) or envelope.tag != codec.COSE_SIGN1_TAG:
            return None
        parts = envelope.value
        if not isinstance(parts, list | tuple) or len(parts) != 4 or type(parts[2]) is not bytes:
            return None
        fields = codec.decode(parts[2])
    except CodecError:
        return None
    if not isinstance(fields, Mapping):
        return None
    meter_id, seq = fields.get(1), fields.get(2)
    if type(meter_id) is not str or type(seq) is not int or not 0 <= seq < 1 << 64:
        return None
    return meter_id, seq


class IngestObserver(Protocol):
    """Where outcomes go after the commit (metrics)."""

    def accepted(self, reading: Reading, owner: str) -> None: ...

    def duplicate(self, reading: Reading) -> None: ...

    def rejected(self, reason: str) -> None: ...

    def deferred(self, reason: str) -> None: ...


@dataclass
class IngestCounts:
    """A plain observer: totals by outcome and rejection reason (tests, benchmark)."""

    accepted_n: int = 0
    duplicate_n: int = 0
    deferred_n: int = 0

    def __post_init__(self) -> None:
        self.rejected_by_reason: dict[str, int] = {}

    def accepted(self, reading: Reading, owner: str) -> None:
        self.accepted_n += 1

    def duplicate(self, reading: Reading) -> None:
        self.duplicate_n += 1

    def rejected(self, reason: str) -> None:
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1

    def deferred(self, reason: str) -> None:
        self.deferred_n += 1


class Ingest:
    """Verify, guard and persist readings; one instance per writer thread.

    `acknowledge` names the microgrid whose meters this agent acknowledges
    (None: no end-to-end delivery, every gap accepted); `on_watermarks`
    receives {meter_id: watermark} after each commit. Gaps are timed on
    `monotonic` (real seconds, like a board's ack timeout), not the market clock.
    """

    def __init__(
        self,
        store: AgentStore,
        registry: Registry,
        guard: Guard,
        *,
        observer: IngestObserver | None = None,
        clock: Callable[[], float] = time.time,
        max_clock_ahead_s: int = DEFAULT_MAX_CLOCK_AHEAD_S,
        acknowledge: str | None = None,
        gap_hold_s: float = DEFAULT_GAP_HOLD_S,
        monotonic: Callable[[], float] = time.monotonic,
        on_watermarks: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.guard = guard
        self.observer = observer or IngestCounts()
        self.clock = clock
        self.max_clock_ahead_s = max_clock_ahead_s
        self.calm = CalmLog(log)
        self.acknowledge = acknowledge
        self.watermarks = Watermarks(self._stored_watermark, gap_hold_s=gap_hold_s, clock=monotonic)
        self.on_watermarks = on_watermarks or (lambda watermarks: None)
        # SHA-256 of the bytes -> verified reading. An OrderedDict, not a dict: evicting a
        # dict's oldest key with next(iter(...)) walks past every key deleted before it
        # (29 us a reading at 50,000 entries, against 0.8 us here).
        self._verified: OrderedDict[bytes, Reading] = OrderedDict()
        self._verified_lock = threading.Lock()
        # Meters whose entry changed or went in a registry swap: their readings are
        # checked again at commit (one checked against the old entry may be in flight).
        self._recheck: frozenset[str] = frozenset()

    def set_registry(self, registry: Registry) -> frozenset[str]:
        """Use `registry` from now on; the ids of meters whose entry changed or went.

        Readings verified against the old registry are forgotten, and those of
        the changed meters still on their way to `commit` are checked again there.
        """
        with self._verified_lock:  # two swaps at once: each compares with the one before it
            changed = frozenset(
                meter.id
                for meter in self.registry
                if (new := registry.get(meter.id)) is None or not new.same_entry(meter)
            )
            self._verified.clear()
            self._recheck = self._recheck | changed
            self.registry = registry
        return changed

    def _stored_watermark(self, meter_id: str) -> int | None:
        """The committed watermark; for a meter accepted before acknowledgements, its last seq."""
        watermark = self.store.watermark(meter_id)
        if watermark is None:
            state = self.guard.state(meter_id)
            watermark = state.seq if state is not None else None
        return watermark

    def process(self, payload: bytes) -> Result:
        return self.process_batch([payload])[0]

    def check(self, payload: bytes, now: int | None = None) -> Reading | Result:
        """Decode and verify one reading: the Reading, or the rejection Result.

        Thread-safe: the MQTT link runs it on its verify threads as messages
        arrive, so signature checks overlap the writer's disk syncs. Bytes
        identical to a reading verified recently are not verified again (a
        board's resends after a rewind, MQTT redeliveries): same bytes, same
        signature, and time has only moved on since.
        """
        payload = bytes(payload)
        digest = hashlib.sha256(payload).digest()
        known = self._verified.get(digest)
        if known is not None:
            return known
        try:
            reading = verify(
                payload,
                self.registry,
                now=int(self.clock()) if now is None else now,
                max_clock_ahead_s=self.max_clock_ahead_s,
            )
        except RejectedReading as exc:
            return Result(Outcome.REJECTED, None, exc.reason, str(exc), payload=payload)
        with self._verified_lock:
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified.popitem(last=False)  # the oldest
            self._verified[digest] = reading
        return reading

    def process_batch(
        self,
        payloads: Sequence[bytes],
        before_commit: Callable[[list[Result]], None] | None = None,
        *,
        senders: Sequence[str] | None = None,
    ) -> list[Result]:
        """`check` each payload, then `commit` them all in one transaction."""
        now = int(self.clock())
        return self.commit([self.check(p, now) for p in payloads], before_commit, senders=senders)

    def commit(
        self,
        checked: Sequence[Reading | Result],
        before_commit: Callable[[list[Result]], None] | None = None,
        *,
        senders: Sequence[str] | None = None,
    ) -> list[Result]:
        """Guard and fold checked readings in one transaction; results in order, after COMMIT.

        `before_commit(results)` runs inside the transaction once every
        reading is folded (the gateway uses it to queue what it publishes).
        `senders` names where each payload came from (the MQTT topic's meter
        level): a refusal counts for a meter's watermark only if the reading
        names its sender, and the rejection log keeps it.
        Raises MeterChainError or sqlite3.Error only if the store fails, in
        which case nothing was committed and nothing may be acknowledged.
        """
        received = int(self.clock())
        registry, recheck = self.registry, self._recheck  # one registry for the whole commit
        slots: list[Result | None] = []
        readings: list[Reading] = []
        touched: set[str] = set()
        for i, item in enumerate(checked):
            if isinstance(item, Reading) and item.meter_id in recheck:
                item = self._check_again(item, registry, received)
            sender = senders[i] if senders else ""
            meter_id = self._acknowledged_meter(item, sender, registry)
            if meter_id is not None:
                touched.add(meter_id)
                seq = item.seq if isinstance(item, Reading) else self._claimed_seq(item)
                if not self.watermarks.decide(meter_id, seq):
                    slots.append(self._deferred(item, meter_id, seq))
                    continue
            if isinstance(item, Result):
                slots.append(item)
            else:
                slots.append(None)
                readings.append(item)
        try:
            results = self._commit(slots, readings, before_commit, senders, received, registry)
        except BaseException:
            self.watermarks.rollback()
            raise
        self.watermarks.commit()
        if touched:
            acks = {m: w for m in touched if (w := self.watermarks.watermark(m)) > 0}
            if acks:
                self.on_watermarks(acks)
        self._report(results, senders)
        return results

    def _commit(
        self,
        slots: list[Result | None],
        readings: list[Reading],
        before_commit: Callable[[list[Result]], None] | None,
        senders: Sequence[str] | None,
        received: int,
        registry: Registry,
    ) -> list[Result]:
        if not readings and not any(
            r is not None and r.outcome is Outcome.REJECTED for r in slots
        ):
            return [r for r in slots if r is not None]
        with self.store.transaction():
            outcomes = self.guard.admit_many(readings, received=received)
            admissions = zip(readings, outcomes, strict=True)
            results = [
                slot if slot is not None else self._fold(*next(admissions), registry)
                for slot in slots
            ]
            if before_commit is not None:
                before_commit(results)
            advanced = self.watermarks.pending()
            if advanced:
                self.store.set_watermarks(advanced)
            refused = [
                _rejection(r, senders[i] if senders else "", received)
                for i, r in enumerate(results)
                if r.outcome is Outcome.REJECTED
            ]
            if refused:
                self.store.log_rejections(refused)
        if readings:
            self.guard.committed()
        return results

    def _check_again(self, reading: Reading, registry: Registry, now: int) -> Reading | Result:
        """`reading` verified again against `registry` (its meter's entry changed or went)."""
        try:
            return verify(
                reading.signed, registry, now=now, max_clock_ahead_s=self.max_clock_ahead_s
            )
        except RejectedReading as exc:
            return Result(Outcome.REJECTED, None, exc.reason, str(exc), payload=reading.signed)

    def _acknowledged_meter(
        self, item: Reading | Result, sender: str, registry: Registry
    ) -> str | None:
        """The own meter whose watermark this item moves, or None (not ours, or not final)."""
        if self.acknowledge is None:
            return None
        if isinstance(item, Reading):
            if item.flags & FLAG_GATEWAY_ATTESTED:
                return None  # signed by an agent for a Modbus meter: no board waits for it
            meter_id = item.meter_id
        else:
            if item.outcome is not Outcome.REJECTED or item.reason in NOT_FINAL:
                return None
            claimed = claimed_identity(item.payload)
            if claimed is None or claimed[0] != sender:
                return None  # only the meter's own topic speaks for its sequence
            meter_id = claimed[0]
        meter = registry.get(meter_id)
        return meter_id if meter is not None and meter.owner == self.acknowledge else None

    @staticmethod
    def _claimed_seq(result: Result) -> int:
        claimed = claimed_identity(result.payload)
        assert claimed is not None  # _acknowledged_meter checked it
        return claimed[1]

    def _deferred(self, item: Reading | Result, meter_id: str, seq: int) -> Result:
        watermark = self.watermarks.watermark(meter_id)
        return Result(
            Outcome.DEFERRED,
            item if isinstance(item, Reading) else None,
            "sequence_gap",
            f"meter {meter_id!r} seq {seq}: acknowledged up to {watermark}, "
            f"waiting for {watermark + 1}..{seq - 1}",
        )

    def _fold(
        self, reading: Reading, admission: Admission | RejectedReading, registry: Registry
    ) -> Result:
        """The reading's Result; an admitted one's energy is added to its hourly rows."""
        if isinstance(admission, DuplicateReading):
            return Result(Outcome.DUPLICATE, reading, admission.reason, str(admission))
        if isinstance(admission, RejectedReading):
            return Result(Outcome.REJECTED, reading, admission.reason, str(admission))
        meter = registry.get(reading.meter_id)
        if meter is None:  # commit checked it again against this registry after any swap
            raise MeterChainError(f"meter {reading.meter_id!r} vanished from the registry")
        if admission.previous_time is not None:
            # Register by register (a restarted one counts from zero) over the booking
            # interval of meterchain.sequence's time rules, not the time the reading claims.
            assert admission.time is not None
            assert admission.import_delta_wh is not None
            assert admission.export_delta_wh is not None
            self.store.fold(
                reading.meter_id,
                meter.owner,
                reading.source,
                admission.previous_time,
                admission.time,
                admission.import_delta_wh,
                admission.export_delta_wh,
            )
        return Result(Outcome.ACCEPTED, reading, owner=meter.owner)

    def _report(self, results: list[Result], senders: Sequence[str] | None) -> None:
        for i, result in enumerate(results):
            reading = result.reading
            if result.outcome is Outcome.ACCEPTED:
                assert reading is not None
                self.observer.accepted(reading, result.owner)
                if self.calm.any_failing:  # the common case builds no subject string
                    self.calm.success(f"meter {reading.meter_id}")
            elif result.outcome is Outcome.DUPLICATE:
                assert reading is not None
                self.observer.duplicate(reading)
                log.debug(
                    "meter %s seq %d: duplicate, already accepted", reading.meter_id, reading.seq
                )
            elif result.outcome is Outcome.DEFERRED:
                self.observer.deferred(result.reason)
                log.debug("%s", result.detail)
            else:
                self.observer.rejected(result.reason)
                if reading is not None:
                    subject = f"meter {reading.meter_id}"
                else:
                    subject = f"meter {senders[i]}" if senders else "unnamed sender"
                self.calm.failure(subject, result.reason, f"rejected: {result.detail}")


def _rejection(result: Result, sender: str, received: int) -> Rejection:
    reading = result.reading
    if reading is not None:
        meter_id, seq, payload = reading.meter_id, reading.seq, reading.signed
    else:
        claimed = claimed_identity(result.payload)
        meter_id, seq = claimed if claimed is not None else (None, None)
        payload = result.payload
    return Rejection(received, sender, meter_id, seq, result.reason, result.detail, payload)
