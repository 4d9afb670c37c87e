"""Ingest worker processes partitioned by meter, so reading ingest uses every core.

One Python process ingests at most about one core (the GIL): receiving,
TLS, parsing and the writer's bookkeeping all take it. The agent therefore
runs `broker.ingest_workers` processes (never more than it has registered
meters); a stable hash of the meter id
(`owner_of`) gives every registered meter to exactly one of them. Each
worker is the single-process ingest path on its own meters: its own MQTT
session subscribed to one filter per meter (`mc/<market>/r/<meter>`, never a
`$share` group, which would split one meter's readings between sessions and
lose their order), `Ingest.check` on its verify threads, group commits to
the agent's one SQLite database (WAL; SQLite's write lock serialises the
workers' transactions and `busy_timeout` makes them wait their turn), and
the end-to-end acknowledgements of its meters after each commit. Because a
meter always lands in one worker, its order and its sequence guard stay
exact, and the database stays the one source of truth every other part of
the agent reads (energy for bids, /status).

The agent process keeps everything else (Modbus gateway, rounds, metrics
and health) and runs `IngestPool`, which starts the workers, adds the
tallies they report to the agent's metrics, and restarts a worker that dies
(kill -9, a crash): what it committed is on disk and acknowledged, what it
had not is still in its persistent broker session and on the boards, which
resend from their watermark. A worker whose storage fails exits with
STORAGE_FAILED; the agent then stops, as when its own writer fails.

A worker reads the registry when it starts. The agent's reload (SIGHUP,
`systemctl reload`) restarts the workers one after another (`reload`): each
finishes the batch in hand, disconnects, and its successor subscribes the
filters of the meters the new registry gives it; what the old one had not
committed is still in the persistent session. The number of workers stays
as started. A worker unsubscribes the filters of meters it no longer owns
on every connect, so changing the number of workers (a restart) never
leaves a meter with two sessions.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.metrics import AgentMetrics, IngestTally

log = logging.getLogger("meterchain.agent.ingest_pool")

STORAGE_FAILED = 3  # a worker's exit status when its writer failed (the disk, not the worker)
REPORT_S = 0.25  # how often a worker reports its tally and connection state
RESTART_DELAY_S = 1.0  # between a worker's death and its restart
RELOAD_WAIT_S = 30.0  # longest a reload waits for a restarted worker to subscribe again


def owner_of(meter_id: str, workers: int) -> int:
    """The worker (0 .. workers-1) that ingests `meter_id`: stable across runs and processes."""
    return zlib.crc32(meter_id.encode()) % workers


def _worker_main(
    config_path: str, log_level: int, index: int, count: int, conn: Connection
) -> None:
    """One ingest worker process: ingest the meters `owner_of` gives `index` until told to stop."""
    # Imported here: the agent process needs none of this to supervise.
    from edge_agent.broker_link import BrokerLink
    from edge_agent.config import load
    from edge_agent.ingest import Ingest
    from edge_agent.store import AgentStore
    from edge_agent.worker import IngestWorker
    from meterchain import service
    from meterchain.mqtt_auth import reading_topic
    from meterchain.registry import Registry
    from meterchain.sequence import SequenceGuard

    # systemd's stop signals the whole unit, a terminal's Ctrl-C the whole process group:
    # a worker stops when the agent tells it to (or is gone), after its batch in hand.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal's hang-up; reload: the agent
    service.setup_logging(f"meterchain-agent-ingest{index}", log_level)
    config = load(config_path)
    registry = Registry.load(config.agent.registry)
    store = AgentStore(config.database)
    tally = IngestTally()
    ingest = Ingest(
        store,
        registry,
        SequenceGuard(store.conn),
        observer=tally,
        clock=config.clock.now,
        max_clock_ahead_s=config.agent.max_clock_ahead_s,
        acknowledge=config.owner,
        gap_hold_s=config.broker.gap_hold_s,
    )
    writer = IngestWorker(
        ingest,
        batch_max=config.broker.batch_max,
        batch_wait_s=config.broker.batch_wait_ms / 1000,
        on_batch=tally.batch,
    )
    market = config.agent.market
    mine, others = [], []
    for meter in registry:
        (mine if owner_of(meter.id, count) == index else others).append(
            reading_topic(market, meter.id)
        )
    subscribed = threading.Event()

    def connected(up: bool) -> None:
        if not up:
            subscribed.clear()

    link = BrokerLink(
        url=config.broker.url,
        client_id=f"{config.broker.client_id}.ingest{index}",
        market=market,
        node_id=config.agent.node_id,
        worker=writer,
        username=config.broker.ingest_user(index),
        password=config.broker_password,
        ca_file=str(config.broker.ca_file) if config.broker.ca_file else None,
        keepalive_s=config.broker.keepalive_s,
        on_connected=connected,
        on_subscribed=subscribed.set,
        reading_filters=mine,
        gateway_readings=False,
        drop_filters=others,
    )
    ingest.on_watermarks = link.publish_acks
    writer.acknowledge = link.acknowledge
    writer.start()
    link.start()
    try:
        while not writer.stopped.is_set():
            if conn.poll(REPORT_S):
                conn.recv()  # the agent says stop (EOFError: the agent is gone)
                break
            conn.send((link.connected and subscribed.is_set(), tally.take()))
    except (EOFError, BrokenPipeError):
        pass
    writer.stop()  # the batch in hand commits; what is queued stays unacknowledged
    link.stop()
    store.close()
    try:
        conn.send((False, tally.take()))
    except (BrokenPipeError, OSError):
        pass
    if writer.failure is not None:
        sys.exit(STORAGE_FAILED)


class _Worker:
    """The agent's handle on one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.up = False
        self.restart_at: float | None = None
        self.reloading = False  # told to stop for a reload: restarted at once when it exits
        self.reload_wait: float | None = None  # restarted for a reload: next waits till up or this


class IngestPool:
    """Start, watch and restart `count` ingest workers; their tallies go into `metrics`.

    `on_state(up)` is called when "every worker connected and subscribed"
    changes. `failed` is set when a worker's storage failed (the agent stops).
    """

    def __init__(
        self,
        config: AgentConfig,
        count: int,
        metrics: AgentMetrics,
        *,
        on_state: Callable[[bool], None] | None = None,
        restart_delay_s: float = RESTART_DELAY_S,
    ) -> None:
        assert config.path is not None, "workers load the same config file"
        self.config_path = Path(config.path)
        self.count = count
        self.metrics = metrics
        self.on_state = on_state or (lambda up: None)
        self.restart_delay_s = restart_delay_s
        self.failed = threading.Event()
        self.restarts = 0
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._workers = [_Worker(k) for k in range(self.count)]
        self._stopping = threading.Event()
        self._up = False
        self._log_level = logging.getLogger().getEffectiveLevel()
        self._thread = threading.Thread(target=self._supervise, name="ingest-pool", daemon=True)
        self._reloads: list[int] = []  # workers still to restart for a reload, in order
        self._reload_lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self._up

    def pids(self) -> list[int | None]:
        return [w.process.pid if w.process is not None else None for w in self._workers]

    def start(self) -> None:
        for worker in self._workers:
            self._spawn(worker)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Each worker finishes the batch in hand and disconnects; the rest stays at the broker."""
        self._stopping.set()
        self._thread.join(timeout)
        for worker in self._workers:
            if worker.conn is not None:
                try:
                    worker.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.process is None:
                continue
            worker.process.join(max(0.0, deadline - time.monotonic()))
            self._drain(worker)
            if worker.process.is_alive():
                log.error("ingest worker %d did not stop in %.0f s: killed", worker.index, timeout)
                worker.process.kill()
                worker.process.join()

    def reload(self) -> None:
        """Restart every worker, one after another, so each reads the registry again.

        The next is told to stop only once the previous one's successor is
        connected and subscribed, so at most one partition pauses at a time.
        A reload asked for while one is under way restarts every worker again.
        """
        with self._reload_lock:
            self._reloads = [w.index for w in self._workers]

    def _next_reload(self) -> None:
        """Tell the next worker of a reload to stop, once no other is restarting for one."""
        now = time.monotonic()
        for w in self._workers:
            if w.reload_wait is not None and (w.up or now >= w.reload_wait):
                w.reload_wait = None  # subscribed again (or the broker is away: go on)
        if any(w.reloading or w.reload_wait is not None for w in self._workers):
            return  # one at a time
        with self._reload_lock:
            if not self._reloads:
                return
            worker = self._workers[self._reloads.pop(0)]
        if worker.conn is None:
            return  # dead and waiting for its restart, which reads the registry anyway
        worker.reloading = True
        try:
            worker.conn.send(None)
        except (BrokenPipeError, OSError):
            pass  # it died meanwhile: _died restarts it

    def _spawn(self, worker: _Worker) -> None:
        parent, child = self._ctx.Pipe()
        worker.process = self._ctx.Process(
            target=_worker_main,
            args=(str(self.config_path), self._log_level, worker.index, self.count, child),
            name=f"ingest{worker.index}",
            daemon=True,
        )
        worker.process.start()
        child.close()
        worker.conn = parent
        worker.up = False
        worker.restart_at = None
        worker.reloading = False

    def _drain(self, worker: _Worker) -> None:
        """Take every report waiting on the worker's pipe."""
        conn = worker.conn
        try:
            while conn is not None and conn.poll():
                up, tally = conn.recv()
                worker.up = up
                if not tally.empty():
                    self.metrics.add_tally(tally)
        except (EOFError, OSError):
            pass

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            waitables: list[object] = []
            for w in self._workers:
                if w.process is not None and w.restart_at is None:
                    waitables += [w.conn, w.process.sentinel]
            multiprocessing.connection.wait(waitables, timeout=REPORT_S)  # type: ignore[arg-type]
            now = time.monotonic()
            for worker in self._workers:
                self._drain(worker)
                process = worker.process
                if worker.restart_at is None and process is not None and not process.is_alive():
                    self._died(worker, now)
                if worker.restart_at is not None and now >= worker.restart_at:
                    self.restarts += 1
                    self.metrics.ingest_worker_restarts.inc()
                    self._spawn(worker)
            self._next_reload()
            up = all(w.up for w in self._workers)
            if up != self._up:
                self._up = up
                self.on_state(up)

    def _died(self, worker: _Worker, now: float) -> None:
        assert worker.process is not None
        worker.process.join()
        worker.up = False
        code = worker.process.exitcode
        if worker.conn is not None:
            worker.conn.close()
            worker.conn = None
        if code == STORAGE_FAILED:
            log.critical("ingest worker %d: storage failure, the agent stops", worker.index)
            worker.process = None
            self.failed.set()
            return
        if worker.reloading and code == 0:
            log.info("ingest worker %d stopped for the reload: starting it again", worker.index)
            self._spawn(worker)
            worker.reload_wait = time.monotonic() + RELOAD_WAIT_S
            return
        log.error(
            "ingest worker %d (pid %s) died (exit status %s): restarting in %.0f s",
            worker.index,
            worker.process.pid,
            code,
            self.restart_delay_s,
        )
        worker.restart_at = now + self.restart_delay_s
