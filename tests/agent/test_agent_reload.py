"""SIGHUP reloads the meter registry of a running agent (`systemctl reload`).

Real Mosquitto (TLS, ACLs), the agent as a real process with two ingest
worker processes. A meter provisioned while the agent runs (its entry
appended to registry.toml, as `meterchain registry add` does) is ingested
after the reload; a meter streaming readings across the reload loses none
and counts none twice (its worker is restarted: what it had not committed
waits in its persistent broker session); a registry file broken on disk is
refused by name and the running registry kept.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

from agent_site import AgentProcess, Publisher, Site, metric_value, wait_until

from edge_agent.energy import HOUR_S, hour_start
from meterchain.registry import append_entry, make_meter

STREAM = 150


def _status(site: Site) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_port}/status", timeout=5) as r:
        return dict(json.load(r))


def test_sighup_takes_up_new_meters_and_loses_nothing_in_flight(make_site, agents) -> None:
    def configure(site: Site) -> None:
        site.add_board("mg1-p0")
        site.add_board("mg1-late", source="pv", registered=False)  # provisioned later

    site: Site = make_site(configure)
    streamer, late = site.boards["mg1-p0"], site.boards["mg1-late"]
    agent = AgentProcess(site).start()
    agents.append(agent)
    assert agent.process is not None
    start = hour_start(int(time.time())) - 6 * HOUR_S

    def scraped(name: str, **labels: str) -> float:
        return metric_value(agent.metrics(), name, **labels)

    publishers = {b.meter_id: Publisher(site.broker, b.meter_id, b.password)
                  for b in (streamer, late)}  # fmt: skip
    try:
        wait_until(lambda: _status(site)["ingest_workers"]["up"], 20, "the workers subscribed")
        pids = _status(site)["ingest_workers"]["pids"]
        assert scraped("meterchain_agent_registered_meters") == 1
        # Not registered yet: no worker subscribes its topic, so its board keeps it.
        early = late.reading(start, 10)
        publishers[late.meter_id].publish_reading(late.meter_id, early)

        def stream() -> None:
            for i in range(STREAM):
                publishers[streamer.meter_id].publish_reading(
                    streamer.meter_id, streamer.reading(start + 60 * i, 100 + i)
                )
                time.sleep(0.01)

        streaming = threading.Thread(target=stream)
        streaming.start()
        time.sleep(0.3)
        append_entry(
            site.root / "registry.toml",
            make_meter(late.meter_id, late.key.public_key(), late.owner, late.source),
        )
        os.kill(agent.process.pid, signal.SIGHUP)
        assert streaming.is_alive(), "the reload must come while readings stream"
        streaming.join(30)
        wait_until(
            lambda: scraped("meterchain_agent_registry_reloads_total", result="loaded") == 1,
            20,
            "the reload",
        )
        assert scraped("meterchain_agent_registered_meters") == 2

        def restarted() -> bool:
            workers = _status(site)["ingest_workers"]
            return workers["up"] and all(
                new not in (None, old) for new, old in zip(workers["pids"], pids, strict=True)
            )

        wait_until(restarted, 30, "every worker restarted for the reload")
        # The board resends what was never acknowledged: now it is taken.
        publishers[late.meter_id].publish_reading(late.meter_id, early)
        wait_until(
            lambda: scraped("meterchain_agent_readings_accepted_total", meter=late.meter_id) == 1,
            20,
            "the newly registered meter's reading",
        )
        wait_until(
            lambda: scraped("meterchain_agent_readings_accepted_total", meter=streamer.meter_id)
            == STREAM,
            30,
            "every streamed reading",
        )
        # Restarts for a reload are not failures.
        assert scraped("meterchain_agent_ingest_worker_restarts_total") == 0

        # A registry broken on disk: refused by name, the running one kept.
        (site.root / "registry.toml").write_text("[[meter]]\nid = \"mg1-x\"\npublic_key = 7\n")
        pids = _status(site)["ingest_workers"]["pids"]
        os.kill(agent.process.pid, signal.SIGHUP)
        wait_until(
            lambda: scraped("meterchain_agent_registry_reloads_total", result="refused") == 1,
            20,
            "the refused reload",
        )
        assert "registry not reloaded, still using the one loaded before" in agent.log()
        assert "registry.toml" in agent.log()
        publishers[late.meter_id].publish_reading(late.meter_id, late.reading(start + 60, 20))
        wait_until(
            lambda: scraped("meterchain_agent_readings_accepted_total", meter=late.meter_id) == 2,
            20,
            "a reading after the refused reload",
        )
        assert _status(site)["ingest_workers"]["pids"] == pids  # nobody restarted
        assert scraped("meterchain_agent_registered_meters") == 2
        assert agent.terminate() == 0
    finally:
        for publisher in publishers.values():
            publisher.close()
