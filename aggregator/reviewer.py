"""A consensus node's side of block formation over MQTT: review proposals, apply committed blocks.

`ReviewerLink` wraps a `meterchain.ledger.review.BlockReviewer` (the node's own
full ledger) with a paho client: it answers each proposal the aggregator
publishes on `mc/<market>/c/<aggregator>/block` with a signed vote or refusal on
`mc/<market>/c/<node>/block-vote`, and applies each certified block announced on
`.../committed`. The edge agent runs one next to its SDBFT node; the store is
only touched from the link's own worker thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from meterchain.errors import MeterChainError
from meterchain.ledger.review import BlockReviewer
from meterchain.mqtt_auth import consensus_topic

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
        self.replies = consensus_topic(market, reviewer.node_id, "block-vote")
        self.clock = clock
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="block-reviewer", daemon=True)
        client.on_connect = self._on_connect
        client.on_message = lambda c, u, msg: self._queue.put((msg.topic, msg.payload))

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if not rc.is_failure:
            client.subscribe([(self.proposals, 1), (self.committed, 1)])

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload = item
            try:
                if topic == self.proposals:
                    reply = self.reviewer.review(payload, int(self.clock()))
                    self.client.publish(self.replies, reply, qos=1)
                    log.debug("answered a proposal: %s", reply[:120])
                elif topic == self.committed:
                    height = self.reviewer.committed(payload)
                    log.debug("committed block %d", height)
            except MeterChainError as exc:
                log.warning("block message on %s not handled: %s", topic, exc)
