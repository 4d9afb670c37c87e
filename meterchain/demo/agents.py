"""The demo's edge agents: SDBFT consensus members over MQTT, a submit-only agent, block review.

A `ConsensusAgent` wraps the pure state machine `edge_agent.consensus.node.Node`
with the market contract `edge_agent.consensus.contracts.ClearingContract`:
messages travel over MQTT (`mc/<market>/c/<node>/<kind>`, QoS 1), `Persist`
records are written to the agent's folder before anything that follows is
published, and ticks come from a thread that wakes at the node's next
deadline. Time inside consensus is real milliseconds (the synchronous bound
Δ is real), only the market clock is simulated. Each consensus agent also
keeps its own full copy of the ledger and reviews (re-executes, then signs or
refuses) the blocks the aggregator proposes (`meterchain.ledger.review.BlockReviewer`).
A `SubmitOnlyAgent` signs and publishes its trade request and never votes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.consensus.contracts import ClearingContract
from edge_agent.consensus.messages import Request, RoundId
from edge_agent.consensus.node import Broadcast, Commit, Final, Message, Node, Open, Persist, Tick
from edge_agent.consensus.signing import Keyring, P256Signer
from edge_agent.consensus_submit import request_message
from meterchain.errors import MeterChainError
from meterchain.keys import PrivateKey, PublicKey
from meterchain.market.model import Market, TradeRequest


class AgentError(MeterChainError):
    """A demo agent could not reach the broker or its round did not commit in time."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str = ""
    password: str = ""
    ca_file: str | None = None


def mqtt_client(
    client_id: str,
    broker: BrokerAddress,
    subscriptions: Sequence[str] = (),
    on_message: Any = None,
    *,
    persistent: bool = False,
) -> mqtt.Client:
    """A connected paho client with its network loop running (raises AgentError if refused).

    `subscriptions` are (re)subscribed at QoS 1 on every connect, so the client
    keeps receiving after a broker restart; the first connect waits for SUBACK.
    `persistent` asks the broker to keep the session (and queue QoS 1 messages)
    while the client is away. `client.mc_subscribed` is set while subscribed.
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.ca_file:
        client.tls_set(ca_certs=broker.ca_file)
    connected = threading.Event()
    subscribed = threading.Event()

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            return
        for topic in subscriptions:
            c.subscribe(topic, qos=1)
        connected.set()

    client.on_connect = on_connect  # type: ignore[assignment]
    if on_message is not None:
        client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()  # type: ignore[assignment]
    client.on_disconnect = lambda *args: subscribed.clear()  # type: ignore[assignment]
    client.mc_subscribed = subscribed  # type: ignore[attr-defined]
    client.reconnect_delay_set(0.05, 1)
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise AgentError(f"{client_id}: cannot reach the broker {broker.host}:{broker.port}: "
                         f"{exc}") from exc  # fmt: skip
    client.loop_start()
    if not connected.wait(10) or (subscriptions and not subscribed.wait(10)):
        client.loop_stop()
        raise AgentError(f"{client_id}: broker {broker.host}:{broker.port} did not accept us")
    return client


class HourlyClearing:
    """SC1 clearing for rounds whose sequence number is the hour of the day (0-23)."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self._by_hour: dict[int, ClearingContract] = {}

    def contract(self, hour: int) -> ClearingContract:
        if hour not in self._by_hour:
            self._by_hour = {hour: ClearingContract(self.market, hour)}  # only the current one
        return self._by_hour[hour]

    def execute(self, requests: Sequence[Request]) -> Any:
        return self.contract(requests[0].env.round.seq % 24).execute(requests)

    def check(self, requests: Sequence[Request], result: Any) -> bool:
        return self.contract(requests[0].env.round.seq % 24).check(requests, result)


@dataclass
class Committed:
    round: RoundId
    view: int
    value: Any
    certificate: Any


class ConsensusAgent:
    """One consensus member: an SDBFT `Node` on MQTT plus its own ledger copy and reviewer."""

    def __init__(
        self,
        node_id: str,
        key: PrivateKey,
        keyring: Keyring,
        market: Market,
        broker: BrokerAddress,
        folder: Path,
        *,
        delta_ms: int,
        contract: Any = None,
        node_factory: Any = Node,
    ) -> None:
        self.node_id = node_id
        self.key = key
        self.market_name = keyring.membership.market
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.contract = contract if contract is not None else HourlyClearing(market)
        records = [p.read_bytes() for p in sorted(folder.glob("round-*.cbor"))]
        self.node = node_factory(
            P256Signer(node_id, key), keyring, {"clear": self.contract},
            delta_ms=delta_ms, records=records,
        )  # fmt: skip
        self.commits: dict[RoundId, Committed] = {}
        self.finals: dict[RoundId, Any] = {}
        self.seen_requests: dict[RoundId, set[str]] = {}
        self._changed = threading.Condition()
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self.client = mqtt_client(
            f"agent-{node_id}", broker, [f"mc/{self.market_name}/c/+/+"], self._on_message
        )
        self._thread = threading.Thread(target=self._loop, name=f"sdbft-{node_id}", daemon=True)
        self._thread.start()

    # --- transport ---------------------------------------------------------------------
    def now_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 5 or parts[3] == self.node_id:
            return  # not a consensus topic, or our own publish echoed back
        self._inbox.put(("msg", (bytes(msg.payload), parts[3], parts[4])))

    def open(self, rid: RoundId, trade: TradeRequest) -> None:
        body = trade.to_dict()
        self._inbox.put(("open", (rid, b"deposit:" + self.node_id.encode(), body)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            deadline = self.node.next_deadline()
            wait = 0.05 if deadline is None else max(0.0, (deadline - self.now_ms()) / 1000)
            try:
                kind, item = self._inbox.get(timeout=min(wait, 0.05))
            except queue.Empty:
                self._handle(self.node.step(Tick(self.now_ms())))
                continue
            if kind == "open":
                rid, deposit, body = item
                self._handle(self.node.step(Open(self.now_ms(), rid, deposit, body)))
            else:
                data, sender, topic_kind = item
                if topic_kind == "req":
                    self._note_request(data, sender)
                self._handle(self.node.step(Message(self.now_ms(), data, sender)))

    def _note_request(self, data: bytes, sender: str) -> None:
        try:
            env = self.node.decoder.envelope(data)
        except MeterChainError:
            return
        with self._changed:
            self.seen_requests.setdefault(env.round, set()).add(sender)
            self._changed.notify_all()

    def _persist(self, action: Persist) -> None:
        # Durable before anything after it is published (write, fsync, rename).
        path = self.folder / f"round-{action.round.seq:06d}-{action.round.kind}.cbor"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(action.record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _handle(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Persist):
                self._persist(action)
            elif isinstance(action, Broadcast):
                topic = f"mc/{self.market_name}/c/{self.node_id}/{action.kind}"
                self.client.publish(topic, action.data, qos=1)
            elif isinstance(action, Commit):
                with self._changed:
                    self.commits[action.round] = Committed(
                        action.round, action.view, action.value, action.certificate
                    )
                    self._changed.notify_all()
            elif isinstance(action, Final):
                with self._changed:
                    self.finals[action.round] = action
                    self._changed.notify_all()

    def wait_requests(self, rid: RoundId, senders: set[str], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: senders <= self.seen_requests.get(rid, set()), timeout
            )

    def wait_commit(self, rid: RoundId, timeout: float) -> Committed | None:
        with self._changed:
            self._changed.wait_for(lambda: rid in self.commits, timeout)
            return self.commits.get(rid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


class SubmitOnlyAgent:
    """A microgrid outside the consensus set: submits its signed request, receives results."""

    def __init__(self, node_id: str, key: PrivateKey, market_name: str,
                 broker: BrokerAddress) -> None:  # fmt: skip
        self.node_id = node_id
        self.key = key
        self.market_name = market_name
        self.client = mqtt_client(f"agent-{node_id}", broker)

    def submit(self, rid: RoundId, trade: TradeRequest) -> None:
        raw = request_message(self.market_name, rid, self.node_id, self.key, trade)
        info = self.client.publish(f"mc/{self.market_name}/c/{self.node_id}/req", raw, qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def keyring_for(membership: Any, participants: dict[str, PublicKey]) -> Keyring:
    return Keyring(membership, participants)
