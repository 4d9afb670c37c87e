"""The test broker is a real Mosquitto: TLS, passwords, and ACLs binding a meter to its topic."""

from __future__ import annotations

import queue
import ssl
import time

import paho.mqtt.client as mqtt
import pytest

from hil.broker import MosquittoBroker
from meterchain.mqtt_auth import meter_acl, observer_acl, reading_topic


def _client(broker: MosquittoBroker, user: str, password: str) -> mqtt.Client:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}", protocol=mqtt.MQTTv311
    )
    client.username_pw_set(user, password)
    client.tls_set(ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def _connect(client: mqtt.Client, broker: MosquittoBroker) -> int:
    result: queue.Queue[int] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: result.put(rc.value)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        return result.get(timeout=5)
    except queue.Empty:
        return -1


@pytest.fixture
def broker(mosquitto_factory) -> MosquittoBroker:
    acl = meter_acl("m1", "meter-a") + meter_acl("m1", "meter-b") + observer_acl("m1", "agg")
    return mosquitto_factory(users={"meter-a": "pa", "meter-b": "pb", "agg": "pg"}, acl=acl)


def test_wrong_password_is_refused(broker: MosquittoBroker) -> None:
    client = _client(broker, "meter-a", "wrong")
    try:
        assert _connect(client, broker) != 0
    finally:
        client.loop_stop()


def test_meter_publishes_only_to_its_own_topic(broker: MosquittoBroker) -> None:
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    observer = _client(broker, "agg", "pg")
    observer.on_message = lambda c, u, m: seen.put((m.topic, m.payload))
    assert _connect(observer, broker) == 0
    observer.subscribe("mc/m1/#", qos=1)
    time.sleep(0.3)

    meter = _client(broker, "meter-a", "pa")
    assert _connect(meter, broker) == 0
    meter.publish(reading_topic("m1", "meter-b"), b"forged", qos=1).wait_for_publish(5)
    meter.publish(reading_topic("m1", "meter-a"), b"genuine", qos=1).wait_for_publish(5)

    topic, payload = seen.get(timeout=5)
    assert (topic, payload) == ("mc/m1/r/meter-a", b"genuine")
    time.sleep(0.3)
    assert seen.empty(), "the forged publish to another meter's topic must be dropped"
    for client in (meter, observer):
        client.disconnect()
        client.loop_stop()


def test_restart_keeps_the_port(broker: MosquittoBroker) -> None:
    port = broker.port
    broker.restart()
    assert broker.port == port
    client = _client(broker, "agg", "pg")
    try:
        assert _connect(client, broker) == 0
    finally:
        client.disconnect()
        client.loop_stop()
