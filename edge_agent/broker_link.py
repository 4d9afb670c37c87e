"""The agent's MQTT session: subscribe to readings, acknowledge after commit, publish the outbox.

paho-mqtt runs the connection in its own thread with its own reconnect and
backoff; this class owns the session policy:
- persistent session (`clean_session=False`, fixed client id) and QoS 1, so
  readings published while the agent is down wait at the broker;
- manual acknowledgement: a PUBACK is sent only when the ingest writer has
  committed the reading, the batch's PUBACKs as one write (`acknowledge`);
- acknowledgements belong to one connection: a message received on an
  earlier connection is never acked on a later one (the broker re-sends it
  with the same packet id, and a late ack could otherwise acknowledge a
  different message that reused the id before it was committed);
- the gateway outbox: rows are published QoS 1 and deleted on PUBACK; rows
  left from before a restart are published at start-up;
- end-to-end acknowledgements (edge_agent.delivery): after each commit the
  watermarks of the batch's own meters are published retained, QoS 0, many
  per write, on `mc/<market>/ack/<meter_id>`; a board frees its spool only
  on these, so a PUBACK or an acknowledgement the broker then loses (kill
  -9, a dropped queue) costs a resend, never a reading;
- the hot paths (receiving readings, PUBACKs, acknowledgements) bypass
  paho's per-packet Python (`_LeanClient`); the session stays paho's;
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
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.client import time_func as paho_clock
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MalformedPacket

from edge_agent.delivery import ack_payload
from edge_agent.gateway import gateway_subscription
from edge_agent.ingest import Result
from edge_agent.store import StoreView
from edge_agent.worker import Delivery, IngestWorker
from meterchain.backoff import paho_backoff
from meterchain.calm import CalmLog
from meterchain.mqtt_auth import ack_topic, check_name
from meterchain.mqtt_wire import PUBACK, PUBLISH, FramingError, next_packet, pubacks, publish_qos0
from meterchain.reading import Reading

log = logging.getLogger("meterchain.agent.mqtt")

# paho's in-flight limit for the outbox's QoS 1 publishes: none (0). Our own bound holds
# it (rows pumped 1000 at a time), and with a limit paho scans every queued message on
# each PUBACK (quadratic under load).
ACKS_IN_FLIGHT = 0
VERIFY_THREADS = 2  # signature checks in parallel with receiving
VERIFY_CHUNK = 32  # readings per verify task: one task (a Future, a wake-up) per chunk
RX_CHUNK = 1 << 16  # bytes taken from the TLS socket per read
RX_READS = 64  # reads per read burst before paho's loop writes (PUBACKs) and keeps alive
# Mosquitto sends each PUBLISH as its own TLS record and a read returns one record,
# so at thousands of readings a second a wake-up found one or two waiting: a pass of
# paho's loop (select, keepalive bookkeeping, GIL hand-overs) per reading or two.
# A burst that ends with fewer than RX_GATHER packets waits RX_WAIT_S once for more.
RX_GATHER = 32
RX_WAIT_S = 0.002
NO_ACK = -1  # the acknowledgement token of a QoS 0 delivery
SUBSCRIBE_BATCH = 500  # filters per (UN)SUBSCRIBE packet (10,000 meters: 20 packets)


def _paho_in_packet(head: int, body: bytearray) -> Any:
    """paho's `_in_packet` record: a whole packet read (`head` 0: nothing read yet)."""
    return {
        "command": head,
        "have_remaining": 1 if head else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": body,
        "to_process": 0,
        "pos": 0,
    }


class _LeanClient(mqtt.Client):
    """paho's client with the per-reading paths taken over.

    paho keeps the session: connecting, reconnecting with backoff,
    keepalive, (un)subscribing, the outbox's QoS 1 publishes. But its
    per-packet Python (a few TLS reads per packet, a message object, locks
    and callbacks; a socket write and a wake-up per PUBACK and per
    acknowledgement) cost more than the signature check of a reading. So:
    - the socket is read RX_CHUNK bytes at a time and every whole packet in
      the bytes is cut out at once (`meterchain.mqtt_wire`); a PUBLISH goes
      straight to `on_packet(topic, payload, mid, qos)`, every other packet
      to paho's own handler; after each read burst `after_read` runs, so
      the link hands the burst's readings to verification as chunks;
    - `send_raw(data)` queues pre-encoded packets (a batch's PUBACKs, its
      acknowledgements) as one write: one wake-up and one TLS record for
      the batch; `after_write` runs when everything queued is written.
    Relies on paho 2.x's `_sock_recv`, `_sock_close`, `_in_packet`,
    `_packet_handle`, `_packet_queue`, `_out_packet`, `_loop_rc_handle` and
    `_last_bytes_received` (paho-mqtt is pinned below 2.3 for this;
    tests/agent/test_agent_lean_link.py runs it against a real broker).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rx = bytearray()
        self._packets = 0  # PUBLISH packets handled in the current read burst
        self.on_packet: Callable[[bytes, bytes, int, int], None] = lambda t, p, m, q: None
        self.after_read: Callable[[], None] = lambda: None
        self.after_write: Callable[[], None] = lambda: None

    def _sock_close(self) -> None:
        self._rx.clear()  # never parse one connection's bytes on the next
        super()._sock_close()

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        self._packets = 0
        waited = False
        for _ in range(RX_READS):  # then paho's loop writes and keeps alive before reading on
            if self._sock is None:
                return mqtt.MQTT_ERR_NO_CONN
            try:
                chunk = self._sock_recv(RX_CHUNK)
            except BlockingIOError:
                if waited or self._packets >= RX_GATHER:
                    break
                waited = True
                time.sleep(RX_WAIT_S)
                continue
            except OSError as err:
                log.warning("failed to receive from the broker: %s", err)
                return self._loop_rc_handle(mqtt.MQTT_ERR_CONN_LOST)
            if not chunk:
                return self._loop_rc_handle(mqtt.MQTT_ERR_CONN_LOST)
            self._rx += chunk
            rc = self._cut_packets()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return self._loop_rc_handle(rc)
        with self._msgtime_mutex:
            self._last_bytes_received = paho_clock()
        self.after_read()
        return mqtt.MQTT_ERR_SUCCESS

    def _cut_packets(self) -> mqtt.MQTTErrorCode:
        """Handle every whole packet in the received bytes; keep a partial one for the next read."""
        rx, pos, sock = self._rx, 0, self._sock
        try:
            while (found := next_packet(rx, pos)) is not None:
                head, start, end = found
                pos = end
                if head & 0xF0 != PUBLISH:
                    rc = self._paho_handles(head, rx[start:end])
                    if rc != mqtt.MQTT_ERR_SUCCESS:
                        return rc
                    if self._sock is not sock:  # the handler closed the connection
                        return mqtt.MQTT_ERR_NO_CONN
                    continue
                qos = (head >> 1) & 3
                topic_end = start + 2 + (rx[start] << 8 | rx[start + 1])
                payload_at = topic_end + (2 if qos else 0)
                if qos > 1 or payload_at > end:  # subscribed at QoS 1: a QoS 2 is a broken broker
                    log.error("malformed PUBLISH from the broker (QoS %d)", qos)
                    return mqtt.MQTT_ERR_PROTOCOL
                mid = rx[topic_end] << 8 | rx[topic_end + 1] if qos else 0
                topic, payload = bytes(rx[start + 2 : topic_end]), bytes(rx[payload_at:end])
                self.on_packet(topic, payload, mid, qos)
                self._packets += 1
        except FramingError as exc:
            log.error("malformed packet from the broker: %s", exc)
            return mqtt.MQTT_ERR_PROTOCOL
        finally:
            del rx[:pos]
        return mqtt.MQTT_ERR_SUCCESS

    def _paho_handles(self, head: int, body: bytearray) -> mqtt.MQTTErrorCode:
        """Give paho one whole packet as its own reader would have left it."""
        self._in_packet = _paho_in_packet(head, body)
        try:
            return self._packet_handle()
        except MalformedPacket as exc:
            log.error("malformed packet from the broker: %s", exc)
            return mqtt.MQTT_ERR_PROTOCOL
        finally:
            self._in_packet = _paho_in_packet(0, bytearray())  # paho's reader starts afresh

    def send_raw(self, data: bytes) -> None:
        """Queue pre-encoded packets as one write (any thread; dropped at a reconnect)."""
        # The PUBACK label only keeps paho from treating the bytes as one publish.
        self._packet_queue(PUBACK, data, 0, 0)

    def writing(self) -> bool:
        return bool(self._out_packet)

    def loop_write(self) -> mqtt.MQTTErrorCode:
        rc = super().loop_write()
        if not self._out_packet:
            self.after_write()
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
        # Acknowledgements waiting for the previous write to finish (coalesced: a
        # retained topic only keeps the last one anyway), and the last sent per meter.
        self._ack_lock = threading.Lock()
        self._ack_due: dict[str, int] = {}  # meter -> watermark to publish next
        self._ack_sent: dict[str, int] = {}  # meter -> watermark last published
        self._ack_topics: dict[str, bytes] = {}  # meter -> its acknowledgement topic, encoded
        self._client = _LeanClient(
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
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._client.on_packet = self._on_packet
        self._client.after_read = self._verify_received
        self._client.after_write = self._flush_acks
        self._own_prefix_bytes = self._own_prefix.encode()
        self._status_prefix_bytes = self._status_prefix.encode()
        self._received: list[tuple[bytes, str, int]] = []  # to verify: payload, sender, ack token

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

    def _on_packet(self, topic: bytes, payload: bytes, mid: int, qos: int) -> None:
        """A PUBLISH (paho's thread): a reading, one of our own gateway's, a board's state."""
        token = self._epoch << 16 | mid if qos else NO_ACK
        if topic.startswith(self._own_prefix_bytes):
            self.acknowledge([token])
            return
        if topic.startswith(self._status_prefix_bytes):
            if self.on_board_state is not None:
                meter = topic[len(self._status_prefix_bytes) :].decode("utf-8", "replace")
                self.on_board_state(meter, payload)
            self.acknowledge([token])
            return
        sender = topic[topic.rfind(b"/") + 1 :].decode("utf-8", "replace")
        self._received.append((payload, sender, token))
        if len(self._received) >= VERIFY_CHUNK:
            self._verify_received()

    def acknowledge(self, tokens: list[int]) -> None:
        """PUBACK the deliveries among `tokens` that came on this connection, as one write.

        A token is (connection epoch << 16 | packet id), NO_ACK for a QoS 0
        delivery. One received on an earlier connection is never acked on a
        later one: the broker re-sends it with the same packet id, and a late
        ack could acknowledge a different message that reused the id before
        it was committed.
        """
        with self._lock:  # the epoch cannot move (a reconnect) between the check and the queue
            epoch = self._epoch
            mids = [t & 0xFFFF for t in tokens if t >> 16 == epoch and t != NO_ACK]
            if mids and self.connected:
                self._client.send_raw(pubacks(mids))

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
        for index, (_, sender, token) in enumerate(received):
            self.worker.submit(Delivery(checked, sender, token, index))

    def _check_all(self, payloads: list[bytes]) -> list[Reading | Result]:
        check = self.worker.ingest.check
        now = int(self.worker.ingest.clock())
        return [check(payload, now) for payload in payloads]

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        with self._lock:
            row_id = self._in_flight.pop(mid, None)
        if row_id is not None and self.outbox is not None:
            self.outbox.delete_outbox(row_id)

    # -- end-to-end acknowledgements -------------------------------------------------

    def publish_acks(self, watermarks: dict[str, int]) -> None:
        """Publish each meter's committed watermark, retained (any thread).

        QoS 0, many per write: what makes a board free its spool is the
        watermark itself, and one lost on the way (a dropped connection, a
        broker killed before it stored it) only makes the board resend after
        its ack timeout and be acknowledged again. While the previous write
        is still going out, newer watermarks wait and replace older ones, so
        a busy broker gets fewer, fresher acknowledgements instead of a
        growing queue; they never go backwards.
        """
        with self._ack_lock:
            due = self._ack_due
            for meter_id, watermark in watermarks.items():
                if watermark >= due.get(meter_id, 0):
                    due[meter_id] = watermark
        if not self._client.writing():
            self._flush_acks()

    def _resume_acks(self) -> None:
        """After a (re)connect: publish every watermark of this session again.

        What was in the socket when the connection broke may never have
        reached the broker; boards that reconnected in between look for it.
        """
        with self._ack_lock:
            self._ack_due = {**self._ack_sent, **self._ack_due}
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Write the waiting watermarks as one write (any thread; after each finished write)."""
        if not self.connected:
            return
        with self._ack_lock:
            if not self._ack_due:
                return
            due, self._ack_due = self._ack_due, {}
            self._ack_sent.update(due)
            data = b"".join(
                publish_qos0(self._ack_topic(m), ack_payload(m, w), retain=True)
                for m, w in due.items()
            )
        self._client.send_raw(data)

    def _ack_topic(self, meter_id: str) -> bytes:
        topic = self._ack_topics.get(meter_id)
        if topic is None:
            topic = self._ack_topics[meter_id] = ack_topic(self.market, meter_id).encode()
        return topic

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
