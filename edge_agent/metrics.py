"""The agent's Prometheus metrics, on a registry of its own so several agents can share a process.

Names (all prefixed `meterchain_agent_`): readings accepted per meter,
duplicates, rejected by reason, deferred by reason (held above a sequence
gap), last reading age per meter and the oldest of them, ingest batch size
and commit time, Modbus errors by bus and kind, Modbus link state, setpoint
writes that failed, round latency, changes of primary, MQTT connection state,
ingest worker restarts.

Per-meter series are bounded: the first `max_meter_series` meters get their
own label; readings of any further meter count under `meter="_other"` and
only the oldest-age gauge covers them, so a scrape stays small with tens of
thousands of meters.

Ingest worker processes (edge_agent.ingest_pool) count into an `IngestTally`
and ship it to the agent process, which adds it here (`add_tally`): one set
of series for every meter, whichever process ingested it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.modbus import LinkState
from meterchain.reading import Reading


class AgentMetrics:
    OTHER_METERS = "_other"

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        *,
        max_meter_series: int = 1000,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self.max_meter_series = max_meter_series
        r = self.registry
        self.readings_accepted = Counter(
            "meterchain_agent_readings_accepted",
            "Readings verified and folded into energy",
            ["meter"],
            registry=r,
        )
        self.readings_duplicate = Counter(
            "meterchain_agent_readings_duplicate",
            "Byte-identical copies of accepted readings (re-deliveries), acknowledged, not counted",
            registry=r,
        )
        self.readings_rejected = Counter(
            "meterchain_agent_readings_rejected",
            "Readings refused, by reason",
            ["reason"],
            registry=r,
        )
        self.readings_deferred = Counter(
            "meterchain_agent_readings_deferred",
            "Readings held back above a sequence gap (the board sends them again), by reason",
            ["reason"],
            registry=r,
        )
        self.rejection_log_dropped = Gauge(
            "meterchain_agent_rejection_log_dropped",
            "Refused readings dropped from the full rejection log (oldest first) since start",
            registry=r,
        )
        self.oldest_reading_age = Gauge(
            "meterchain_agent_oldest_reading_age_seconds",
            "Seconds since the last accepted reading of the meter heard from least recently",
            registry=r,
        )
        self.oldest_reading_age.set_function(self._oldest_age)
        self.last_reading_age = Gauge(
            "meterchain_agent_last_reading_age_seconds",
            "Seconds since the time of the last accepted reading of each meter",
            ["meter"],
            registry=r,
        )
        self.batch_size = Histogram(
            "meterchain_agent_ingest_batch_size",
            "Readings per ingest transaction",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "meterchain_agent_ingest_batch_seconds",
            "Verify + commit time per ingest batch",
            registry=r,
        )
        self.modbus_errors = Counter(
            "meterchain_agent_modbus_errors",
            "Failed Modbus requests, by bus and kind",
            ["bus", "kind"],
            registry=r,
        )
        self.modbus_reads = Counter(
            "meterchain_agent_modbus_reads",
            "Successful meter reads",
            ["meter"],
            registry=r,
        )
        self.modbus_connected = Gauge(
            "meterchain_agent_modbus_connected",
            "1 while the bus link is up",
            ["bus"],
            registry=r,
        )
        self.setpoint_failures = Counter(
            "meterchain_agent_setpoint_failures",
            "Setpoints that could not be applied",
            ["kind"],
            registry=r,
        )
        self.setpoint_writes = Counter(
            "meterchain_agent_setpoint_writes",
            "Setpoints written",
            ["kind"],
            registry=r,
        )
        self.round_latency = Histogram(
            "meterchain_agent_round_latency_seconds",
            "From submitting a bid to a committed clearing result",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.rounds = Counter(
            "meterchain_agent_rounds",
            "Rounds finished, by outcome",
            ["outcome"],
            registry=r,
        )
        self.primary_changes = Counter(
            "meterchain_agent_primary_changes",
            "Changes of SDBFT primary seen",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "meterchain_agent_mqtt_connected",
            "1 while connected to the broker",
            registry=r,
        )
        self.outbox_pending = Gauge(
            "meterchain_agent_outbox_pending",
            "Gateway readings committed but not yet acknowledged by the broker",
            registry=r,
        )
        self.ingest_worker_restarts = Counter(
            "meterchain_agent_ingest_worker_restarts",
            "Ingest worker processes restarted after they died",
            registry=r,
        )
        self.registry_reloads = Counter(
            "meterchain_agent_registry_reloads",
            "Registry reloads (SIGHUP) by result: loaded, or refused (the old one kept)",
            ["result"],
            registry=r,
        )
        self.registered_meters = Gauge(
            "meterchain_agent_registered_meters",
            "Meters in the registry in use",
            registry=r,
        )
        self.outbox_dropped = Counter(
            "meterchain_agent_outbox_dropped",
            "Gateway readings dropped from a full outbox (still counted locally)",
            registry=r,
        )
        self._last_time: dict[str, int] = {}
        self._labelled: set[str] = set()

    # -- IngestObserver -----------------------------------------------------------

    def accepted(self, reading: Reading, owner: str) -> None:
        self.readings_accepted.labels(self._seen(reading.meter_id, reading.time)).inc()

    def _seen(self, meter: str, last_time: int) -> str:
        """Note the time (Unix s) of a meter's last accepted reading; its `meter` label value."""
        if meter not in self._last_time:
            if len(self._labelled) < self.max_meter_series:
                self._labelled.add(meter)
                self.last_reading_age.labels(meter).set_function(
                    lambda: self._clock() - self._last_time[meter]
                )
        self._last_time[meter] = last_time
        return meter if meter in self._labelled else self.OTHER_METERS

    def last_reading_times(self) -> dict[str, int]:
        """Every meter seen: the time (Unix s) of its last accepted reading."""
        return dict(self._last_time)

    def _oldest_age(self) -> float:
        return self._clock() - min(self._last_time.values()) if self._last_time else 0.0

    def duplicate(self, reading: Reading) -> None:
        self.readings_duplicate.inc()

    def rejected(self, reason: str) -> None:
        self.readings_rejected.labels(reason).inc()

    def deferred(self, reason: str) -> None:
        self.readings_deferred.labels(reason).inc()

    # -- Modbus -------------------------------------------------------------------

    def modbus_error(self, bus: str, kind: str) -> None:
        self.modbus_errors.labels(bus, kind).inc()

    def modbus_state(self, bus: str, state: LinkState) -> None:
        self.modbus_connected.labels(bus).set(1 if state is LinkState.CONNECTED else 0)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def add_tally(self, tally: IngestTally) -> None:
        """Count what an ingest worker process reported (edge_agent.ingest_pool)."""
        by_label: dict[str, int] = {}
        for meter, (n, last_time) in tally.by_meter.items():
            label = self._seen(meter, last_time)
            by_label[label] = by_label.get(label, 0) + n
        for label, n in by_label.items():  # meters past the series cap: one increment
            self.readings_accepted.labels(label).inc(n)
        if tally.duplicates:
            self.readings_duplicate.inc(tally.duplicates)
        for reason, n in tally.rejections.items():
            self.readings_rejected.labels(reason).inc(n)
        for reason, n in tally.deferrals.items():
            self.readings_deferred.labels(reason).inc(n)
        for size, seconds in tally.batches:
            self.batch(size, seconds)


@dataclass
class IngestTally:
    """Ingest outcomes since the last `take`: the IngestObserver of an ingest worker process.

    Written by the worker's writer thread, taken by the thread that reports
    to the agent (under one lock); small (per meter: count and last reading
    time) and picklable.
    """

    by_meter: dict[str, tuple[int, int]] = field(default_factory=dict)  # meter -> (n, last time)
    duplicates: int = 0
    rejections: dict[str, int] = field(default_factory=dict)  # reason -> n
    deferrals: dict[str, int] = field(default_factory=dict)  # reason -> n
    batches: list[tuple[int, float]] = field(default_factory=list)  # (size, seconds)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def take(self) -> IngestTally:
        """What was counted since the last call; counting starts again from zero."""
        with self._lock:
            taken = dataclasses.replace(self)
            self.by_meter, self.duplicates, self.rejections = {}, 0, {}
            self.deferrals, self.batches = {}, []
        return taken

    def empty(self) -> bool:
        return not (
            self.by_meter or self.duplicates or self.rejections or self.deferrals or self.batches
        )

    # -- IngestObserver and batch timings (the writer thread) ----------------------

    def accepted(self, reading: Reading, owner: str) -> None:
        with self._lock:
            n, _ = self.by_meter.get(reading.meter_id, (0, 0))
            self.by_meter[reading.meter_id] = (n + 1, reading.time)

    def duplicate(self, reading: Reading) -> None:
        with self._lock:
            self.duplicates += 1

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def deferred(self, reason: str) -> None:
        with self._lock:
            self.deferrals[reason] = self.deferrals.get(reason, 0) + 1

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batches.append((size, seconds))
