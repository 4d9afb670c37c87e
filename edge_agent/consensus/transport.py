"""MQTT transport for one SDBFT node: paho-mqtt over TLS, QoS 1, the node's own topics only.

Two layers (STYLE rule 1). `MqttLink` owns the connection: TLS, username and
password, an MQTT v5 persistent session (clean start false, fixed client id,
one hour expiry) so the broker keeps QoS 1 messages for us while we are
away, a no-local subscription to `mc/<market>/c/#`, TCP_NODELAY, and
reconnection by paho's network thread with capped exponential backoff whose
first wait is jittered (paho doubles it after every refused or failed attempt
and resets it once a session is up), failures logged calmly (`CalmLog`).
`NodeRunner` speaks the protocol: one driver thread feeds the state machine
(received messages, application `open` calls, ticks at `next_deadline`) and
carries out its actions in order -- `Persist` records are appended to the
`RoundLog` and fsynced before anything after them is published. A node
publishes only on `mc/<market>/c/<node_id>/<kind>`, which the broker ACL
(`meterchain.mqtt_auth.node_acl`) enforces as well; the sender of a received
message is read from its topic and must match the signer.
"""

from __future__ import annotations

import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.consensus.messages import RoundId
from edge_agent.consensus.node import (
    Action,
    Broadcast,
    Commit,
    Final,
    Message,
    Node,
    Open,
    Persist,
    Tick,
)
from edge_agent.consensus.store import RoundLog
from meterchain.backoff import paho_backoff
from meterchain.calm import CalmLog
from meterchain.mqtt_auth import check_name, consensus_topic

log = logging.getLogger("meterchain.consensus")


@dataclass(frozen=True)
class MqttSettings:
    """Where and as whom to connect; defaults suit a broker on the same host."""

    host: str
    port: int
    username: str
    password: str
    ca_file: str | None = None
    client_id: str | None = None
    keepalive_s: int = 30
    backoff_min_s: float = 0.05
    backoff_max_s: float = 5.0


class MqttLink:
    """One paho client on paho's network thread, reconnecting until `close`."""

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: list[str],
        on_message: Callable[[str, bytes], None],
    ) -> None:
        self.settings = settings
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id or f"mc-{settings.username}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(settings.username, settings.password)
        if settings.ca_file:
            self.client.tls_set(ca_certs=settings.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)  # unbounded: nothing we sign may be dropped
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = lambda c, u, m: self.on_message(m.topic, m.payload)
        self._calm = CalmLog(log, per_kind=False)
        self.connected = threading.Event()
        self.connects = 0
        self._closing = False
        self._rng = random.Random()
        self._jitter_backoff()

    def _jitter_backoff(self) -> None:
        s = self.settings
        paho_backoff(self.client, s.backoff_min_s, s.backoff_max_s, self._rng)

    def start(self) -> None:
        # a persistent session: the broker keeps our subscription and queues QoS 1
        # messages for us while we are disconnected (for up to an hour)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async(
            self.settings.host,
            self.settings.port,
            self.settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._calm.failure("broker", "refused", f"broker refused the connection: {rc}")
            return
        self._calm.success("broker")
        sock = client.socket()
        if sock is not None:
            # Votes are small writes right after other small writes: without this, Nagle's
            # algorithm holds them until the previous segment's (delayed) ACK, ~40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        if self.connects > 1:
            log.info("reconnected to the broker")
        for topic in self.subscriptions:
            # no_local: the broker does not echo our own publishes back to us
            client.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=True))
        self.connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        s = self.settings
        self._calm.failure("broker", "connect", f"cannot connect to {s.host}:{s.port}")

    def _on_disconnect(self, client: mqtt.Client, *args: Any) -> None:
        if self.connected.is_set() and not self._closing:
            log.warning("connection to the broker lost; reconnecting")
            # A fresh, jittered first wait after losing a working session only: resetting it
            # after a refused attempt would retry a refusing broker at the minimum wait forever.
            self._jitter_backoff()
        self.connected.clear()

    def publish(self, topic: str, payload: bytes) -> None:
        # QoS 1: paho keeps the message until PUBACK, queues it while disconnected and
        # resends it after a reconnect (the session is persistent)
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()


class NodeRunner:
    """Drives one `Node` from MQTT messages, application calls and its own deadlines."""

    def __init__(
        self,
        node: Node,
        store: RoundLog,
        settings: MqttSettings,
        *,
        on_commit: Callable[[Commit], None] | None = None,
        on_final: Callable[[Final], None] | None = None,
        on_publish: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.market = node.market
        check_name("node id", node.node_id)
        self.on_commit = on_commit
        self.on_final = on_final
        self.on_publish = on_publish
        prefix = f"mc/{self.market}/c/"
        self.link = MqttLink(settings, [prefix + "#"], self._received)
        self.counts: Counter[str] = Counter()
        self.peers_seen: dict[str, float] = {}  # sender -> wall time of its last message
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._drive, name=f"sdbft-{node.node_id}", daemon=True
        )
        self.errors: list[str] = []

    def now_ms(self) -> int:
        return int((time.monotonic() - self._t0) * 1000)

    # --- application side ---------------------------------------------------------

    def start(self, wait_connected_s: float = 10.0) -> NodeRunner:
        self.link.start()
        self._thread.start()
        if not self.link.connected.wait(wait_connected_s):
            raise TimeoutError(f"{self.node.node_id}: no broker connection in {wait_connected_s} s")
        return self

    def open_round(
        self,
        rid: RoundId,
        *,
        deposit: bytes = b"\x00",
        body: Any = None,
        submit: bool = True,
        catch_up: bool = False,
    ) -> None:
        self._events.put(("open", (rid, deposit, body, submit, catch_up)))

    def stop(self) -> None:
        self._stop.set()
        self._events.put(("stop", None))
        self._thread.join(timeout=5)
        self.link.close()
        self.store.close()

    # --- network side -------------------------------------------------------------

    def _received(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 5 or parts[0] != "mc" or parts[1] != self.market or parts[2] != "c":
            return
        sender = parts[3]
        if sender == self.node.node_id:
            return  # our own publish echoed back
        self.counts["deliveries"] += 1
        self.counts["delivery_bytes"] += len(payload)
        self.peers_seen[sender] = time.time()  # for the agent's /status
        self._events.put(("msg", (payload, sender)))

    # --- the driver thread --------------------------------------------------------

    def _drive(self) -> None:
        while not self._stop.is_set():
            deadline = self.node.next_deadline()
            timeout = None if deadline is None else max(0.0, (deadline - self.now_ms()) / 1000)
            try:
                kind, item = self._events.get(timeout=timeout if timeout is not None else 0.5)
            except queue.Empty:
                kind, item = "tick", None
            if kind == "stop":
                return
            now = self.now_ms()
            try:
                if kind == "msg":
                    payload, sender = item
                    self._execute(self.node.step(Message(now, payload, sender)))
                elif kind == "open":
                    rid, deposit, body, submit, catch_up = item
                    event = Open(now, rid, deposit, body, submit, catch_up)
                    self._execute(self.node.step(event))
                due = self.node.next_deadline()
                if kind == "tick" or (due is not None and due <= now):
                    self._execute(self.node.step(Tick(self.now_ms())))
            except Exception as exc:  # keep the node alive; the error is logged and kept
                log.exception("consensus step failed")
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _execute(self, actions: list[Action]) -> None:
        pending: list[bytes] = []
        for action in actions:
            if isinstance(action, Persist):
                pending.append(action.record)
                continue
            if pending and isinstance(action, Broadcast):
                # durable before anything that follows is published; telling our own
                # application about a commit is not an acknowledgement and need not wait
                self.store.append(pending)
                pending = []
            if isinstance(action, Broadcast):
                topic = consensus_topic(self.market, self.node.node_id, action.kind)
                self.link.publish(topic, action.data)
                self.counts["publishes"] += 1
                self.counts["publish_bytes"] += len(action.data)
                self.counts["publish_" + action.kind] += 1
                if self.on_publish is not None:
                    self.on_publish(action.kind, action.data)
            elif isinstance(action, Commit) and self.on_commit is not None:
                self.on_commit(action)
            elif isinstance(action, Final) and self.on_final is not None:
                self.on_final(action)
        if pending:
            self.store.append(pending)


def open_store(state_dir: str | Path) -> tuple[RoundLog, list[bytes]]:
    """The node's log and the records to rebuild its state from."""
    store = RoundLog(state_dir)
    return store, store.load()
