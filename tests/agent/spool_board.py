"""A paho client that behaves like a meter board towards the agent's end-to-end acknowledgement.

It keeps every reading it produced in an in-memory spool and frees one only
when the retained acknowledgement on `mc/<market>/ack/<meter_id>` carries a
watermark at or above its sequence (a PUBACK frees nothing). On every
(re)connect, and when the watermark has not moved for `ack_timeout_s` while
readings wait, it rewinds and republishes everything above the watermark,
oldest first. A watermark above the highest sequence it ever published, a
malformed payload and one naming another meter are ignored, as on a board.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from hil.broker import MosquittoBroker
from meterchain import codec
from meterchain.errors import CodecError
from meterchain.mqtt_auth import ack_topic, reading_topic


class SpoolBoard:
    def __init__(
        self,
        broker: MosquittoBroker,
        market: str,
        meter_id: str,
        password: str,
        sign: Callable[[int], bytes],
        *,
        ack_timeout_s: float = 2.0,
    ) -> None:
        self.meter_id = meter_id
        self.sign = sign  # seq -> signed reading
        self.ack_timeout_s = ack_timeout_s
        self.topic = reading_topic(market, meter_id)
        self.ack_topic = ack_topic(market, meter_id)
        self.spool: dict[int, bytes] = {}
        self.watermark = 0
        self.highest_published = 0
        self.rewinds = 0
        self._next_seq = 1
        self._lock = threading.Lock()
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"board-{meter_id}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self.client.username_pw_set(meter_id, password)
        self.client.tls_set(ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.max_inflight_messages_set(8)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(broker.host, broker.port, keepalive=5)
        self.client.loop_start()
        self._timer = threading.Thread(target=self._watch_acks, daemon=True)
        self._timer.start()

    def produce(self, count: int) -> list[int]:
        """Sample, sign and spool `count` readings, publishing each (QoS 1) if connected."""
        made = []
        for _ in range(count):
            with self._lock:
                seq = self._next_seq
                self._next_seq += 1
                self.spool[seq] = self.sign(seq)
                made.append(seq)
            self._publish(seq)
        return made

    def _publish(self, seq: int) -> None:
        with self._lock:
            payload = self.spool.get(seq)
            if payload is None:
                return
            self.highest_published = max(self.highest_published, seq)
        self.client.publish(self.topic, payload, qos=1)

    def _rewind(self) -> None:
        with self._lock:
            self.rewinds += 1
            self._last_progress = time.monotonic()
            waiting = sorted(s for s in self.spool if s > self.watermark)
        for seq in waiting:
            self._publish(seq)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc, props) -> None:  # type: ignore[no-untyped-def]
        if rc.is_failure:
            return
        client.subscribe(self.ack_topic, qos=1)
        self._rewind()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            ack = codec.decode(bytes(msg.payload))
        except CodecError:
            return
        if not isinstance(ack, dict) or ack.get(1) != self.meter_id:
            return
        watermark = ack.get(2)
        with self._lock:
            if type(watermark) is not int or watermark > self.highest_published:
                return
            if watermark > self.watermark:
                self.watermark = watermark
                self._last_progress = time.monotonic()
                for seq in [s for s in self.spool if s <= watermark]:
                    del self.spool[seq]

    def _watch_acks(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                stuck = (
                    bool(self.spool)
                    and time.monotonic() - self._last_progress > self.ack_timeout_s
                )
            if stuck and self.client.is_connected():
                self._rewind()

    def drained(self) -> bool:
        with self._lock:
            return not self.spool

    def close(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()
