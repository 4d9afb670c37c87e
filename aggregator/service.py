"""The aggregator service: MQTT in, blocks out, under systemd with metrics and clean shutdown.

Topics (all under `mc/<market>/`, inside the ACL blocks of `meterchain.mqtt_auth`:
the aggregator connects with `node_acl(market, node_id)`):
- reads `r/+` signed readings: verified against the meters on the ledger and
  kept in the ledger's inbox; the PUBACK is sent only once they are durable;
- reads `c/+/tx` signed transactions (committed clearings from the consensus
  agents, registrations and vetoes from the regulator, orders, certificate
  moves), kept as pending once they pass the ledger rules; every member sends
  the clearing of a final round, so a second clearing of an hour already
  cleared (on the ledger or pending) is a duplicate, counted and dropped;
- writes `c/<node_id>/block` proposals and reads `c/+/block-vote` answers;
- writes `c/<node_id>/committed` each certified block (retained), and
  `c/<node_id>/sealed` the same with its readings (block 0 also retained on
  `c/<node_id>/genesis`), from which members that did not vote apply it;
- after every `checkpoint_interval_blocks`-th block writes `c/<node_id>/checkpoint`,
  the statement of its state after that block, and reads `c/+/checkpoint-vote`:
  each member's signature is checked against the membership in force and the
  statement proposed; once more than n/2 match, the checkpoint is stored in the
  ledger, where `ledger verify` (and the next start of this service) picks it up.

Everything touching the store runs on one thread (the service loop); the MQTT
client's thread only queues messages. Block rounds follow the market clock
(`meterchain.site.clock`, from the config); the members' answers are awaited
for `vote_timeout_s` real seconds.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client import CollectorRegistry, Counter, Gauge

from aggregator.config import AggregatorConfig, ledger_target
from aggregator.former import BlockFormer, verify_for_ingest
from aggregator.status import AggregatorStatus
from meterchain import service
from meterchain.backoff import paho_backoff
from meterchain.calm import CalmLog
from meterchain.errors import MeterChainError
from meterchain.ledger import checkpoint as cp
from meterchain.ledger.block import BlockError
from meterchain.ledger.chain import StoreReadings, latest_checkpoint, verify_store
from meterchain.ledger.readings import LedgerReading
from meterchain.ledger.review import (
    Proposal,
    ProposalError,
    encode_committed,
    encode_sealed,
    parse_reply,
)
from meterchain.ledger.state import LedgerState, TxContext, membership_fields
from meterchain.ledger.store import LedgerStore, open_store, qc_bytes
from meterchain.ledger.transactions import Tx, TxError
from meterchain.mqtt_auth import consensus_topic
from meterchain.quorum import Membership

log = logging.getLogger("meterchain.aggregator")

INGEST_BATCH = 500  # readings per inbox transaction
INGEST_WAIT_S = 0.05  # longest a reading waits for its batch (and its PUBACK)


class AggregatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "meterchain_aggregator_"
        self.readings = Counter(
            p + "readings_accepted", "Readings verified into the inbox", registry=r
        )
        self.duplicates = Counter(p + "readings_duplicate", "Readings already held", registry=r)
        self.rejected = Counter(
            p + "readings_rejected", "Readings refused, by reason", ["reason"], registry=r
        )
        self.txs = Counter(p + "txs_accepted", "Transactions kept as pending", registry=r)
        self.txs_duplicate = Counter(
            p + "txs_duplicate", "Clearings of an hour already cleared (another member's copy)",
            registry=r,
        )  # fmt: skip
        self.txs_rejected = Counter(
            p + "txs_rejected", "Transactions refused on arrival", ["kind"], registry=r
        )
        self.blocks = Counter(p + "blocks_committed", "Blocks committed with a QC", registry=r)
        self.refused = Counter(
            p + "proposals_failed", "Proposals that did not get a quorum in time", registry=r
        )
        self.height = Gauge(p + "ledger_height", "Height of the last committed block", registry=r)
        self.checkpoints = Counter(
            p + "checkpoints_stored", "Checkpoints stored with > n/2 signatures", registry=r
        )
        self.checkpoint_votes = Counter(
            p + "checkpoint_votes", "Checkpoint votes counted toward a quorum", registry=r
        )
        self.checkpoint_votes_refused = Counter(
            p + "checkpoint_votes_refused",
            "Checkpoint votes not counted (another state digest, bad signature, not open)",
            registry=r,
        )
        self.inbox = Gauge(
            p + "inbox_readings", "Verified readings waiting for a block", registry=r
        )


@dataclass
class Round:
    """A proposal waiting for the members' answers."""

    proposal: Proposal
    membership: Membership
    deadline: float  # time.monotonic()
    votes: dict[str, bytes] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)


class Aggregator:
    def __init__(
        self, cfg: AggregatorConfig, *, clock: Callable[[], float] | None = None
    ) -> None:
        self.cfg = cfg
        self.clock = clock or cfg.clock.now
        self.market = cfg.aggregator.market
        self.node_id = cfg.aggregator.node_id
        self.metrics = AggregatorMetrics()
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.round: Round | None = None
        self.next_round = 0.0
        # Held while a round is decided, so `quiet_at` never sees one half-formed.
        self._round_lock = threading.Lock()
        self.connected = threading.Event()
        # Calm logs: a refusing broker or a run of failed proposals makes one ERROR line,
        # then one summary with the count a minute, then one line when it recovers.
        self._calm = CalmLog(log, per_kind=False)
        self.proposal_log = CalmLog(log)  # per reason: members refusing for a new reason is news
        self.status = AggregatorStatus(self)
        self._stopping = False
        self._pending: LedgerState | None = None  # state + pending txs, for dry runs
        self.store: LedgerStore | None = None
        self.former: BlockFormer | None = None
        self.checkpoints = cp.Collector()
        self.client = self._client()

    # --- set-up ---------------------------------------------------------------------
    def _client(self) -> mqtt.Client:
        b = self.cfg.broker
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=b.client_id or f"aggregator-{self.node_id}",
            protocol=mqtt.MQTTv311,
            clean_session=False,  # the broker keeps our QoS 1 readings while we are away
            manual_ack=True,  # PUBACK only once a reading is durable in the inbox
        )
        client.username_pw_set(b.username or self.node_id, self.cfg.password or None)
        if self.cfg.tls:
            client.tls_set(
                ca_certs=str(b.ca_file) if b.ca_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda c, u: self._calm.failure(
            "broker", "connect", f"cannot connect to {self.cfg.host}:{self.cfg.port}"
        )
        client.on_message = lambda c, u, msg: self.inbox.put(msg)
        paho_backoff(client, 1, 30)
        return client

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._calm.failure("broker", "refused", f"broker refused the connection: {rc}")
            return
        self._calm.success("broker")
        m = self.market
        client.subscribe([(f"mc/{m}/r/+", 1), (f"mc/{m}/c/+/tx", 1), (f"mc/{m}/c/+/block-vote", 1),
                          (f"mc/{m}/c/+/checkpoint-vote", 1)])  # fmt: skip
        self.connected.set()
        log.info("connected to the broker", extra={"broker": self.cfg.broker.url})

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        self.connected.clear()
        if self._stopping:
            log.info("disconnected from the broker")
        else:
            log.warning("disconnected from the broker: %s", rc)

    def open_ledger(self) -> None:
        """Open and verify the ledger before serving: every hash and QC, and every rule and
        signature after the newest stored checkpoint (from genesis without one)."""
        store = open_store(ledger_target(self.cfg))
        started = time.perf_counter()
        state, report = verify_store(
            store, regulator=self.cfg.regulator, checkpoint=latest_checkpoint(store)
        )
        if state is not None and state.market != self.market:
            raise MeterChainError(f"the ledger is for market {state.market!r}, not {self.market!r}")
        log.info(
            "ledger verified",
            extra={"blocks": report.blocks, "readings": report.readings,
                   "checkpoint": report.checkpoint,
                   "seconds": round(time.perf_counter() - started, 2)},
        )  # fmt: skip
        self.store = store
        self.former = BlockFormer(
            store, state, proposer=self.node_id,
            settle_grace_s=self.cfg.aggregator.settle_grace_s,
            max_readings=self.cfg.aggregator.max_readings_per_block,
            congestion_method=self.cfg.aggregator.congestion_method,
            remedies=self.cfg.aggregator.remedies,
        )  # fmt: skip
        self.metrics.height.set(report.blocks - 1)

    # --- the loop -------------------------------------------------------------------
    def run(self, stop: threading.Event) -> int:
        agg = self.cfg.aggregator
        self.open_ledger()
        if agg.metrics_port:
            server = service.start_metrics_server(
                agg.metrics_port, agg.metrics_host, self.metrics.registry,
                service_name="aggregator", status=self.status.document, health=self.status.health,
            )  # fmt: skip
        else:
            server = None
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.broker.keepalive_s)
        self.client.loop_start()
        watchdog = service.watchdog_interval()
        next_ping = 0.0
        service.notify("READY=1")
        log.info("aggregator started", extra={"market": self.market, "node": self.node_id})
        try:
            while not stop.is_set():
                now = time.monotonic()
                if watchdog and now >= next_ping:
                    service.notify("WATCHDOG=1")
                    next_ping = now + watchdog / 2
                self.step()
                self.status.loop_turned = time.monotonic()
        finally:
            service.notify("STOPPING=1")
            log.info("stopping")
            self._stopping = True
            self.client.disconnect()
            self.client.loop_stop()
            if server is not None:
                server.shutdown()
            if self.store is not None:
                self.store.close()
        return 0

    def step(self) -> None:
        """Handle queued messages for a moment, then advance the block round."""
        readings: list[tuple[mqtt.MQTTMessage, LedgerReading]] = []
        deadline = time.monotonic() + INGEST_WAIT_S
        while len(readings) < INGEST_BATCH:
            try:
                msg = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            try:
                got = self.handle(msg)
            except Exception:  # a bad message must never stop the service
                log.exception("message on %s could not be handled", msg.topic)
                got = None
            if got is not None:
                readings.append((msg, got))
            else:
                self._ack(msg)
        if readings:
            self._ingest(readings)
        self.advance(self.clock())

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)

    def handle(self, msg: mqtt.MQTTMessage) -> LedgerReading | None:
        """Dispatch one message; a verified reading is returned for batched ingest."""
        parts = msg.topic.split("/")
        if len(parts) == 4 and parts[2] == "r":
            return self._reading(parts[3], msg.payload)
        if len(parts) == 5 and parts[2] == "c" and parts[4] == "tx":
            self._transaction(parts[3], msg.payload)
        elif len(parts) == 5 and parts[2] == "c" and parts[4] == "block-vote":
            self._reply(parts[3], msg.payload)
        elif len(parts) == 5 and parts[2] == "c" and parts[4] == "checkpoint-vote":
            self._checkpoint_vote(parts[3], msg.payload)
        return None

    def _reading(self, meter_id: str, payload: bytes) -> LedgerReading | None:
        state = self.former.state if self.former else None
        if state is None:
            self.metrics.rejected.labels("no_ledger").inc()
            return None
        got, why = verify_for_ingest(payload, state, int(self.clock()))
        if got is None or got.meter_id != meter_id:
            reason = (why or "topic_mismatch").split(":", 1)[0]
            self.metrics.rejected.labels(reason).inc()
            log.debug("reading on %s refused: %s", meter_id, why or "meter id is not the topic's")
            return None
        return got

    def _ingest(self, batch: list[tuple[mqtt.MQTTMessage, LedgerReading]]) -> None:
        assert self.store is not None
        result = self.store.ingest_readings([r for _, r in batch])
        self.metrics.readings.inc(result.new)
        self.metrics.duplicates.inc(result.duplicate)
        for conflict in result.conflicts:
            self.metrics.rejected.labels("sequence_conflict").inc()
            log.warning("reading refused: %s", conflict)
        for msg, _ in batch:  # durable now: acknowledge
            self._ack(msg)

    def _transaction(self, sender: str, payload: bytes) -> None:
        assert self.store is not None and self.former is not None
        try:
            tx = Tx.decode(payload)
            if tx.kind in ("genesis", "readings", "settlement", "cert_issue", "contract_fire",
                           "deposit_forfeit"):  # fmt: skip
                raise TxError(f"a {tx.kind} transaction is formed by the aggregator, not sent")
            # A dry run against the ledger plus what is already pending (a meter may follow
            # its owner's admission before a block holds either); checked again in its block.
            pending = self._pending_state()
            if tx.kind == "clearing" and tx.body.get("hour") in pending.clearings:
                self.metrics.txs_duplicate.inc()
                log.debug("clearing of hour %s from %s: already held", tx.body["hour"], sender)
                return
            trial = pending.copy()
            trial.apply(
                tx, TxContext(trial.height, 0, trial.time, (), False, StoreReadings(self.store))
            )
        except (TxError, MeterChainError) as exc:
            kind = tx.kind if "tx" in locals() else "malformed"
            self.metrics.txs_rejected.labels(kind).inc()
            log.warning("transaction from %s refused: %s", sender, exc)
            return
        if self.store.submit_tx(tx, int(self.clock())):
            self._pending = trial
            self.metrics.txs.inc()
            log.info("transaction pending", extra={"kind": tx.kind, "sender": sender})

    def _pending_state(self) -> LedgerState:
        """The ledger state with the pending transactions applied, as the next block begins."""
        assert self.store is not None and self.former is not None
        if self._pending is None:
            state = self.former.state
            if state is None:
                raise TxError("the ledger has no genesis block yet")
            head = self.store.head()
            trial = state.copy()
            trial.begin_block(head[0] + 1 if head else 0, max(int(self.clock()), state.time))
            source = StoreReadings(self.store)
            for pending in self.store.pending_txs():
                attempt = trial.copy()
                try:
                    attempt.apply(
                        pending, TxContext(trial.height, 0, trial.time, (), False, source)
                    )
                except TxError:
                    continue  # the block former drops it with its reason
                trial = attempt
            self._pending = trial
        return self._pending

    def _reply(self, sender: str, payload: bytes) -> None:
        current = self.round
        try:
            reply = parse_reply(payload)
        except ProposalError as exc:
            log.warning("bad block reply from %s: %s", sender, exc)
            return
        block = current.proposal.block if current else None
        if (
            current is None
            or block is None
            or reply.node_id != sender
            or (reply.market, reply.height, reply.header_hash)
            != (self.market, block.height, block.hash)
        ):
            return  # an answer to another (older) proposal
        key = current.membership.key_of(sender)
        if key is None:
            return
        self.status.peers_seen[sender] = time.time()
        if reply.kind == "block-vote":
            if key.verify(reply.signature, block.statement()):
                current.votes[sender] = reply.signature
        else:
            current.refusals[sender] = reply.reason

    def _checkpoint_vote(self, sender: str, payload: bytes) -> None:
        assert self.store is not None
        try:
            checkpoint = self.checkpoints.add(sender, payload)
        except cp.CheckpointError as exc:
            self.metrics.checkpoint_votes_refused.inc()
            log.warning("checkpoint vote from %s refused: %s", sender, exc)
            return
        self.metrics.checkpoint_votes.inc()
        if checkpoint is None:
            return
        self.store.put_checkpoint(
            checkpoint.height, checkpoint.block_hash, checkpoint.digest, checkpoint.state,
            qc_bytes(checkpoint.qc),
        )  # fmt: skip
        self.metrics.checkpoints.inc()
        log.info(
            "checkpoint stored",
            extra={"height": checkpoint.height, "signers": ",".join(checkpoint.qc.signers),
                   "state_bytes": len(checkpoint.state)},
        )  # fmt: skip

    # --- block rounds ---------------------------------------------------------------
    def quiet_at(self, now: float) -> bool:
        """True when no proposal is in flight and none is due at clock time `now`."""
        with self._round_lock:
            return self.round is None and self.next_round > now

    def advance(self, now: float) -> None:
        with self._round_lock:
            self._advance(now)

    def _advance(self, now: float) -> None:
        assert self.store is not None and self.former is not None
        if self.round is not None:
            r = self.round
            if len(r.votes) >= r.membership.quorum:
                self._commit(r)
            elif (
                time.monotonic() >= r.deadline
                or len(r.refusals) > r.membership.n - r.membership.quorum
            ):
                self._give_up(r)
            return
        if not self.connected.is_set():
            return
        # Genesis is proposed again as soon as a proposal failed (the members may still be
        # starting); later blocks follow the block interval of the market clock.
        if now < self.next_round and self.former.state is not None:
            return
        self.next_round = now + self.cfg.aggregator.block_interval_s
        self.metrics.inbox.set(self.store.inbox_count())
        if self.former.state is None:
            genesis = Tx.make(
                "genesis",
                {"market": self.market, "time": int(now),
                 "regulator": self.cfg.regulator.point,
                 **membership_fields(self.cfg.membership)},
            )  # fmt: skip
            extra = [Tx.decode(raw) for raw in self.cfg.genesis_txs]
            proposal = self.former.propose_genesis(genesis, extra, int(now))
            membership = self.cfg.membership
        else:
            formation = self.former.propose(int(now))
            self._pending = None  # the former may have dropped what no longer passes
            for tx, why in formation.dropped:
                log.warning("pending %s dropped: %s", tx.kind, why)
            if formation.proposal is None:
                return
            proposal = formation.proposal
            membership = self.former.state.membership
        self.round = Round(
            proposal, membership, time.monotonic() + self.cfg.aggregator.vote_timeout_s
        )
        self.client.publish(
            consensus_topic(self.market, self.node_id, "block"), proposal.encode(), qos=1
        )
        log.info(
            "block proposed",
            extra={"height": proposal.block.height, "txs": len(proposal.block.txs)},
        )

    def _commit(self, r: Round) -> None:
        assert self.former is not None
        self.round = None
        self._pending = None
        try:
            block = self.former.commit(r.proposal, r.votes.items())
        except (BlockError, TxError, MeterChainError) as exc:
            log.error("block %d could not be committed: %s", r.proposal.block.height, exc)
            return
        self.proposal_log.success("proposals")
        self.metrics.blocks.inc()
        self.metrics.height.set(block.height)
        self.client.publish(
            consensus_topic(self.market, self.node_id, "committed"),
            encode_committed(block),
            qos=1,
            retain=True,
        )
        # With its readings, for members that did not vote for it (edge_agent.reviewer).
        sealed = encode_sealed(block, r.proposal.readings)
        self.client.publish(consensus_topic(self.market, self.node_id, "sealed"), sealed, qos=1)
        if block.height == 0:
            self.client.publish(
                consensus_topic(self.market, self.node_id, "genesis"), sealed, qos=1, retain=True
            )
        if cp.is_due(block.height, self.cfg.aggregator.checkpoint_interval_blocks):
            self._propose_checkpoint(block.hash)
        log.info(
            "block committed",
            extra={"height": block.height, "hash": block.hash.hex()[:16],
                   "signers": ",".join(sorted(r.votes))},
        )  # fmt: skip

    def _propose_checkpoint(self, block_hash: bytes) -> None:
        """Ask the members to sign the state after the block just committed (and sealed, so a
        member that applies it from there has it first)."""
        assert self.former is not None and self.former.state is not None
        try:
            statement = self.checkpoints.propose(self.former.state, block_hash)
        except cp.CheckpointError as exc:  # the block stands; only its checkpoint is missed
            log.error("checkpoint at height %d not proposed: %s", self.former.state.height, exc)
            return
        self.client.publish(
            consensus_topic(self.market, self.node_id, "checkpoint"), statement, qos=1
        )

    def _give_up(self, r: Round) -> None:
        self.round = None
        self.metrics.refused.inc()
        reasons = "; ".join(f"{n}: {why}" for n, why in sorted(r.refusals.items())) or "no answer"
        summary = f"block {r.proposal.block.height} got {len(r.votes)} vote(s): {reasons}"
        self.proposal_log.failure("proposals", reasons, f"proposal failed: {summary}")
