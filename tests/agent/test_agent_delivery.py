"""End to end, nothing measured is lost: broker kill -9 and client-id takeover against the agent.

Real Mosquitto (TLS, passwords, ACL), the agent as a real process, and
boards that free a reading only on the agent's acknowledgement
(spool_board.SpoolBoard). The broker saves its state once an hour here, so
a kill -9 loses every queued reading and session it holds: the worst case.
"""

from __future__ import annotations

import sqlite3
import time

import paho.mqtt.client as mqtt
import pytest
from agent_site import MARKET, NODE, AgentProcess, Site, metric_value, wait_until
from spool_board import SpoolBoard

from edge_agent.energy import HOUR_S, hour_start
from hil.broker import MosquittoBroker

BOARDS = ("mg1-a", "mg1-b")
T0 = hour_start(int(time.time())) - 2 * HOUR_S


def _boards(site: Site) -> list[SpoolBoard]:
    boards = []
    for meter_id in BOARDS:
        meter = site.boards[meter_id]

        def sign(seq: int, meter=meter) -> bytes:  # type: ignore[no-untyped-def]
            return meter.reading(T0 + 10 * seq, 1000 + 7 * seq, seq=seq)

        boards.append(SpoolBoard(site.broker, MARKET, meter_id, meter.password, sign))
    return boards


def _committed(site: Site, meter_id: str) -> list[int]:
    """Sequence numbers of `meter_id` the agent has durably accepted (its guard's record)."""
    with sqlite3.connect(f"file:{site.database}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT seq FROM accepted WHERE meter_id = ?", (meter_id,)).fetchall()
    return sorted(int(seq) for (seq,) in rows)


def _all_delivered(site: Site, boards: list[SpoolBoard], count: int, timeout: float) -> None:
    wait_until(lambda: all(b.drained() for b in boards), timeout, "boards to be acknowledged")
    for board in boards:
        assert _committed(site, board.meter_id) == list(range(1, count + 1)), board.meter_id
        assert board.watermark == count


def _configure(site: Site) -> None:
    for meter_id in BOARDS:
        site.add_board(meter_id)
    site.add_board("mg1-intruder")  # a meter account an attacker has the password of


@pytest.fixture
def closing() -> list[SpoolBoard]:
    boards: list[SpoolBoard] = []
    yield boards
    for board in boards:
        board.close()


def test_broker_kill_9_loses_no_reading(make_site, agents, closing) -> None:
    site = make_site(_configure, bind_client_ids=True, autosave_interval_s=3600)
    agent = AgentProcess(site).start()
    agents.append(agent)
    boards = _boards(site)
    closing.extend(boards)
    for board in boards:
        board.produce(20)
    _all_delivered(site, boards, 20, 20)

    # Mid-stream: the broker dies with PUBACKed readings on their way to the agent.
    for board in boards:
        board.produce(15)
    site.broker.kill()
    site.broker.start()
    _all_delivered(site, boards, 35, 30)

    # Agent away: the readings wait only in the broker's memory, PUBACKed, and die with it.
    assert agent.terminate() == 0
    for board in boards:
        board.produce(25)
    wait_until(lambda: all(b.client.want_write() is False for b in boards), 10, "PUBACKs")
    time.sleep(0.5)
    site.broker.kill()
    site.broker.start()
    agent = AgentProcess(site).start()
    agents.append(agent)
    _all_delivered(site, boards, 60, 40)
    # The broker really lost them: only the boards' resends brought them in.
    assert all(b.rewinds >= 3 for b in boards)
    assert metric_value(agent.metrics(), "meterchain_agent_readings_accepted_total",
                        meter="mg1-a") == 25


def _take_over(broker: MosquittoBroker, client_id: str, site: Site) -> mqtt.Client:
    """Connect with the agent's client id and a clean session, using a meter's credentials."""
    intruder = site.boards["mg1-intruder"]
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    client.username_pw_set(intruder.meter_id, intruder.password)
    client.tls_set(ca_certs=str(broker.ca_file))
    client.connect(broker.host, broker.port)
    client.loop_start()
    wait_until(client.is_connected, 10, "the intruder to connect")
    return client


@pytest.mark.parametrize("bound", [True, False], ids=["deployed-binding", "no-binding"])
def test_client_id_takeover_loses_no_reading(make_site, agents, closing, bound: bool) -> None:
    site = make_site(_configure, bind_client_ids=bound)
    agent = AgentProcess(site).start()
    agents.append(agent)
    boards = _boards(site)
    closing.extend(boards)
    for board in boards:
        board.produce(10)
    _all_delivered(site, boards, 10, 20)

    intruder = _take_over(site.broker, f"agent-{NODE}", site)
    try:
        time.sleep(0.3)
        for board in boards:
            board.produce(10)  # published while the agent's session is gone (unbound)
        time.sleep(0.5)
    finally:
        intruder.disconnect()
        intruder.loop_stop()
    wait_until(lambda: metric_value(agent.metrics(), "meterchain_agent_mqtt_connected") == 1,
               20, "the agent to be connected")
    for board in boards:
        board.produce(10)  # above the gap the lost ones left
    _all_delivered(site, boards, 30, 40)
    kicked = "disconnected from" in agent.log()
    if bound:
        assert not kicked, "with client ids bound to usernames nobody can take the agent's id"
    else:
        assert kicked, "the takeover did not happen: this test exercises nothing"
        deferred = metric_value(agent.metrics(), "meterchain_agent_readings_deferred_total",
                                reason="sequence_gap")
        assert deferred > 0, "no reading was lost at the broker: this test exercises nothing"
