"""Emulated boards against a real Mosquitto: TLS, per-meter credentials and ACL, broker outages,
the end-to-end acknowledgement and the online state with its last will.

The boards run the unchanged firmware under CPython (meterchain.board.emulated) with
a real TLS socket, verifying the broker against its test CA; an observer subscribes
like the edge agent does, verifies every reading against the registry and, standing in
for the agent's durable commit, publishes the retained acknowledgement watermark.
"""

from __future__ import annotations

import json
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import paho.mqtt.client as mqtt
import pytest
from conftest import board_config, public_key_of

from hil.broker import MosquittoBroker
from meterchain.board.emulated import run_board
from meterchain.mqtt_auth import meter_acl, observer_acl
from meterchain.reading import verify
from meterchain.registry import Registry

MARKET = "m1"
USERS = {"meter-a": "pw-a", "meter-b": "pw-b", "agg": "pw-agg"}


# The board side of the acknowledgement scheme: a meter reads only its own ack topic and
# writes only its own status topic; the agent's account writes the ack topics.
BOARD_ACL = f"pattern read mc/{MARKET}/ack/%u\npattern write mc/{MARKET}/status/%u\n"
AGENT_ACL = f"topic write mc/{MARKET}/ack/#\n"


@pytest.fixture
def broker(mosquitto_factory) -> MosquittoBroker:
    acl = (
        meter_acl(MARKET, "meter-a") + meter_acl(MARKET, "meter-b")
        + observer_acl(MARKET, "agg") + AGENT_ACL + BOARD_ACL
    )
    return mosquitto_factory(users=USERS, acl=acl)


class Observer:
    """A persistent-session QoS 1 subscriber to mc/<market>/r/# (reconnects by itself)."""

    def __init__(self, broker: MosquittoBroker, registry: Registry | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.registry = registry  # set: acknowledge verified readings, as the agent does
        self.hold = False  # True: commit nothing (no acknowledgements)
        self.watermarks: dict[str, int] = {}
        self.connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="observer-agg",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.username_pw_set("agg", USERS["agg"])
        self.client.tls_set(ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connected.wait(10), "observer could not connect"

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe([(f"mc/{MARKET}/r/#", 1), (f"mc/{MARKET}/status/#", 1)])
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: Any) -> None:
        payload = bytes(msg.payload)
        self.messages.put((msg.topic, payload))
        if self.registry is None or self.hold or "/r/" not in msg.topic:
            return
        r = verify(payload, self.registry)
        if r.seq > self.watermarks.get(r.meter_id, 0):
            self.watermarks[r.meter_id] = r.seq
            ack = cbor2.dumps({1: r.meter_id, 2: r.seq}, canonical=True)
            client.publish(f"mc/{MARKET}/ack/{r.meter_id}", ack, qos=1, retain=True)

    def readings(self, got: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return [(t, p) for t, p in got if "/r/" in t]

    def drain(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(broker: MosquittoBroker) -> Iterator[Observer]:
    obs = Observer(broker)
    time.sleep(0.2)  # the SUBSCRIBE is in place before boards publish
    yield obs
    obs.close()


def _board_folder(
    make_board_dir: Callable[..., Path],
    broker: MosquittoBroker,
    name: str,
    meter_id: str,
    user: str,
) -> Path:
    cfg = board_config(
        meter_id=meter_id,
        **{
            "meter.type": "sim",
            "broker.host": broker.host,
            "broker.port": broker.port,
            "broker.tls": True,
            "broker.username": user,
            "broker.backoff_min_ms": 100,
            "broker.backoff_max_ms": 400,
            "wdt_s": 60,
        },
    )
    folder = make_board_dir(name, cfg=cfg)
    (folder / "ca.pem").write_bytes(broker.ca_file.read_bytes())
    (folder / "secrets.json").write_text(json.dumps({"broker": {"password": USERS[user]}}))
    return folder


class RunningBoard:
    """An emulated board on a thread of this process, with its App exposed."""

    def __init__(self, folder: Path, interval_ms: int = 150) -> None:
        self.stop = threading.Event()
        self.apps: list[Any] = []
        settings = {
            "meter": "sim",
            "sim_power_w": 1200,
            "interval_ms": interval_ms,
            "ntp": True,
            "wifi": True,
            "console": False,
        }
        self.status: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.status.append(
                run_board(folder, stop_event=self.stop, settings=settings, on_app=self.apps.append)
            ),
            daemon=True,
        )
        self.thread.start()

    @property
    def app(self) -> Any:
        deadline = time.monotonic() + 10
        while not self.apps and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.apps[0]

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(10)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_boards_publish_over_tls_and_acl_stops_a_forged_topic(
    broker: MosquittoBroker, observer: Observer, make_board_dir
) -> None:
    genuine = _board_folder(make_board_dir, broker, "a", "meter-a", "meter-a")
    # Meter a's credentials, but configured to publish as meter b: the ACL must drop it.
    forger = _board_folder(make_board_dir, broker, "forger", "meter-b", "meter-a")
    registry = Registry()
    registry.add("meter-a", public_key_of(genuine), "mg1", "load")
    registry.add("meter-b", public_key_of(forger), "mg1", "load")
    boards = [RunningBoard(genuine), RunningBoard(forger)]
    try:
        _wait(lambda: all(b.app.uplink.acked >= 5 for b in boards), 30, "five PUBACKs each")
        time.sleep(0.3)
    finally:
        for b in boards:
            b.halt()
    got = observer.drain()
    topics = {topic for topic, _ in observer.readings(got)}
    assert topics == {"mc/m1/r/meter-a"}, "the forged topic never reaches a subscriber"
    states = {t for t, _ in got if "/status/" in t}
    assert states == {"mc/m1/status/meter-a"}, "meter-a may state only its own status"
    got = observer.readings(got)
    seqs = [verify(payload, registry).seq for _, payload in got]
    assert len(seqs) >= 5 and seqs == sorted(seqs)
    # Mosquitto acknowledges a denied QoS 1 publish (MQTT 3.1.1) and drops it.
    assert boards[1].app.uplink.acked >= 5
    assert boards[0].status == [3] and boards[1].status == [3]


def test_broker_outage_every_reading_arrives_exactly_once(
    broker: MosquittoBroker, observer: Observer, make_board_dir
) -> None:
    folder = _board_folder(make_board_dir, broker, "a", "meter-a", "meter-a")
    registry = Registry()
    registry.add("meter-a", public_key_of(folder), "mg1", "load")
    observer.registry = registry
    board = RunningBoard(folder)
    received: list[tuple[str, bytes]] = []
    try:
        app = board.app
        _wait(lambda: app.uplink.acked >= 4, 30, "the first PUBACKs")
        # Stop between two readings, when nothing is in flight.
        _wait(lambda: app.uplink.inflight() == 0 and len(app.spool) == 0, 10, "a quiet moment")
        broker.stop()
        before = app.readings
        _wait(lambda: app.readings >= before + 8, 30, "readings sampled during the outage")
        assert app.uplink.state == "down" and len(app.spool) >= 6, "spooled while down"
        broker.start()  # same port, same persistence
        _wait(lambda: app.readings >= before + 12 and len(app.spool) == 0, 30, "the spool drained")
        signed = app.last_seq
        _wait(
            lambda: len(observer.readings(received.extend(observer.drain()) or received)) >= signed,
            30,
            "every reading at the observer",
        )
    finally:
        board.halt()
    time.sleep(0.3)
    received.extend(observer.drain())
    seqs = [verify(payload, registry).seq for _, payload in observer.readings(received)]
    assert sorted(seqs) == list(range(1, max(seqs) + 1)), "no reading lost"
    assert len(seqs) == len(set(seqs)), "no reading delivered twice"
    assert app.uplink.connects == 2


def test_spool_frees_only_on_the_agents_ack_and_the_will_says_offline(
    broker: MosquittoBroker, observer: Observer, make_board_dir
) -> None:
    folder = _board_folder(make_board_dir, broker, "a", "meter-a", "meter-a")
    registry = Registry()
    registry.add("meter-a", public_key_of(folder), "mg1", "load")
    observer.registry = registry
    observer.hold = True  # the agent has not committed anything yet
    board = RunningBoard(folder)
    try:
        app = board.app
        _wait(lambda: app.uplink.acked >= 6, 30, "six PUBACKs")
        assert len(app.spool) >= 6 and app.uplink.freed == 0, "PUBACK frees no reading"
        observer.hold = False  # the agent commits: its watermark frees the spool
        _wait(lambda: app.uplink.freed >= 6 and len(app.spool) <= 2, 30, "the agent's ack")
        assert app.uplink.watermark == observer.watermarks["meter-a"] or len(app.spool) <= 2
    finally:
        board.halt()  # a power cut: the TCP connection dies without DISCONNECT
    states: list[bytes] = []
    _wait(
        lambda: bool(states.extend(p for t, p in observer.drain() if "/status/" in t) or states)
        and cbor2.loads(states[-1]) == {1: "meter-a", 2: "offline"},
        30,
        "the will",
    )
    assert cbor2.loads(states[0]) == {1: "meter-a", 2: "online"}


def test_rotated_broker_ca_is_a_link_failure_and_sampling_goes_on(
    broker: MosquittoBroker, mosquitto_factory, make_board_dir
) -> None:
    folder = _board_folder(make_board_dir, broker, "a", "meter-a", "meter-a")
    # The broker's certificate now chains to a CA the board does not trust (a rotation).
    other = mosquitto_factory(users=USERS)
    (folder / "ca.pem").write_bytes(other.ca_file.read_bytes())
    board = RunningBoard(folder)
    try:
        app = board.app
        _wait(lambda: app.readings >= 6, 30, "readings while TLS is refused")
        assert app.uplink.connects == 0 and len(app.spool) >= 6
        assert "ValueError" in app.uplink.last_error
        assert "not correctly signed by the trusted CA" in app.uplink.last_error
    finally:
        board.halt()
    assert board.status == [3], "stopped by us, never crashed or reset"
