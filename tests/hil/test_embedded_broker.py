"""The demo's in-process broker carries QoS 1 publishes between real paho clients."""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt

from hil.embedded_broker import EmbeddedBroker


def test_embedded_broker_delivers_qos1() -> None:
    with EmbeddedBroker() as broker:
        got: queue.Queue[tuple[str, bytes]] = queue.Queue()
        subscribed: queue.Queue[bool] = queue.Queue()
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "sub", protocol=mqtt.MQTTv311)
        sub.on_message = lambda c, u, m: got.put((m.topic, m.payload))
        sub.on_subscribe = lambda c, u, mid, rc, p: subscribed.put(True)
        sub.connect(broker.host, broker.port)
        sub.loop_start()
        sub.subscribe("mc/+/r/#", qos=1)
        assert subscribed.get(timeout=5)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "pub", protocol=mqtt.MQTTv311)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        for i in range(20):
            pub.publish(f"mc/demo/r/m{i % 2}", str(i).encode(), qos=1).wait_for_publish(5)
        received = [got.get(timeout=5) for _ in range(20)]
        assert [int(p) for _, p in received] == list(range(20))
        assert {t for t, _ in received} == {"mc/demo/r/m0", "mc/demo/r/m1"}
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
