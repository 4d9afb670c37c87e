"""End to end, nothing measured is lost: broker kill -9 and client-id takeover against the agent.

Real Mosquitto (TLS, passwords, ACL), the agent as a real process, and the
real firmware on emulated boards (tests/agent/emulated_boards.py), which free
a reading only on the agent's acknowledgement. The broker saves its state
once an hour here, so a kill -9 loses every queued reading and every session
it holds: the worst case. "Nothing lost" is checked on both ends: the agent
has committed exactly 1..watermark of each board, and the board still holds
every reading above it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from agent_site import INGEST_WORKERS, NODE, AgentProcess, Site, metric_value, wait_until
from emulated_boards import (
    ACK_TIMEOUT_S,
    RunningBoard,
    acknowledged_past,
    committed_seqs,
    connect_board,
    make_board,
)

from edge_agent.ingest_pool import owner_of
from hil.broker import MosquittoBroker

BOARDS = ("mg1-a", "mg1-b")






def _nothing_lost(site: Site, boards: list[RunningBoard]) -> None:
    for board in boards:
        board.halt()
    for board in boards:
        app = board.app
        watermark = app.uplink.watermark
        committed = committed_seqs(site, app.cfg["meter_id"])
        # Gap-free; it may run ahead of the board's watermark (an ack still on its way).
        assert committed == list(range(1, len(committed) + 1))
        assert len(committed) >= watermark > 0
        # Everything above the watermark is still on the board, nothing was freed early.
        assert len(app.spool) == app.last_seq - watermark


@pytest.fixture
def site_with_boards(make_site, request) -> Iterator[tuple[Site, list[RunningBoard]]]:
    folders = {}

    def configure(site: Site) -> None:
        for meter_id in BOARDS:
            folders[meter_id] = make_board(site, meter_id)
        site.add_board("mg1-intruder")  # a meter account whose password an attacker has

    site = make_site(configure, **request.param)
    for folder in folders.values():
        connect_board(folder, site)
    boards: list[RunningBoard] = []
    yield site, boards
    for board in boards:
        board.halt()


def _start_boards(site: Site, boards: list[RunningBoard]) -> None:
    boards.extend(RunningBoard(site.root / "boards" / meter_id) for meter_id in BOARDS)


@pytest.mark.parametrize(
    "site_with_boards", [{"bind_client_ids": True, "autosave_interval_s": 3600}], indirect=True
)
def test_broker_kill_9_loses_no_reading(site_with_boards, agents) -> None:
    site, boards = site_with_boards
    agent = AgentProcess(site).start()
    agents.append(agent)
    _start_boards(site, boards)
    acknowledged_past(boards, 10, 30)

    # Mid-stream: the broker dies with PUBACKed readings on their way to the agent.
    site.broker.kill()
    site.broker.start()
    acknowledged_past(boards, 10, 30)

    # Agent away: readings wait only in the broker's memory, PUBACKed, and die with it.
    assert agent.terminate() == 0
    queued_from = [b.app.uplink.watermark for b in boards]
    time.sleep(2)
    assert all(b.app.uplink.acked > 0 for b in boards)
    site.broker.kill()
    site.broker.start()
    agent = AgentProcess(site).start()
    agents.append(agent)
    acknowledged_past(boards, 5, 30 + 2 * ACK_TIMEOUT_S)
    # The restarted broker had nothing for the agent: the boards' resends brought them.
    assert all(b.app.last_seq > q + 10 for b, q in zip(boards, queued_from, strict=True))
    # ... after their ack timeout (`rewinds` counts those, not the rewinds at connect).
    assert all(b.app.uplink.rewinds >= 1 for b in boards), [b.app.uplink.rewinds for b in boards]
    _nothing_lost(site, boards)


def _take_over(broker: MosquittoBroker, client_id: str, site: Site) -> mqtt.Client:
    """Connect with the agent's client id and a clean session, using a meter's credentials."""
    intruder = site.boards["mg1-intruder"]
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    client.username_pw_set(intruder.meter_id, intruder.password)
    client.tls_set(ca_certs=str(broker.ca_file))
    client.connect(broker.host, broker.port)
    client.loop_start()
    wait_until(client.is_connected, 10, "the intruder to connect")
    return client


@pytest.mark.parametrize(
    "site_with_boards",
    [{"bind_client_ids": True}, {"bind_client_ids": False}],
    ids=["deployed-binding", "no-binding"],
    indirect=True,
)
def test_client_id_takeover_loses_no_reading(site_with_boards, agents) -> None:
    site, boards = site_with_boards
    bound = site.broker.bind_client_ids
    agent = AgentProcess(site).start()
    agents.append(agent)
    _start_boards(site, boards)
    acknowledged_past(boards, 5, 30)

    # The session that receives the first board's readings: its ingest worker's.
    worker = owner_of(BOARDS[0], INGEST_WORKERS)
    intruder = _take_over(site.broker, f"agent-{NODE}.ingest{worker}", site)
    try:
        time.sleep(1.5)  # the boards publish on; unbound, the agent's session is gone
    finally:
        intruder.disconnect()
        intruder.loop_stop()
    wait_until(
        lambda: metric_value(agent.metrics(), "meterchain_agent_mqtt_connected") == 1,
        20,
        "the agent to be connected",
    )
    acknowledged_past(boards, 5, 30 + 2 * ACK_TIMEOUT_S)
    kicked = "disconnected from" in agent.log_path.read_text()
    if bound:
        assert not kicked, "with client ids bound to usernames nobody can take the agent's id"
    else:
        assert kicked, "the takeover did not happen: this test exercises nothing"
        deferred = metric_value(
            agent.metrics(), "meterchain_agent_readings_deferred_total", reason="sequence_gap"
        )
        assert deferred > 0, "no reading was lost at the broker: this test exercises nothing"
    _nothing_lost(site, boards)


def test_the_deployed_broker_config_binds_client_ids(tmp_path) -> None:
    """deploy/mosquitto/mosquitto.conf, run as written (paths moved here): no takeover."""
    import re
    import subprocess
    from pathlib import Path

    from hil.broker import find_mosquitto, free_port, make_test_pki
    from meterchain.mqtt_auth import password_line

    pki = make_test_pki(tmp_path / "pki")
    (tmp_path / "passwd").write_text(password_line("mg1", "a") + "\n" + password_line("m2", "b"))
    (tmp_path / "acl").write_text("pattern readwrite #\n")
    (tmp_path / "persistence").mkdir()
    port = free_port()
    text = (Path(__file__).parents[2] / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    for name, path in (("ca.crt", pki["ca"]), ("server.crt", pki["cert"]),
                       ("server.key", pki["key"])):
        text = text.replace(f"/etc/mosquitto/meterchain/{name}", str(path))
    text = text.replace("/etc/mosquitto/meterchain/", f"{tmp_path}/")
    text = text.replace("/var/lib/mosquitto/", f"{tmp_path}/persistence/")
    text = re.sub(r"^listener 8883$", f"listener {port} 127.0.0.1", text, flags=re.M)
    assert "use_username_as_clientid true" in text
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port), 10, "the broker to listen")
        clients = []
        for user, password in (("mg1", "a"), ("m2", "b")):
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id="agent-mg1", protocol=mqtt.MQTTv311
            )
            client.username_pw_set(user, password)
            client.tls_set(ca_certs=str(pki["ca"]))
            client.connect("127.0.0.1", port)
            client.loop_start()
            wait_until(client.is_connected, 10, f"{user} to connect")
            clients.append(client)
        time.sleep(0.5)
        assert all(c.is_connected() for c in clients), "one client id kicked the other off"
        for client in clients:
            client.disconnect()
            client.loop_stop()
    finally:
        broker.kill()
        broker.wait()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_acknowledgements_are_coalesced_and_never_go_backwards(mosquitto_factory) -> None:
    """Many commits in a burst: each meter's acks arrive in order, the last is the newest."""
    import threading

    from edge_agent.broker_link import BrokerLink
    from meterchain import codec
    from meterchain.mqtt_auth import node_acl, observer_acl

    broker = mosquitto_factory(
        users={NODE: "pw", "observer": "pw"},
        acl=node_acl("m1", NODE) + observer_acl("m1", "observer"),
    )
    got: dict[str, list[int]] = {}
    lock = threading.Lock()

    def on_message(client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        ack = codec.decode(bytes(message.payload))
        with lock:
            got.setdefault(ack[1], []).append(ack[2])

    observer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="obs")
    observer.username_pw_set("observer", "pw")
    observer.tls_set(ca_certs=str(broker.ca_file))
    observer.on_message = on_message
    observer.connect(broker.host, broker.port)
    observer.subscribe("mc/m1/ack/#", qos=1)
    observer.loop_start()
    link = BrokerLink(
        url=broker.url, client_id="agent-mg1", market="m1", node_id=NODE,
        worker=None,  # type: ignore[arg-type]  # acknowledgements only
        username=NODE, password="pw", ca_file=str(broker.ca_file),
    )
    link.start()
    try:
        wait_until(lambda: link.connected, 10, "the link to connect")
        meters = [f"mg1-m{i}" for i in range(3)]
        for watermark in range(1, 501):
            link.publish_acks({m: watermark for m in meters})
        wait_until(lambda: all(got.get(m, [0])[-1] == 500 for m in meters), 20, "the last acks")
    finally:
        link.stop()
        observer.disconnect()
        observer.loop_stop()
    for meter in meters:
        seen = got[meter]
        assert seen == sorted(set(seen)), f"{meter}: acks out of order or repeated"
        assert len(seen) < 500, "nothing was coalesced"
