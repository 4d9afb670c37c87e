"""A consensus node's side of block formation over MQTT: review proposals, apply committed blocks.

`ReviewerLink` wraps a `meterchain.ledger.review.BlockReviewer` (the node's own
full ledger) with a paho client: it answers each proposal the aggregator
publishes on `mc/<market>/c/<aggregator>/block` with a signed vote or refusal on
`mc/<market>/c/<node>/block-vote`, and applies each certified block announced on
`.../committed`. A block it did not vote for (it was down, or not yet subscribed)
it applies from `.../sealed`, where the aggregator sends every certified block
with its readings (`meterchain.ledger.review.encode_sealed`; genesis is also
retained on `.../genesis`): the agent's session is persistent, so blocks
sealed while it was down wait at the broker and are applied in order when it
is back. Every `[market] checkpoint_interval_blocks` blocks the aggregator
proposes a checkpoint of its state on `.../checkpoint`; the link signs it on
`mc/<market>/c/<node>/checkpoint-vote` only if it names this copy's own state
after that block, and otherwise logs why and stays silent. The edge agent
(role "node") runs one next to its SDBFT node (`start_reviewer`); the store is
only touched from the link's own worker thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from meterchain.backoff import paho_backoff
from meterchain.calm import CalmLog
from meterchain.errors import MeterChainError
from meterchain.ledger.checkpoint import CheckpointError
from meterchain.ledger.review import BlockReviewer, ProposalError, decode_sealed
from meterchain.ledger.store import open_store
from meterchain.mqtt_auth import consensus_topic

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

log = logging.getLogger("meterchain.reviewer")


class ReviewerLink:
    def __init__(
        self,
        reviewer: BlockReviewer,
        client: mqtt.Client,
        market: str,
        aggregator_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reviewer = reviewer
        self.client = client
        self.market = market
        self.proposals = consensus_topic(market, aggregator_id, "block")
        self.committed = consensus_topic(market, aggregator_id, "committed")
        self.sealed = consensus_topic(market, aggregator_id, "sealed")
        self.genesis = consensus_topic(market, aggregator_id, "genesis")
        self.checkpoints = consensus_topic(market, aggregator_id, "checkpoint")
        self.replies = consensus_topic(market, reviewer.node_id, "block-vote")
        self.checkpoint_votes = consensus_topic(market, reviewer.node_id, "checkpoint-vote")
        self.clock = clock
        self._queue: queue.Queue[tuple[str, bytes, int, int] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="block-reviewer", daemon=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = lambda c, u: self._calm.failure(
            "review broker", "connect", "cannot connect to the broker"
        )
        self._calm = CalmLog(log, per_kind=False)
        client.on_message = lambda c, u, msg: self._queue.put(
            (msg.topic, msg.payload, msg.mid, msg.qos)
        )

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._calm.failure("review broker", "refused", f"broker refused the connection: {rc}")
            return
        self._calm.success("review broker")
        topics = (self.proposals, self.committed, self.sealed, self.genesis, self.checkpoints)
        client.subscribe([(topic, 1) for topic in topics])

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def close(self) -> None:
        """Stop reviewing, disconnect and close the node's ledger copy."""
        self.stop()
        self.client.disconnect()
        self.client.loop_stop()
        self.reviewer.store.close()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload, mid, qos = item
            try:
                if topic == self.proposals:
                    reply = self.reviewer.review(payload, int(self.clock()))
                    self.client.publish(self.replies, reply, qos=1)
                    log.debug("answered a proposal: %s", reply[:120])
                elif topic == self.committed:
                    self._committed(payload)
                elif topic in (self.sealed, self.genesis):
                    self._sealed(payload)
                elif topic == self.checkpoints:
                    self._checkpoint(payload)
            except MeterChainError as exc:
                log.warning("block message on %s not handled: %s", topic, exc)
            # Acknowledged only now, after the block is on the ledger copy (durable before
            # acknowledged): a kill -9 in between leaves it at the broker for the next start,
            # so a sealed block cannot be lost and strand the copy below a gap.
            self.client.ack(mid, qos)

    def _committed(self, payload: bytes) -> None:
        try:
            height = self.reviewer.committed(payload)
        except ProposalError as exc:
            # Not voted for (or not reviewed): the sealed copy with its readings follows.
            log.debug("committed block not applied yet: %s", exc)
            return
        log.debug("committed block %d", height)

    def _sealed(self, payload: bytes) -> None:
        """Apply a certified block we do not hold yet (checked like any block: QC, readings)."""
        block, readings = decode_sealed(payload)
        if self.reviewer.sealed(block, readings):
            log.info("applied sealed block %d (not voted for here)", block.height)

    def _checkpoint(self, payload: bytes) -> None:
        """Sign the aggregator's checkpoint proposal if it names this node's own state."""
        try:
            vote = self.reviewer.attest(payload)
        except CheckpointError as exc:
            # Not signing is the whole answer: the checkpoint needs more than n/2 members.
            log.warning("checkpoint not signed: %s", exc)
            return
        self.client.publish(self.checkpoint_votes, vote.encode(), qos=1)
        log.info("checkpoint signed", extra={"height": vote.attestation.height})


def start_reviewer(config: AgentConfig) -> ReviewerLink:
    """The agent's block reviewer on its own ledger copy and MQTT session (client `review-<id>`)."""
    import ssl
    from urllib.parse import urlsplit

    from meterchain.keys import PublicKey

    cfg = config
    assert cfg.node_key is not None
    regulator = cfg.consensus.regulator_public_key
    cfg.agent.state_dir.mkdir(parents=True, exist_ok=True)
    reviewer = BlockReviewer(
        open_store(str(cfg.ledger)),
        cfg.agent.node_id,
        cfg.node_key,
        regulator=PublicKey.from_hex(regulator) if regulator else None,
        checkpoint_interval=cfg.market.checkpoint_interval_blocks,
    )
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"review-{cfg.agent.node_id}",
        protocol=mqtt.MQTTv311,
        clean_session=False,  # sealed blocks wait at the broker while the agent is down
        manual_ack=True,  # PUBACK after the block is applied (ReviewerLink._work)
    )
    if cfg.broker.review_username:
        client.username_pw_set(cfg.broker.review_username, cfg.broker_password)
    if cfg.broker.ca_file is not None:
        client.tls_set(ca_certs=str(cfg.broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    paho_backoff(client, 0.1, 5)
    link = ReviewerLink(
        reviewer, client, cfg.agent.market, cfg.consensus.aggregator, clock=cfg.clock.now
    )
    url = urlsplit(cfg.broker.url)
    port = url.port or (8883 if url.scheme == "mqtts" else 1883)
    client.connect_async(url.hostname or "localhost", port, cfg.broker.keepalive_s)
    client.loop_start()
    link.start()
    return link
