"""The agent's MQTT session: subscribe to readings, acknowledge after commit, publish the outbox.

paho-mqtt runs the connection in its own thread with its own reconnect and
backoff; this class owns the session policy:
- persistent session (`clean_session=False`, fixed client id) and QoS 1, so
  readings published while the agent is down wait at the broker;
- manual acknowledgement: a PUBACK is sent only when the ingest writer has
  committed the reading (`Delivery.ack`);
- acknowledgements belong to one connection: a message received on an
  earlier connection is never acked on a later one (the broker re-sends it
  with the same packet id, and a late ack could otherwise acknowledge a
  different message that reused the id before it was committed);
- the gateway outbox: rows are published QoS 1 and deleted on PUBACK; rows
  left from before a restart are published at start-up;
- end-to-end acknowledgements (edge_agent.delivery): after each commit the
  watermarks of the batch's own meters are published retained, QoS 1, on
  `mc/<market>/ack/<meter_id>`; a board frees its spool only on these, so a
  PUBACK the broker then loses (kill -9, a dropped queue) costs a resend,
  never a reading;
- which readings: the whole market (`mc/<market>/r/+`), or, in an ingest
  worker process (edge_agent.ingest_pool), explicit per-meter filters for
  the meters it owns, subscribed in batches. The persistent session keeps
  old subscriptions, so filters another session now owns are unsubscribed
  on every connect.
"""

from __future__ import annotations

import concurrent.futures
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.delivery import ack_payload
from edge_agent.gateway import gateway_subscription
from edge_agent.ingest import Result
from edge_agent.store import StoreView
from edge_agent.worker import Delivery, IngestWorker
from meterchain.backoff import paho_backoff
from meterchain.calm import CalmLog
from meterchain.mqtt_auth import ack_topic, check_name
from meterchain.reading import Reading

log = logging.getLogger("meterchain.agent.mqtt")

# paho's in-flight limit for what this link publishes: none (0). Our own bounds hold it
# (one acknowledgement in flight per meter, outbox rows pumped 1000 at a time), and
# with a limit paho scans every queued message on each PUBACK (quadratic under load).
ACKS_IN_FLIGHT = 0
VERIFY_THREADS = 2  # signature checks in parallel with receiving
VERIFY_CHUNK = 32  # readings per verify task: one task (a Future, a wake-up) per chunk
RX_CHUNK = 1 << 16  # bytes taken from the TLS socket per read
SUBSCRIBE_BATCH = 500  # filters per (UN)SUBSCRIBE packet (10,000 meters: 20 packets)


class _ChunkedClient(mqtt.Client):
    """paho's client with a leaner receive path.

    paho reads a packet a few bytes at a time (type, length, body: about four
    TLS reads per reading, each a GIL hand-over the verify threads and the
    writer then compete for); this reads the socket in RX_CHUNK pieces and
    serves paho from them. After each read burst it calls `after_read`, so
    the link hands the readings of the burst to verification as chunks.
    Relies on paho 2.x's `_sock_recv`/`_sock_close`/`loop_read`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rx = b""
        self._rx_at = 0
        self.after_read: Callable[[], None] = lambda: None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rx_at >= len(self._rx):
            chunk = super()._sock_recv(RX_CHUNK)  # BlockingIOError when nothing is there
            if not chunk:
                return chunk  # the connection closed
            self._rx, self._rx_at = chunk, 0
        data = self._rx[self._rx_at : self._rx_at + bufsize]
        self._rx_at += len(data)
        return data

    def _sock_close(self) -> None:
        self._rx, self._rx_at = b"", 0  # never parse one connection's bytes on the next
        super()._sock_close()

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        # Select would not wake for bytes already taken off the socket: read them now.
        rc = super().loop_read(max_packets)
        while rc == mqtt.MQTT_ERR_SUCCESS and self._rx_at < len(self._rx):
            rc = super().loop_read(max_packets)
        self.after_read()
        return rc


class BrokerLink:
    def __init__(
        self,
        *,
        url: str,
        client_id: str,
        market: str,
        node_id: str,
        worker: IngestWorker,
        outbox: StoreView | None = None,
        username: str = "",
        password: str = "",
        ca_file: str | None = None,
        keepalive_s: int = 30,
        on_connected: Callable[[bool], None] | None = None,
        on_subscribed: Callable[[], None] | None = None,
        on_board_state: Callable[[str, bytes], None] | None = None,
        reading_filters: list[str] | None = None,
        gateway_readings: bool = True,
        drop_filters: list[str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.tls = parts.scheme == "mqtts"
        self.port = parts.port or (8883 if self.tls else 1883)
        self.market = check_name("market", market)
        # Our own gateway readings come back through the subscription; they were
        # committed before being published, so they are acknowledged unread.
        self._own_prefix = f"mc/{self.market}/c/{check_name('node id', node_id)}/gw/"
        self._stopping = False
        self.worker = worker
        self.outbox = outbox
        self.keepalive_s = keepalive_s
        self.on_connected = on_connected or (lambda up: None)
        self.on_subscribed = on_subscribed or (lambda: None)
        # Boards' retained online states (mc/<market>/status/<meter>), for the agent's /status.
        self.on_board_state = on_board_state
        self._status_prefix = f"mc/{self.market}/status/"
        self._status_mid: int | None = None
        # Readings: the whole market unless an ingest worker names its meters' topics.
        self.reading_filters = (
            [f"mc/{self.market}/r/+"] if reading_filters is None else list(reading_filters)
        )
        self.gateway_readings = gateway_readings
        self.drop_filters = list(drop_filters or [])
        self._subscribe_mids: set[int] = set()
        self.connected = False
        self._epoch = 0
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # mid -> outbox row id
        self._verify = concurrent.futures.ThreadPoolExecutor(
            VERIFY_THREADS, thread_name_prefix="verify"
        )
        # Acknowledgements: at most one in flight per meter, the newest watermark waiting
        # behind it (a retained topic only keeps the last one anyway).
        self._ack_lock = threading.Lock()
        self._ack_due: dict[str, int] = {}  # meter -> watermark to publish next
        self._ack_busy: set[str] = set()  # meters with an acknowledgement in flight
        self._ack_mids: dict[int, str] = {}  # mid -> meter
        self._ack_early: set[int] = set()  # PUBACKed before publish() returned its mid
        self._client = _ChunkedClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        # Acknowledgements and outbox rows in flight at once: unlimited (see ACKS_IN_FLIGHT).
        self._client.max_inflight_messages_set(ACKS_IN_FLIGHT)
        if username:
            self._client.username_pw_set(username, password)
        if self.tls:
            self._client.tls_set(ca_certs=ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        paho_backoff(self._client, 1, 30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._calm = CalmLog(log, per_kind=False)  # a refusing broker: one line, then summaries
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.after_read = self._verify_received
        self._received: list[tuple[bytes, str, Callable[[], None]]] = []  # to verify

    @property
    def topics(self) -> list[tuple[str, int]]:
        gateway = [gateway_subscription(self.market)] if self.gateway_readings else []
        return [(topic, 1) for topic in self.reading_filters + gateway]

    def start(self) -> None:
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly; unacknowledged readings stay in the broker's session."""
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._verify.shutdown(wait=False)  # what the writer still waits for completes

    # -- paho callbacks (paho's thread) ---------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            self._calm.failure("broker", "refused", f"{self.host}:{self.port} refused: {rc}")
            return
        self._calm.success("broker")
        with self._lock:
            self._epoch += 1
            self._in_flight.clear()
        self.connected = True
        log.info(
            "connected to %s:%d (session present: %s)", self.host, self.port, flags.session_present
        )
        for i in range(0, len(self.drop_filters), SUBSCRIBE_BATCH):
            client.unsubscribe(self.drop_filters[i : i + SUBSCRIBE_BATCH])
        topics = self.topics
        with self._lock:
            self._subscribe_mids.clear()
            for i in range(0, len(topics), SUBSCRIBE_BATCH):
                self._subscribe_mids.add(client.subscribe(topics[i : i + SUBSCRIBE_BATCH])[1])
        if not topics:  # a worker whose partition holds no meter yet
            self.on_subscribed()
        if self.on_board_state is not None:  # apart, so an ACL without it refuses only this
            self._status_mid = client.subscribe(self._status_prefix + "+", 1)[1]
        self.on_connected(True)
        self.pump_outbox()
        self._resume_acks()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._calm.failure("broker", "connect", f"cannot connect to {self.host}:{self.port}")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        with self._lock:
            self._epoch += 1
        if self.connected and not self._stopping:
            log.warning("disconnected from %s:%d: %s", self.host, self.port, rc)
        self.connected = False
        self.on_connected(False)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        refused = [code for code in codes if code.is_failure]
        if mid == self._status_mid:
            if refused:
                log.warning("boards' online states are not readable: %s (broker ACL)", refused)
            return
        if refused:
            log.error("broker refused %d of the reading subscriptions: %s", len(refused), refused)
            return
        with self._lock:
            self._subscribe_mids.discard(mid)
            complete = not self._subscribe_mids
        if complete:
            self.on_subscribed()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        epoch = self._epoch
        mid, qos = message.mid, message.qos

        def ack() -> None:
            with self._lock:
                if self._epoch == epoch and qos:
                    client.ack(mid, qos)

        if message.topic.startswith(self._own_prefix):
            ack()
            return
        if message.topic.startswith(self._status_prefix) and self.on_board_state is not None:
            self.on_board_state(message.topic[len(self._status_prefix) :], bytes(message.payload))
            ack()
            return
        sender = message.topic.rsplit("/", 1)[-1]
        self._received.append((message.payload, sender, ack))
        if len(self._received) >= VERIFY_CHUNK:
            self._verify_received()

    def _verify_received(self) -> None:
        """Hand the readings received so far to the verify threads, as one task (paho's thread).

        OpenSSL releases the GIL, so they use the cores while this thread reads
        on; the writer takes the results in arrival order and only guards and
        commits.
        """
        received = self._received
        if not received:
            return
        self._received = []
        checked = self._verify.submit(self._check_all, [payload for payload, _, _ in received])
        for index, (_, sender, ack) in enumerate(received):
            self.worker.submit(Delivery(checked, sender, ack, index))

    def _check_all(self, payloads: list[bytes]) -> list[Reading | Result]:
        check = self.worker.ingest.check
        now = int(self.worker.ingest.clock())
        return [check(payload, now) for payload in payloads]

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        with self._lock:
            row_id = self._in_flight.pop(mid, None)
        if row_id is not None:
            if self.outbox is not None:
                self.outbox.delete_outbox(row_id)
            return
        with self._ack_lock:
            meter_id = self._ack_mids.pop(mid, None)
            if meter_id is None:
                self._ack_early.add(mid)
                return
            next_ack = self._next_ack(meter_id)
        if next_ack is not None:
            self._send_ack(*next_ack)

    # -- end-to-end acknowledgements -------------------------------------------------

    def publish_acks(self, watermarks: dict[str, int]) -> None:
        """Publish each meter's committed watermark, retained, QoS 1 (any thread).

        One acknowledgement per meter is in flight at a time; a newer
        watermark waits behind it and replaces any older one still waiting,
        so a busy broker gets fewer, fresher acknowledgements instead of a
        growing queue. paho keeps what is in flight across reconnects; a board
        that misses one resends and gets the next (a duplicate is
        acknowledged again).
        """
        with self._ack_lock:
            due = self._ack_due
            for meter_id, watermark in watermarks.items():
                if watermark >= due.get(meter_id, 0):
                    due[meter_id] = watermark
            ready = [self._next_ack(m) for m in watermarks if m not in self._ack_busy]
        for meter_id, watermark in filter(None, ready):
            self._send_ack(meter_id, watermark)

    def _resume_acks(self) -> None:
        """After a (re)connect nothing is waited for: send every watermark still due.

        paho resends what was in flight itself; forgetting it here means a
        lost PUBACK can never keep a meter's acknowledgements stuck.
        """
        with self._ack_lock:
            self._ack_busy.clear()
            self._ack_mids.clear()
            self._ack_early.clear()
            ready = [self._next_ack(m) for m in list(self._ack_due)]
        for meter_id, watermark in filter(None, ready):
            self._send_ack(meter_id, watermark)

    def _next_ack(self, meter_id: str) -> tuple[str, int] | None:
        """Take the meter's waiting watermark and mark it in flight (holding the ack lock)."""
        watermark = self._ack_due.pop(meter_id, None)
        if watermark is None:
            self._ack_busy.discard(meter_id)
            return None
        self._ack_busy.add(meter_id)
        return meter_id, watermark

    def _send_ack(self, meter_id: str, watermark: int) -> None:
        # Outside the ack lock: paho calls _on_publish holding its own message lock,
        # which publish() takes too.
        info = self._client.publish(
            ack_topic(self.market, meter_id), ack_payload(meter_id, watermark), qos=1, retain=True
        )
        with self._ack_lock:
            if info.mid not in self._ack_early:
                self._ack_mids[info.mid] = meter_id
                return
            self._ack_early.discard(info.mid)
            next_ack = self._next_ack(meter_id)
        if next_ack is not None:
            self._send_ack(*next_ack)

    # -- outbox ----------------------------------------------------------------------

    def pump_outbox(self) -> None:
        """Publish outbox rows not already in flight (any thread)."""
        if self.outbox is None or not self.connected:
            return
        with self._lock:
            busy = set(self._in_flight.values())
            for row_id, topic, payload in self.outbox.outbox():
                if row_id in busy:
                    continue
                info = self._client.publish(topic, payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                self._in_flight[info.mid] = row_id
