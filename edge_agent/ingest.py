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

Rejected readings are counted by reason and logged calmly: ERROR the first
time a meter shows a reason, DEBUG while it repeats, INFO when the meter's
next reading is accepted.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edge_agent.calm import CalmLog
from edge_agent.store import AgentStore
from meterchain.errors import DuplicateReading, MeterChainError, RejectedReading
from meterchain.reading import DEFAULT_MAX_CLOCK_AHEAD_S, Reading, verify
from meterchain.registry import Registry
from meterchain.sequence import Admission, MeterState

log = logging.getLogger("meterchain.agent.ingest")


class Guard(Protocol):
    """The sequence guard (meterchain.sequence.SequenceGuard) on the store's connection."""

    def state(self, meter_id: str) -> MeterState | None: ...

    def admit_many(self, readings: Iterable[Reading]) -> list[Admission | RejectedReading]:
        """Record each reading in the open transaction, or say which RejectedReading it is."""
        ...

    def committed(self) -> None:
        """The transaction holding the last `admit_many` committed."""
        ...


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reading: Reading | None = None
    reason: str = ""
    detail: str = ""
    owner: str = ""  # the accepted reading's microgrid


class IngestObserver(Protocol):
    """Where outcomes go after the commit (metrics)."""

    def accepted(self, reading: Reading, owner: str) -> None: ...

    def duplicate(self, reading: Reading) -> None: ...

    def rejected(self, reason: str) -> None: ...


@dataclass
class IngestCounts:
    """A plain observer: totals by outcome and rejection reason (tests, benchmark)."""

    accepted_n: int = 0
    duplicate_n: int = 0

    def __post_init__(self) -> None:
        self.rejected_by_reason: dict[str, int] = {}

    def accepted(self, reading: Reading, owner: str) -> None:
        self.accepted_n += 1

    def duplicate(self, reading: Reading) -> None:
        self.duplicate_n += 1

    def rejected(self, reason: str) -> None:
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1


class Ingest:
    """Verify, guard and persist readings; one instance per writer thread."""

    def __init__(
        self,
        store: AgentStore,
        registry: Registry,
        guard: Guard,
        *,
        observer: IngestObserver | None = None,
        clock: Callable[[], float] = time.time,
        max_clock_ahead_s: int = DEFAULT_MAX_CLOCK_AHEAD_S,
    ) -> None:
        self.store = store
        self.registry = registry
        self.guard = guard
        self.observer = observer or IngestCounts()
        self.clock = clock
        self.max_clock_ahead_s = max_clock_ahead_s
        self.calm = CalmLog(log)

    def process(self, payload: bytes) -> Result:
        return self.process_batch([payload])[0]

    def check(self, payload: bytes, now: int | None = None) -> Reading | Result:
        """Decode and verify one reading: the Reading, or the rejection Result.

        Pure and thread-safe: the MQTT thread runs it on each message as it
        arrives, so signature checks overlap the writer's disk syncs.
        """
        try:
            return verify(
                payload,
                self.registry,
                now=int(self.clock()) if now is None else now,
                max_clock_ahead_s=self.max_clock_ahead_s,
            )
        except RejectedReading as exc:
            return Result(Outcome.REJECTED, None, exc.reason, str(exc))

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
        level), for logging readings too broken to name their meter.
        Raises MeterChainError or sqlite3.Error only if the store fails, in
        which case nothing was committed and nothing may be acknowledged.
        """
        readings = [c for c in checked if not isinstance(c, Result)]
        if not readings:
            results = [c for c in checked if isinstance(c, Result)]
        else:
            with self.store.transaction():
                outcomes = iter(self.guard.admit_many(readings))
                results = [
                    item if isinstance(item, Result) else self._fold(item, next(outcomes))
                    for item in checked
                ]
                if before_commit is not None:
                    before_commit(results)
            self.guard.committed()
        self._report(results, senders)
        return results

    def _fold(self, reading: Reading, admission: Admission | RejectedReading) -> Result:
        """The reading's Result; an admitted one's energy is added to its hourly rows."""
        if isinstance(admission, DuplicateReading):
            return Result(Outcome.DUPLICATE, reading, admission.reason, str(admission))
        if isinstance(admission, RejectedReading):
            return Result(Outcome.REJECTED, reading, admission.reason, str(admission))
        meter = self.registry.get(reading.meter_id)
        if meter is None:  # verify() looked it up a moment ago; a registry swap raced us
            raise MeterChainError(f"meter {reading.meter_id!r} vanished from the registry")
        if admission.previous_time is not None:
            if admission.counter_reset:
                # The registers restarted: what they hold now was measured since the reset.
                d_import, d_export = reading.import_wh, reading.export_wh
            else:
                assert admission.import_delta_wh is not None
                assert admission.export_delta_wh is not None
                d_import, d_export = admission.import_delta_wh, admission.export_delta_wh
            self.store.fold(
                reading.meter_id,
                meter.owner,
                reading.source,
                admission.previous_time,
                reading.time,
                d_import,
                d_export,
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
            else:
                self.observer.rejected(result.reason)
                if reading is not None:
                    subject = f"meter {reading.meter_id}"
                else:
                    subject = f"meter {senders[i]}" if senders else "unnamed sender"
                self.calm.failure(subject, result.reason, f"rejected: {result.detail}")
