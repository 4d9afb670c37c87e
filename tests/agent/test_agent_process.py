"""The agent as a real process: real Mosquitto (TLS, ACL), signing publishers, an emulated SDM630.

Covers the issue's list: energy per hour matches what the meters produced;
kill -9 and restart mid-stream gives exactly-once accounting; forged,
replayed and unknown-meter readings are rejected and counted; a Modbus meter
unplugged and plugged back recovers; /metrics is scraped and checked; SIGTERM
stops cleanly with sd_notify READY/WATCHDOG/STOPPING on the way.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from agent_site import (
    MARKET,
    NODE,
    AgentProcess,
    BoardMeter,
    Collector,
    Publisher,
    Site,
    agent_command,
    metric_value,
    wait_until,
)

from edge_agent.energy import HOUR_S, hour_start
from hil.broker import free_port
from hil.emulated_meter import MeterThread
from meterchain.reading import FLAG_GATEWAY_ATTESTED, Reading, verify
from meterchain.registry import Registry
from meterchain.sequence import SequenceGuard

STEP_S = 600  # readings every 10 minutes, aligned to the hour


def _base_hour(hours_back: int) -> int:
    return hour_start(int(time.time())) - hours_back * HOUR_S


def _stream(board: BoardMeter, start: int, count: int, step_wh: Callable[[int], int]
            ) -> tuple[list[bytes], dict[int, int]]:
    """Signed readings every STEP_S from `start`, and the Wh each hour should get.

    Every interval lies inside one hour (the readings sit on 10-minute marks),
    so the expected energy of an hour is the sum of the register increments
    of the intervals ending in it, computed here without the agent's code.
    """
    register = 10_000
    readings, expected = [], defaultdict(int)
    for i in range(count):
        t = start + STEP_S * i
        if i:
            delta = step_wh(i)
            register += delta
            expected[hour_start(t - 1)] += delta
        export = board.source == "pv"
        readings.append(board.reading(t, 0 if export else register, register if export else 0))
    return readings, dict(expected)


def _energy(site: Site) -> dict[str, dict[int, tuple[int, int]]]:
    proc = subprocess.run(
        agent_command("energy", "--config", str(site.config_path), "--json"),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows: dict[str, dict[int, tuple[int, int]]] = defaultdict(dict)
    for row in json.loads(proc.stdout):
        assert row["owner"] == NODE
        rows[row["meter_id"]][row["hour"]] = (row["import_wh"], row["export_wh"])
    return dict(rows)


def _gateway_readings(collector: Collector, registry: Registry) -> list[Reading]:
    readings = [verify(payload, registry) for payload in collector.payloads()]
    # The outbox may publish a reading twice (PUBACK lost); receivers dedupe by digest.
    unique = {r.digest: r for r in readings}
    return sorted(unique.values(), key=lambda r: r.seq)


def test_energy_rejections_metrics_and_clean_shutdown(make_site, agents) -> None:
    meter_port = free_port()

    def configure(site: Site) -> None:
        site.add_board("mg1-load-01", source="load")
        site.add_board("mg1-pv-01", source="pv")
        site.add_board("mg9-rogue", registered=False)
        site.add_modbus_meter("mg1-sdm-01", meter_port, poll_interval_s=0.2)
        # Only ingest in the agent process subscribes to the whole market and so hears
        # a meter missing from the registry; worker processes take registered meters'
        # topics (test_agent_ingest_pool covers them).
        site.ingest_workers = 0

    site: Site = make_site(configure)
    registry = Registry.load(site.root / "registry.toml")
    load, pv, rogue = (site.boards[m] for m in ("mg1-load-01", "mg1-pv-01", "mg9-rogue"))
    start = _base_hour(6)
    load_readings, load_expected = _stream(load, start, 19, lambda i: 100 + 7 * i)
    pv_readings, pv_expected = _stream(pv, start + 1800, 19, lambda i: 40 * (i % 5))

    with MeterThread(port=meter_port, profile="load", seed=3, speed=600.0) as rig:
        gateway = Collector(site.broker, "observer", "obs-pw", f"mc/{MARKET}/c/{NODE}/gw/#")
        agent = AgentProcess(site).start()
        agents.append(agent)
        publishers = {b.meter_id: Publisher(site.broker, b.meter_id, b.password)
                      for b in (load, pv, rogue)}
        for a, b in zip(load_readings, pv_readings, strict=True):
            publishers[load.meter_id].publish_reading(load.meter_id, a)
            publishers[pv.meter_id].publish_reading(pv.meter_id, b)

        forged = bytearray(load.reading(start + 20 * STEP_S, 99_999))
        forged[-5] ^= 0x40  # a bit of the signature
        publishers[load.meter_id].publish_reading(load.meter_id, bytes(forged))
        replay = load.reading(start + 20 * STEP_S, 88_888, seq=5)  # seq 5 already accepted
        publishers[load.meter_id].publish_reading(load.meter_id, replay)
        publishers[load.meter_id].publish_reading(load.meter_id, load_readings[3])  # re-sent
        publishers[rogue.meter_id].publish_reading(rogue.meter_id, rogue.reading(start, 5))

        def scraped(name: str, **labels: str) -> float:
            return metric_value(agent.metrics(), name, **labels)

        wait_until(lambda: scraped("meterchain_agent_readings_rejected_total",
                                   reason="unknown_meter") == 1, 20, "the rogue's reading")
        wait_until(lambda: scraped("meterchain_agent_modbus_reads_total",
                                   meter="mg1-sdm-01") >= 5, 20, "Modbus polls")
        metrics = agent.metrics()
        assert metric_value(metrics, "meterchain_agent_readings_accepted_total",
                            meter="mg1-load-01") == 19
        assert metric_value(metrics, "meterchain_agent_readings_accepted_total",
                            meter="mg1-pv-01") == 19
        for reason in ("bad_signature", "replayed", "unknown_meter"):
            assert metric_value(metrics, "meterchain_agent_readings_rejected_total",
                                reason=reason) == 1, reason
        assert metric_value(metrics, "meterchain_agent_readings_duplicate_total") == 1
        assert metric_value(metrics, "meterchain_agent_mqtt_connected") == 1
        assert metric_value(metrics, "meterchain_agent_modbus_connected",
                            bus="bus-mg1-sdm-01") == 1
        age = metric_value(metrics, "meterchain_agent_last_reading_age_seconds",
                           meter="mg1-load-01")
        assert abs(age - (time.time() - (start + 18 * STEP_S))) < 60
        assert 0 <= metric_value(metrics, "meterchain_agent_last_reading_age_seconds",
                                 meter="mg1-sdm-01") < 10
        wait_until(lambda: scraped("meterchain_agent_outbox_pending") == 0, 10,
                   "the gateway outbox to drain")
        assert "meterchain_agent_round_latency_seconds_count" in metrics
        assert "meterchain_agent_primary_changes_total" in metrics
        # One ERROR line per (meter, reason), never one per reading.
        assert agent.log().count("(bad_signature)") == 1

        assert agent.terminate() == 0
        rig_import_kwh = rig.values()["import_kwh"]
        for p in publishers.values():
            p.close()
    notes = agent.notes
    assert notes[0] == "READY=1" and notes[-1] == "STOPPING=1", notes
    assert "WATCHDOG=1" in notes

    energy = _energy(site)
    assert energy["mg1-load-01"] == {h: (wh, 0) for h, wh in load_expected.items()}
    assert energy["mg1-pv-01"] == {h: (0, wh) for h, wh in pv_expected.items() if wh}
    assert "mg9-rogue" not in energy

    # The Modbus meter: what the agent attested and published is exactly what it counted.
    wait_until(lambda: len(_gateway_readings(gateway, registry)) >= 5, 10, "gateway readings")
    gateway.close()
    published = _gateway_readings(gateway, registry)
    assert all(r.flags & FLAG_GATEWAY_ATTESTED and r.source == "load" for r in published)
    assert [r.seq for r in published] == list(range(1, len(published) + 1))
    imports = [r.import_wh for r in published]
    assert imports == sorted(imports) and imports[-1] > imports[0]
    assert imports[-1] <= round(rig_import_kwh * 1000) + 1
    with SequenceGuard(site.database) as guard:
        last = guard.state("mg1-sdm-01")
    assert last is not None
    counted = sum(wh for wh, _ in energy["mg1-sdm-01"].values())
    assert counted == last.import_wh - published[0].import_wh


def test_kill_9_mid_stream_counts_every_reading_exactly_once(make_site, agents) -> None:
    def configure(site: Site) -> None:
        for n in range(3):
            site.add_board(f"mg1-m{n}", source="load")

    site: Site = make_site(configure)
    boards = list(site.boards.values())
    start = _base_hour(30)
    per_meter = 150  # 25 hours of 10-minute readings per meter
    streams = [_stream(b, start, per_meter, lambda i, n=n: 50 + (i * 13 + n * 7) % 90)
               for n, b in enumerate(boards)]
    publishers = [Publisher(site.broker, b.meter_id, b.password) for b in boards]

    def publish_all() -> None:
        for i in range(per_meter):
            for board, publisher, (readings, _) in zip(boards, publishers, streams, strict=True):
                publisher.publish_reading(board.meter_id, readings[i])
            time.sleep(0.004)

    agent = AgentProcess(site).start()
    agents.append(agent)
    feeder = threading.Thread(target=publish_all)
    feeder.start()

    def accepted() -> float:
        text = agent.metrics()
        return sum(metric_value(text, "meterchain_agent_readings_accepted_total",
                                meter=b.meter_id) for b in boards)

    wait_until(lambda: accepted() >= 90, 30, "the first readings")
    agent.kill()
    assert accepted_before_kill_was_partial(site, boards, per_meter)
    again = AgentProcess(site).start()
    agents.append(again)
    feeder.join(60)

    def caught_up() -> bool:
        with SequenceGuard(site.database) as guard:
            states = [guard.state(b.meter_id) for b in boards]
        return all(s is not None and s.seq == per_meter for s in states)

    wait_until(caught_up, 60, "every reading after the restart")
    assert again.terminate() == 0
    for p in publishers:
        p.close()
    energy = _energy(site)
    for board, (_, expected) in zip(boards, streams, strict=True):
        assert energy[board.meter_id] == {h: (wh, 0) for h, wh in expected.items()}


def accepted_before_kill_was_partial(site: Site, boards: list[BoardMeter], total: int) -> bool:
    """The kill really landed mid-stream: some but not all readings were committed."""
    with SequenceGuard(site.database) as guard:
        seqs = [s.seq if (s := guard.state(b.meter_id)) else 0 for b in boards]
    return 0 < sum(seqs) < total * len(boards)


def test_modbus_meter_unplugged_and_back_recovers(make_site, agents) -> None:
    meter_port = free_port()
    site: Site = make_site(lambda s: s.add_modbus_meter("mg1-sdm-02", meter_port,
                                                        poll_interval_s=0.1))
    registry = Registry.load(site.root / "registry.toml")
    with MeterThread(port=meter_port, profile="load", seed=9, speed=600.0) as rig:
        gateway = Collector(site.broker, "observer", "obs-pw", f"mc/{MARKET}/c/{NODE}/gw/#")
        agent = AgentProcess(site).start()
        agents.append(agent)

        def scraped(name: str, **labels: str) -> float:
            return metric_value(agent.metrics(), name, **labels)

        wait_until(lambda: scraped("meterchain_agent_modbus_reads_total",
                                   meter="mg1-sdm-02") >= 3, 20, "first polls")
        rig.unplug()
        wait_until(lambda: scraped("meterchain_agent_modbus_connected",
                                   bus="bus-mg1-sdm-02") == 0, 20, "the link to go down")
        errors = sum(scraped("meterchain_agent_modbus_errors_total", bus="bus-mg1-sdm-02",
                             kind=kind) for kind in ("connect", "disconnected", "timeout"))
        assert errors >= 1
        reads_while_down = scraped("meterchain_agent_modbus_reads_total", meter="mg1-sdm-02")
        time.sleep(1.0)  # the meter keeps measuring; the agent backs off
        assert scraped("meterchain_agent_modbus_reads_total",
                       meter="mg1-sdm-02") == reads_while_down
        rig.plug()
        wait_until(lambda: scraped("meterchain_agent_modbus_reads_total",
                                   meter="mg1-sdm-02") >= reads_while_down + 3, 20,
                   "polls after the meter came back")
        assert scraped("meterchain_agent_modbus_connected", bus="bus-mg1-sdm-02") == 1
        log = agent.log()
        assert agent.terminate() == 0
    # Calm logs: one ERROR when the link broke, then quiet until it recovered.
    errors_logged = [line for line in log.splitlines()
                     if "level=error" in line and "mg1-sdm-02" in line]
    assert len(errors_logged) == 1, errors_logged
    assert "recovered" in log
    # The outage's energy is not lost: the registers kept counting.
    wait_until(lambda: len(_gateway_readings(gateway, registry)) >= 6, 10, "gateway readings")
    gateway.close()
    published = _gateway_readings(gateway, registry)
    with SequenceGuard(site.database) as guard:
        last = guard.state("mg1-sdm-02")
    assert last is not None
    counted = sum(wh for wh, _ in _energy(site)["mg1-sdm-02"].values())
    assert counted == last.import_wh - published[0].import_wh
    gaps = [b.import_wh - a.import_wh for a, b in zip(published, published[1:], strict=False)]
    assert max(gaps) > 3 * sorted(gaps)[len(gaps) // 2]  # the outage shows as one big interval
