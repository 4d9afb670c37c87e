"""The edge agent service: wires config, ingest, MQTT, Modbus, rounds, block review and systemd.

`run_agent(config)` starts every part, tells systemd it is ready, pings the
watchdog while the ingest writer is alive, on SIGHUP reads the meter registry
again (`Agent.reload`: meters added, removed or re-keyed are taken up without
a restart; a registry file that does not load is refused and the running one
kept), and on SIGTERM/SIGINT shuts down
in order: stop polling meters, let the writer finish the transaction in
hand (what is still queued stays unacknowledged at the broker), disconnect
from the broker, close buses and the database, exit 0. If the writer dies
(the disk failed), the agent stops pinging the watchdog and exits 1, so
systemd restarts it and the broker re-delivers what was not committed.
A consensus node also reviews the aggregator's block proposals on its own
ledger copy (`edge_agent.reviewer`) and sends it each final clearing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_agent.bid import build_market
from edge_agent.broker_link import BrokerLink
from edge_agent.config import AgentConfig
from edge_agent.forecast import (
    Forecaster,
    PersistenceForecaster,
    ProfileForecaster,
    history_from_energy,
    load_profile,
)
from edge_agent.ingest import Ingest, Outcome
from edge_agent.ingest_pool import IngestPool
from edge_agent.metrics import AgentMetrics
from edge_agent.modbus import MeterPoller, MeterSample, ModbusBus
from edge_agent.rounds import Clearing, RoundDriver, RoundOutcome, StandaloneClearing
from edge_agent.setpoints import SetpointWriter
from edge_agent.status import AgentStatus
from edge_agent.store import AgentStore, StoreView
from edge_agent.worker import GatewayIdentity, IngestWorker
from meterchain import service
from meterchain.errors import ConfigError, MeterChainError

if TYPE_CHECKING:
    from edge_agent.consensus_clearing import ConsensusClearing
    from edge_agent.consensus_submit import SubmitClearing
    from edge_agent.reviewer import ReviewerLink
from meterchain.registry import Registry
from meterchain.sequence import SequenceGuard

log = logging.getLogger("meterchain.agent")


class Agent:
    """One running agent; build with a validated config, then `await run(stop)`."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        # Market time (meterchain.site.clock): the wall clock unless the config accelerates it.
        self.clock = clock or config.clock.now
        forecaster = self._forecaster()
        self.metrics = AgentMetrics(clock=self.clock)
        self.registry = Registry.load(config.agent.registry)
        self.metrics.registered_meters.set(len(self.registry))
        self._reload_lock = threading.Lock()
        self.store = AgentStore(config.database)
        self.guard = SequenceGuard(self.store.conn)
        self.ingest = Ingest(
            self.store,
            self.registry,
            self.guard,
            observer=self.metrics,
            clock=self.clock,
            max_clock_ahead_s=config.agent.max_clock_ahead_s,
            acknowledge=config.owner,
            gap_hold_s=config.broker.gap_hold_s,
        )
        self.view = StoreView(config.database)
        assert config.node_key is not None
        self.worker = IngestWorker(
            self.ingest,
            batch_max=config.broker.batch_max,
            batch_wait_s=config.broker.batch_wait_ms / 1000,
            gateway=GatewayIdentity(
                config.node_key,
                config.agent.market,
                config.agent.node_id,
                publish=config.broker.publish_gateway_readings,
            ),
            on_batch=self.metrics.batch,
            on_outbox_dropped=self.metrics.outbox_dropped.inc,
        )
        # Readings of registered meters go to the ingest worker processes when there are
        # any (never more than meters: an agent with an empty registry runs none); this
        # process's own session then only takes gateway readings and states.
        workers = min(config.broker.ingest_workers, len(self.registry))
        self.pool = (
            IngestPool(config, workers, self.metrics, on_state=self._pool_state)
            if workers
            else None
        )
        self._mqtt_up = {"link": False, "pool": self.pool is None}
        self._subscriptions: set[str] = set()
        self.link = BrokerLink(
            url=config.broker.url,
            client_id=config.broker.client_id,
            market=config.agent.market,
            node_id=config.agent.node_id,
            worker=self.worker,
            outbox=self.view,
            username=config.broker.username,
            password=config.broker_password,
            ca_file=str(config.broker.ca_file) if config.broker.ca_file else None,
            keepalive_s=config.broker.keepalive_s,
            on_connected=lambda up: self._mqtt_state(link=up),
            on_subscribed=lambda: self._subscribed("link"),
            on_board_state=lambda meter, payload: self.status.board_state(meter, payload),
            reading_filters=[] if workers else None,
            # A session that ingested the whole market before keeps that subscription.
            drop_filters=[f"mc/{config.agent.market}/r/+"] if workers else None,
        )
        self.worker.on_outbox = self.link.pump_outbox
        self.ingest.on_watermarks = self.link.publish_acks
        self.worker.acknowledge = self.link.acknowledge
        self.metrics.rejection_log_dropped.set_function(lambda: self.store.rejections_dropped)
        self.metrics.outbox_pending.set_function(self.view.outbox_pending)
        self.buses = {
            b.name: ModbusBus(
                b,
                on_error=self.metrics.modbus_error,
                on_state=self.metrics.modbus_state,
            )
            for b in config.buses
        }
        self._sources = {m.id: m.source for m in config.modbus_meters}
        self.pollers = [
            MeterPoller(m.id, self.buses[m.bus], m.unit, m.poll_interval_s, self._on_sample)
            for m in config.modbus_meters
        ]
        self.consensus: ConsensusClearing | None = None
        self.submitter: SubmitClearing | None = None
        self.reviewer: ReviewerLink | None = None
        self.status = AgentStatus(self)
        self.rounds = self._round_driver(forecaster) if forecaster is not None else None
        self._tasks: list[asyncio.Task[None]] = []

    def _forecaster(self) -> Forecaster | None:
        """The forecaster if the agent bids (raises ConfigError before any state is created)."""
        cfg = self.config
        if not cfg.microgrid.retail_price_per_kwh:
            return None
        profile = load_profile(cfg.forecast.profile_file) if cfg.forecast.profile_file else None
        if cfg.forecast.kind == "profile":
            assert profile is not None  # the config check requires the file for this kind
            return ProfileForecaster(profile)
        return PersistenceForecaster(profile)

    def _clearing(self) -> Clearing:
        market = build_market(self.config.market)
        if self.config.consensus.role == "node":
            from edge_agent.consensus_clearing import start_consensus

            self.consensus = start_consensus(
                self.config, market, on_primary_change=self.metrics.primary_changes.inc
            )
            return self.consensus
        if self.config.consensus.role == "submitter":
            from edge_agent.consensus_submit import start_submitter

            self.submitter = start_submitter(self.config)
            return self.submitter
        return StandaloneClearing(market)

    def _round_driver(self, forecaster: Forecaster) -> RoundDriver:
        cfg = self.config
        owner = cfg.owner

        def on_round(outcome: RoundOutcome) -> None:
            self.metrics.round_latency.observe(outcome.latency_s)
            self.metrics.rounds.labels("cleared" if outcome.result else "failed").inc()
            self.status.round_done(outcome)

        return RoundDriver(
            microgrid_id=owner,
            section=cfg.microgrid,
            forecaster=forecaster,
            history=lambda now: history_from_energy(self.view.hourly(owner=owner), before=now),
            clearing=self._clearing(),
            writer=SetpointWriter(
                cfg.setpoints,
                self.buses,
                on_written=lambda kind: self.metrics.setpoint_writes.labels(kind).inc(),
                on_failed=lambda kind: self.metrics.setpoint_failures.labels(kind).inc(),
            ),
            store=self.view,
            bid_lead_s=self._bid_lead_s(),
            clock=self.clock,
            wall_until=cfg.clock.wall_until,
            on_round=on_round,
        )

    def _bid_lead_s(self) -> float:
        if self.config.consensus.role == "submitter":
            from edge_agent.consensus_submit import submit_lead_s

            return submit_lead_s(self.config)
        return self.config.consensus.bid_lead_s

    def reload(self) -> bool:
        """Read the registry file again and use it; False (and the old one kept) if it is bad.

        This process's ingest swaps it in at once (readings in flight for a
        changed or removed meter are checked again at commit); the ingest
        workers are restarted one after another and read it when they start.
        """
        with self._reload_lock:  # SIGHUPs in quick succession: one reload after the other
            return self._reload()

    def _reload(self) -> bool:
        path = self.config.agent.registry
        try:
            registry = Registry.load(path)
        except (MeterChainError, OSError) as exc:
            log.error("registry not reloaded, still using the one loaded before: %s", exc)
            self.metrics.registry_reloads.labels("refused").inc()
            return False
        before = {m.id for m in self.registry}
        changed = self.ingest.set_registry(registry)
        self.registry = registry
        if self.pool is not None:
            self.pool.reload()
        after = {m.id for m in registry}
        log.info(
            "registry reloaded from %s: %d meter(s), %d added, %d removed, %d changed",
            path,
            len(after),
            len(after - before),
            len(before - after),
            len(changed - (before - after)),
        )
        self.metrics.registry_reloads.labels("loaded").inc()
        self.metrics.registered_meters.set(len(after))
        return True

    def _mqtt_state(self, **up: bool) -> None:
        """Connected means this process's session and every ingest worker's."""
        self._mqtt_up.update(up)
        self.metrics.mqtt_connected.set(1 if all(self._mqtt_up.values()) else 0)

    def ingest_failed(self) -> bool:
        """The writer of this process, or an ingest worker's, failed on storage."""
        return self.worker.stopped.is_set() or (self.pool is not None and self.pool.failed.is_set())

    def _wait_ingest_failed(self) -> None:
        while not self.ingest_failed():
            self.worker.stopped.wait(0.5)

    def _pool_state(self, up: bool) -> None:
        self._mqtt_state(pool=up)
        if up:
            self._subscribed("pool")

    def _subscribed(self, part: str) -> None:
        # From the first subscription on, the broker keeps readings for us while we are down
        # (with ingest workers: once every worker's session has its meters' filters).
        self._subscriptions.add(part)
        if self.pool is None or self._subscriptions == {"link", "pool"}:
            service.notify("STATUS=subscribed to readings")

    async def _on_sample(self, meter_id: str, sample: MeterSample) -> None:
        self.metrics.modbus_reads.labels(meter_id).inc()
        done = self.worker.submit_sample(
            meter_id, self._sources[meter_id], int(self.clock()), sample
        )
        result = await asyncio.wrap_future(done)
        if result.outcome is Outcome.REJECTED:
            log.debug("gateway reading of %s rejected: %s", meter_id, result.detail)

    async def _watchdog(self, interval_s: float) -> None:
        while not self.ingest_failed():
            service.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def _spawn(self, name: str, coro: object) -> None:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.append(task)  # kept referenced so it is never garbage-collected mid-run

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.config
        if cfg.agent.metrics_port:
            try:
                service.start_metrics_server(
                    cfg.agent.metrics_port, cfg.agent.metrics_host, self.metrics.registry,
                    service_name="agent", status=self.status.document, health=self.status.health,
                )  # fmt: skip
            except OSError as exc:
                raise ConfigError(
                    str(cfg.path),
                    "agent.metrics_port",
                    f"cannot serve /metrics on {cfg.agent.metrics_host}:{cfg.agent.metrics_port}: "
                    f"{exc.strerror}",
                ) from exc
        self.worker.start()
        if self.pool is not None:
            self.pool.start()
        self.link.start()
        if cfg.consensus.role == "node" and cfg.consensus.aggregator:
            from edge_agent.reviewer import start_reviewer

            self.reviewer = start_reviewer(cfg)
        for poller in self.pollers:
            self._spawn(f"poll-{poller.meter_id}", poller.run())
        if self.rounds is not None:
            self._spawn("rounds", self.rounds.run())
        interval = service.watchdog_interval()
        if interval:
            self._spawn("watchdog", self._watchdog(interval / 2))
        service.notify("READY=1")
        log.info(
            "agent %s started: market %s, %d Modbus meter(s), broker %s",
            cfg.agent.node_id,
            cfg.agent.market,
            len(self.pollers),
            cfg.broker.url,
        )
        writer_died = asyncio.ensure_future(asyncio.to_thread(self._wait_ingest_failed))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({writer_died, stopping}, return_when=asyncio.FIRST_COMPLETED)
        service.notify("STOPPING=1")
        log.info("stopping")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.worker.stop)
        if self.pool is not None:
            await asyncio.to_thread(self.pool.stop)
        self.link.stop()
        if self.consensus is not None:
            self.consensus.runner.stop()
        if self.submitter is not None:
            self.submitter.stop()
        if self.reviewer is not None:
            self.reviewer.close()
        for bus in self.buses.values():
            await bus.close()
        stopping.cancel()
        self.view.close()
        self.store.close()
        if self.worker.failure is not None:
            log.critical("exiting after a storage failure: %r", self.worker.failure)
            return 1
        if self.pool is not None and self.pool.failed.is_set():
            log.critical("exiting after a storage failure in an ingest worker")
            return 1
        log.info("stopped cleanly")
        return 0


def run_agent(config: AgentConfig) -> int:
    """Run until SIGTERM or SIGINT; the process exit status."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(config)

        def reload() -> None:
            # Parsing thousands of meters' keys takes a while: not on the event loop.
            done = loop.run_in_executor(None, agent.reload)
            done.add_done_callback(
                lambda f: f.exception() and log.error("reload failed: %r", f.exception())
            )

        loop.add_signal_handler(signal.SIGHUP, reload)
        return await agent.run(stop)

    return asyncio.run(main())
