"""A running agent's status API as an operator uses it: `meterchain status`, /healthz, boards.

A real agent process on a real Mosquitto (TLS, ACL): a board publishes
readings and its retained online state (then its offline will), the broker
goes away and comes back; `/status` and `/healthz` must say so each time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

from agent_site import MARKET, NODE, AgentProcess, Publisher, Site, wait_until

from edge_agent.energy import HOUR_S, hour_start
from meterchain import codec
from meterchain.mqtt_auth import status_topic


def _status(site: Site) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "status", "--config", str(site.config_path),
         "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {"stderr": proc.stderr}


def _healthz(site: Site) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{site.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _meter(doc: dict, meter_id: str) -> dict:
    return next(m for m in doc["meters"] if m["id"] == meter_id)


def test_status_shows_meters_boards_and_the_broker_as_they_change(make_site, agents) -> None:
    site: Site = make_site(lambda s: (s.add_board("mg1-pv-01", source="pv"),
                                      s.add_board("mg1-load-01")))  # fmt: skip
    agent = AgentProcess(site).start()
    agents.append(agent)
    pv = site.boards["mg1-pv-01"]
    publisher = Publisher(site.broker, pv.meter_id, pv.password)
    t = hour_start(int(time.time())) - HOUR_S
    publisher.publish_reading(pv.meter_id, pv.reading(t, 0, 1_000))
    publisher.client.publish(status_topic(MARKET, pv.meter_id),
                             codec.encode({1: pv.meter_id, 2: "online"}), qos=1,
                             retain=True).wait_for_publish(10)  # fmt: skip

    def pv_row() -> dict:
        return _meter(_status(site)[1], pv.meter_id)

    wait_until(lambda: pv_row()["board"] == "online" and pv_row()["last_reading"] is not None,
               20, "the board's reading and online state in /status")  # fmt: skip
    code, doc = _status(site)
    assert code == 0 and doc["health"] == {"live": True, "ready": True, "reasons": []}
    assert (doc["service"], doc["node_id"], doc["market"], doc["role"]) == (
        "agent", NODE, MARKET, "standalone")  # fmt: skip
    row = _meter(doc, pv.meter_id)
    assert row["last_reading"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    assert HOUR_S <= row["last_reading_age_s"] < 2 * HOUR_S + 60
    # The silent registered meter is listed first (stalest), with no reading at all.
    assert doc["meters"][0] == {"id": "mg1-load-01", "last_reading": None,
                                "last_reading_age_s": None, "board": None}  # fmt: skip
    assert doc["meters_total"] == 2 and doc["broker"]["connected"] is True
    assert doc["market_clock"]["real_time"] is True and doc["market_clock"]["now"].endswith("Z")

    # The board's last will says it went offline.
    publisher.client.publish(status_topic(MARKET, pv.meter_id),
                             codec.encode({1: pv.meter_id, 2: "offline"}), qos=1,
                             retain=True).wait_for_publish(10)  # fmt: skip
    wait_until(lambda: pv_row()["board"] == "offline", 20, "the offline state")
    assert 'meterchain_agent_board_online{meter="mg1-pv-01"} 0.0' in agent.metrics()
    # A state naming another meter than its topic is ignored.
    publisher.client.publish(status_topic(MARKET, pv.meter_id),
                             codec.encode({1: "mg1-load-01", 2: "online"}), qos=1,
                             retain=True).wait_for_publish(10)  # fmt: skip
    time.sleep(0.5)
    assert pv_row()["board"] == "offline"
    assert _meter(_status(site)[1], "mg1-load-01")["board"] is None
    publisher.close()

    # The broker goes away: not ready (with the reason), still live; back: ready again.
    site.broker.stop()
    wait_until(lambda: _healthz(site)[0] == 503, 30, "/healthz to report the lost broker")
    code, health = _healthz(site)
    assert health["live"] is True and health["ready"] is False
    assert any("not connected to the broker" in r for r in health["reasons"]), health
    code, doc = _status(site)
    assert code == 1 and doc["broker"]["connected"] is False
    site.broker.start()
    wait_until(lambda: _healthz(site)[0] == 200, 60, "/healthz to recover with the broker")


def test_a_node_and_a_submitter_are_ready_only_with_their_consensus_link() -> None:
    """AgentStatus over stand-in parts: each missing link is a reason, peers are listed."""
    import threading
    from collections import Counter
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from edge_agent.status import AgentStatus
    from meterchain.site.clock import MarketClock

    def event(up: bool) -> threading.Event:
        e = threading.Event()
        if up:
            e.set()
        return e

    runner = SimpleNamespace(link=SimpleNamespace(connected=event(False)),
                             counts=Counter(deliveries=7), peers_seen={"mg2": 1_767_225_600.0})
    agent = SimpleNamespace(
        worker=SimpleNamespace(stopped=event(False)), pool=None,
        ingest_failed=lambda: agent.worker.stopped.is_set(),
        link=SimpleNamespace(connected=True),
        consensus=SimpleNamespace(runner=runner), submitter=None, reviewer=None, rounds=None,
        config=SimpleNamespace(broker=SimpleNamespace(url="mqtts://b:8883"),
                               agent=SimpleNamespace(node_id="mg1", market="m1"),
                               consensus=SimpleNamespace(role="node"), owner="mg1",
                               clock=MarketClock(), modbus_meters=[]),
        clock=lambda: 1_767_225_700.0,
        view=SimpleNamespace(outbox_pending=lambda: 0, schedule=lambda hour: None),
        metrics=SimpleNamespace(last_reading_times=lambda: {}, registry=CollectorRegistry(),
                                max_meter_series=1000),
        registry=SimpleNamespace(owned_by=lambda owner: []),
        buses={},
    )  # fmt: skip
    status = AgentStatus(agent)  # type: ignore[arg-type]
    health = status.health()
    assert (health.live, health.ready) == (True, False)
    assert health.reasons == ("the consensus link is not connected",)
    doc = status.document()
    assert doc["consensus"] == {"connected": False, "messages_received": 7,
                                "peers_seen": {"mg2": "2026-01-01T00:00:00Z"}}  # fmt: skip
    runner.link.connected.set()
    assert status.health().ready
    # A submitter: its own link to the nodes decides.
    agent.consensus = None
    agent.submitter = SimpleNamespace(link=SimpleNamespace(connected=event(False)))
    assert status.health().reasons == ("the link to the consensus nodes is not connected",)
    assert status.document()["consensus"] == {"connected": False}
    # A dead ingest writer is not live.
    agent.worker.stopped.set()
    assert not status.health().live
