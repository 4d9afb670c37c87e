"""The single writer thread: group-commits deliveries through the ingest path, then acknowledges.

MQTT deliveries arrive being verified (the MQTT link's verify threads run
`Ingest.check` on chunks of them, so signature checks overlap this thread's
disk syncs; it takes the results in arrival order). They
are gathered into batches of up to `batch_max` (waiting at most
`batch_wait_s` for company), committed in one transaction, and only then
acknowledged, in the order they arrived (MQTT 3.1.1 section 4.6). A delivery
still queued when the agent stops is never acknowledged, so the broker
re-sends it from the persistent session.

Gateway samples from Modbus meters are signed here, one per transaction:
the sequence number is the meter's last accepted one plus one, and a
register lower than the last one (a meter swapped or reset) is attested
with FLAG_COUNTER_RESET rather than refused.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.gateway import gateway_key, gateway_topic, sign_gateway_reading
from edge_agent.ingest import Ingest, Outcome, Result
from edge_agent.modbus import MeterSample
from meterchain.errors import RejectedReading
from meterchain.keys import PrivateKey
from meterchain.reading import FLAG_COUNTER_RESET, Reading

log = logging.getLogger("meterchain.agent.worker")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A delivered reading, checked (`Ingest.check`); acknowledged by `ack` once durable.

    `checked` is the outcome, or a future of the outcomes of a chunk of
    readings verified together, of which this one is number `index`.
    `ack` is the link's token for its PUBACK (`BrokerLink.acknowledge`).
    """

    checked: Reading | Result | concurrent.futures.Future[list[Reading | Result]]
    sender: str
    ack: int
    index: int = 0


@dataclass(frozen=True, slots=True)
class GatewaySample:
    meter_id: str
    source: str
    time: int
    sample: MeterSample
    done: concurrent.futures.Future[Result]


@dataclass(frozen=True)
class GatewayIdentity:
    """What the worker needs to attest Modbus meters: node key, market, node id, publishing."""

    node_key: PrivateKey
    market: str
    node_id: str
    publish: bool = True


_STOP = object()


class IngestWorker(threading.Thread):
    """Owns the store's write connection; everything that changes the database runs here."""

    def __init__(
        self,
        ingest: Ingest,
        *,
        batch_max: int = 64,
        batch_wait_s: float = 0.002,
        gateway: GatewayIdentity | None = None,
        on_outbox: Callable[[], None] | None = None,
        on_outbox_dropped: Callable[[int], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        acknowledge: Callable[[list[int]], None] | None = None,
    ) -> None:
        super().__init__(name="ingest-writer", daemon=True)
        self.ingest = ingest
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.gateway = gateway
        self.on_outbox = on_outbox or (lambda: None)
        self.on_outbox_dropped = on_outbox_dropped or (lambda n: None)
        self.on_batch = on_batch or (lambda size, seconds: None)
        # A committed batch's acknowledgement tokens, in arrival order (the MQTT link's).
        self.acknowledge = acknowledge or (lambda tokens: None)
        # Bounded: when the disk is slow, the MQTT thread blocks here and the
        # broker holds the rest (in-flight window), instead of memory growing.
        self.queue: queue.Queue[object] = queue.Queue(maxsize=4096)
        self._keys: dict[str, PrivateKey] = {}
        self.failure: BaseException | None = None
        self.stopped = threading.Event()

    def submit(self, delivery: Delivery) -> None:
        self.queue.put(delivery)

    def submit_sample(
        self, meter_id: str, source: str, sample_time: int, sample: MeterSample
    ) -> concurrent.futures.Future[Result]:
        done: concurrent.futures.Future[Result] = concurrent.futures.Future()
        self.queue.put(GatewaySample(meter_id, source, sample_time, sample, done))
        return done

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand, leave the rest unacknowledged, and return."""
        self.queue.put(_STOP)
        self.join(timeout)

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to the service, which exits non-zero
            self.failure = exc
            log.critical("ingest writer failed, nothing more is acknowledged: %r", exc)
        finally:
            self.stopped.set()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if isinstance(item, GatewaySample):
                self._attest(item)
                continue
            assert isinstance(item, Delivery)
            batch = [item]
            # Let company arrive with one sleep instead of waking for every
            # message: each wake-up is a GIL hand-over costing as much as the
            # bookkeeping of a reading.
            if self.queue.qsize() < self.batch_max - 1:
                time.sleep(self.batch_wait_s)
            stop_after = False
            for nxt in self._take(self.batch_max - 1):
                if nxt is _STOP:
                    stop_after = True
                    break
                if isinstance(nxt, GatewaySample):
                    self._commit(batch)
                    batch = []
                    self._attest(nxt)
                    continue
                assert isinstance(nxt, Delivery)
                batch.append(nxt)
            if batch:
                self._commit(batch)
            if stop_after:
                return

    def _take(self, limit: int) -> list[object]:
        """Up to `limit` queued items, in order, under one lock acquisition.

        `get_nowait` per item costs a lock round trip each, paid on the same
        GIL as the MQTT thread's signature checks.
        """
        pending = self.queue
        with pending.mutex:
            n = min(limit, len(pending.queue))
            items = [pending.queue.popleft() for _ in range(n)]
            if n:
                pending.not_full.notify(n)
        return items

    def _commit(self, batch: list[Delivery]) -> None:
        started = time.perf_counter()
        # Futures are resolved in arrival order: each meter's readings stay in order.
        checked = [
            d.checked.result()[d.index]
            if isinstance(d.checked, concurrent.futures.Future)
            else d.checked
            for d in batch
        ]
        self.ingest.commit(checked, senders=[d.sender for d in batch])
        self.acknowledge([d.ack for d in batch])
        self.on_batch(len(batch), time.perf_counter() - started)

    def _key(self, meter_id: str) -> PrivateKey:
        assert self.gateway is not None
        key = self._keys.get(meter_id)
        if key is None:
            key = gateway_key(self.gateway.node_key, self.gateway.market, meter_id)
            self._keys[meter_id] = key
        return key

    def _attest(self, item: GatewaySample) -> None:
        if not item.done.set_running_or_notify_cancel():
            # The poller gave up on it (the agent is stopping): the meter's registers
            # are read again next time, nothing is lost by not signing this sample.
            return
        if self.gateway is None:
            item.done.set_exception(RuntimeError("no gateway identity configured"))
            return
        last = self.ingest.guard.state(item.meter_id)
        seq = last.seq + 1 if last else 1
        flags = 0
        if last and (
            item.sample.import_wh < last.import_wh or item.sample.export_wh < last.export_wh
        ):
            flags |= FLAG_COUNTER_RESET
        try:
            signed = sign_gateway_reading(
                self._key(item.meter_id),
                item.meter_id,
                seq,
                item.time,
                item.sample.import_wh,
                item.sample.export_wh,
                item.sample.power_w,
                item.source,
                flags,
            )
        except RejectedReading as exc:
            # A register no honest reading can hold (beyond the wire format's
            # bounds): refused and counted like any bad reading, never signed.
            refused = Result(Outcome.REJECTED, None, exc.reason, str(exc))
            item.done.set_result(self.ingest.commit([refused], senders=[item.meter_id])[0])
            return
        topic = gateway_topic(self.gateway.market, self.gateway.node_id, item.meter_id)
        publish = self.gateway.publish

        def queue_for_publication(results: list[Result]) -> None:
            if publish and results[0].outcome is Outcome.ACCEPTED:
                self.ingest.store.add_outbox(topic, signed)

        dropped_before = self.ingest.store.outbox_dropped
        try:
            (result,) = self.ingest.process_batch(
                [signed], queue_for_publication, senders=[item.meter_id]
            )
        except BaseException as exc:
            item.done.set_exception(exc)
            raise
        item.done.set_result(result)
        if self.ingest.store.outbox_dropped > dropped_before:
            self.on_outbox_dropped(self.ingest.store.outbox_dropped - dropped_before)
        if publish and result.outcome is Outcome.ACCEPTED:
            self.on_outbox()
