"""The agent's lean MQTT paths: packets cut from any reads, PUBACKs per connection, acks resent.

`_LeanClient` replaces paho's per-packet receive path and writes a batch's
PUBACKs and acknowledgements as one write; these tests hold it to what
paho's own path guaranteed: every packet exactly once and in order however
the bytes are split, malformed framing refused, no PUBACK of an earlier
connection, and (against a real Mosquitto) the last watermarks published
again after the broker lost them.
"""

from __future__ import annotations

import ssl
import struct
import threading
import time

import paho.mqtt.client as mqtt
from agent_site import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import broker_link
from edge_agent.broker_link import NO_ACK, BrokerLink, _LeanClient
from meterchain import codec
from meterchain.mqtt_auth import node_acl, observer_acl
from meterchain.mqtt_wire import (
    FramingError,
    mqtt_str,
    next_packet,
    packet,
    pubacks,
    publish_qos0,
)

PINGRESP = b"\xd0\x00"

_publish = st.tuples(
    st.binary(min_size=1, max_size=40),  # topic
    st.binary(max_size=300),  # payload (some over 127 bytes: two-byte lengths)
    st.integers(1, 65535),  # packet id
    st.sampled_from([0, 1]),  # QoS
)


def _encode(topic: bytes, payload: bytes, mid: int, qos: int) -> bytes:
    if qos == 0:
        return publish_qos0(topic, payload)
    return packet(0x32, mqtt_str(topic) + struct.pack("!H", mid) + payload)


def _client() -> tuple[_LeanClient, list[tuple[bytes, bytes, int, int]], list[int]]:
    client = _LeanClient(mqtt.CallbackAPIVersion.VERSION2, client_id="lean-test")
    got: list[tuple[bytes, bytes, int, int]] = []
    handled: list[int] = []
    client.on_packet = lambda topic, payload, mid, qos: got.append((topic, payload, mid, qos))
    paho_handle = client._packet_handle

    def counting() -> mqtt.MQTTErrorCode:
        handled.append(client._in_packet["command"])
        return paho_handle()

    client._packet_handle = counting  # type: ignore[method-assign]
    return client, got, handled


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.one_of(_publish, st.just(None)), max_size=30),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_every_packet_comes_out_once_in_order_however_the_bytes_are_split(items, cuts) -> None:
    client, got, handled = _client()
    stream = b"".join(PINGRESP if item is None else _encode(*item) for item in items)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in zip(points, points[1:], strict=False):
        client._rx += stream[start:end]
        assert client._cut_packets() == mqtt.MQTT_ERR_SUCCESS
    expected = [(t, p, m if q else 0, q) for t, p, m, q in (i for i in items if i is not None)]
    assert got == expected
    assert handled == [0xD0] * sum(item is None for item in items)  # paho took the PINGRESPs
    assert client._rx == b""  # nothing left over, nothing parsed twice


def test_malformed_framing_is_refused_and_the_good_packets_before_it_kept() -> None:
    good = _encode(b"mc/m1/r/a", b"x", 7, 1)
    cases = {
        "QoS 2": packet(0x34, mqtt_str(b"t") + b"\x00\x01" + b"p"),
        "topic longer than the packet": packet(0x32, b"\x00\x09abc"),
        "no packet id": packet(0x32, mqtt_str(b"t")[:3]),
        "5-byte remaining length": b"\x30\xff\xff\xff\xff\x01",
    }
    for name, bad in cases.items():
        client, got, _ = _client()
        client._rx += good + bad
        assert client._cut_packets() == mqtt.MQTT_ERR_PROTOCOL, name
        assert got == [(b"mc/m1/r/a", b"x", 7, 1)], name


def test_framing_helpers() -> None:
    assert pubacks([1, 0x1234]) == b"\x40\x02\x00\x01\x40\x02\x12\x34"
    body = bytes(200)
    whole = packet(0x30, body)
    assert next_packet(whole) == (0x30, 3, 203)  # 200 = two length bytes
    assert next_packet(whole[:-1]) is None
    assert next_packet(whole[:2]) is None
    try:
        next_packet(b"\x30\x80\x80\x80\x80\x01")
    except FramingError as exc:
        assert "longer than 4 bytes" in str(exc)
    else:
        raise AssertionError("a 5-byte remaining length was accepted")


class _TrickleSocket:
    """A non-blocking TLS socket as `ssl.SSLSocket` behaves: one record per recv.

    `arrivals` are (seconds after the first recv, record); a recv before the
    next record is due raises SSLWantReadError, and an empty bytes is the
    peer closing.
    """

    def __init__(self, arrivals: list[tuple[float, bytes]]) -> None:
        self.arrivals = list(arrivals)
        self.started: float | None = None
        self.recvs = 0

    def recv(self, size: int) -> bytes:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        self.recvs += 1
        if not self.arrivals:
            raise ssl.SSLWantReadError("The operation did not complete (read)")
        due, record = self.arrivals[0]
        if now - self.started < due:
            raise ssl.SSLWantReadError("The operation did not complete (read)")
        self.arrivals.pop(0)
        assert len(record) <= size
        return record

    def close(self) -> None:
        self.arrivals = []


def test_a_trickle_of_readings_is_gathered_into_one_burst() -> None:
    """Records arriving a little apart are read in one pass, bounded by one short wait.

    Without the wait each pass of paho's loop (select, keepalive, GIL
    hand-overs) would carry one reading; a burst that already has enough
    never waits, and one that has nothing more coming returns after a single
    wait.
    """
    client, got, _ = _client()
    bursts: list[int] = []
    client.after_read = lambda: bursts.append(len(got))
    records = [_encode(b"mc/m1/r/m%d" % i, b"p" * 150, i + 1, 1) for i in range(3)]
    client._sock = _TrickleSocket([(0.0, records[0]), (0.0005, records[1]), (0.001, records[2])])
    started = time.monotonic()
    assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
    waited = time.monotonic() - started
    assert [mid for _, _, mid, _ in got] == [1, 2, 3]  # one pass took all three, in order
    assert bursts == [3]  # handed on (to verification) once
    assert broker_link.RX_WAIT_S <= waited < 1.0  # it waited once, not per record
    # A full burst does not wait: RX_GATHER records already there are read at once.
    client, got, _ = _client()
    many = [(0.0, _encode(b"t", b"x", i + 1, 1)) for i in range(broker_link.RX_GATHER)]
    client._sock = sock = _TrickleSocket(many)
    assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS
    assert len(got) == broker_link.RX_GATHER
    assert sock.recvs == broker_link.RX_GATHER + 1  # the last found nothing and it returned
    # The peer closing is still the connection lost, after the wait.
    client, got, _ = _client()
    client._sock = _TrickleSocket([(0.0, records[0]), (0.0, b"")])
    assert client.loop_read() != mqtt.MQTT_ERR_SUCCESS
    assert len(got) == 1


def test_no_puback_for_a_delivery_of_an_earlier_connection() -> None:
    link = BrokerLink(
        url="mqtt://127.0.0.1:1", client_id="agent", market="m1", node_id="mg1",
        worker=None,  # type: ignore[arg-type]  # acknowledgements only
    )  # fmt: skip
    sent: list[bytes] = []
    link._client.send_raw = sent.append  # type: ignore[method-assign]
    link.connected = True
    link._epoch = 3
    link.acknowledge([2 << 16 | 5, 3 << 16 | 6, NO_ACK, 3 << 16 | 9, 2 << 16 | 9])
    assert sent == [pubacks([6, 9])]
    link.acknowledge([2 << 16 | 7])  # nothing of this connection: no write at all
    link.connected = False
    link.acknowledge([3 << 16 | 8])  # not connected: nothing queued for the next connection
    assert sent == [pubacks([6, 9])]


def test_watermarks_are_published_again_after_the_broker_lost_them(mosquitto_factory) -> None:
    """Acknowledgements are QoS 0: a broker killed before it stored them gets them on reconnect."""
    broker = mosquitto_factory(
        users={"mg1": "pw", "observer": "pw"},
        acl=node_acl("m1", "mg1") + observer_acl("m1", "observer"),
        autosave_interval_s=3600,  # the retained acknowledgements die with the broker
    )
    link = BrokerLink(
        url=broker.url, client_id="agent-mg1", market="m1", node_id="mg1",
        worker=None,  # type: ignore[arg-type]  # acknowledgements only
        username="mg1", password="pw", ca_file=str(broker.ca_file),
    )  # fmt: skip
    link.start()
    try:
        wait_until(lambda: link.connected, 10, "the link to connect")
        link.publish_acks({"mg1-m1": 41, "mg1-m2": 7})
        link.publish_acks({"mg1-m1": 42})
        assert _retained(broker) == {"mg1-m1": 42, "mg1-m2": 7}
        broker.kill()
        broker.start()
        wait_until(lambda: link.connected, 30, "the link to reconnect")
        assert _retained(broker) == {"mg1-m1": 42, "mg1-m2": 7}
    finally:
        link.stop()


def _retained(broker) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The retained acknowledgements a subscriber gets, once both meters' have come."""
    got: dict[str, int] = {}
    lock = threading.Lock()

    def on_message(client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        ack = codec.decode(bytes(message.payload))
        with lock:
            got[ack[1]] = ack[2]

    observer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="obs")
    observer.username_pw_set("observer", "pw")
    observer.tls_set(ca_certs=str(broker.ca_file))
    observer.on_message = on_message
    observer.connect(broker.host, broker.port)
    observer.loop_start()
    try:
        observer.subscribe("mc/m1/ack/#", qos=1)
        wait_until(lambda: len(got) == 2 and got.get("mg1-m1") == 42, 15, "both acks")
    finally:
        observer.disconnect()
        observer.loop_stop()
    return got
