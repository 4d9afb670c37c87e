"""Ingest worker processes: a worker killed mid-stream is restarted and loses nothing.

Real Mosquitto (TLS, one broker user per connection, client ids bound to
users as deployed), the agent as a real process with two ingest workers,
and the real firmware on emulated boards that free a reading only on the
agent's acknowledgement. One worker is killed with SIGKILL while its meters
stream; the agent must notice and restart it, keep every committed reading
(durable before acknowledged), and the boards must get everything else in:
the agent ends with exactly 1..n of each board, gap-free, and each board
still holds every reading above its watermark.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import urllib.request

from agent_site import INGEST_WORKERS, AgentProcess, Site, metric_value, wait_until
from emulated_boards import (
    ACK_TIMEOUT_S,
    RunningBoard,
    acknowledged_past,
    committed_seqs,
    connect_board,
    make_board,
)
from prometheus_client import generate_latest

from edge_agent.ingest_pool import owner_of
from edge_agent.metrics import AgentMetrics, IngestTally
from meterchain.reading import Reading

# Two boards per worker (owner_of(.., 2) gives 1, 1, 0, 0).
BOARDS = ("mg1-p0", "mg1-p1", "mg1-p4", "mg1-p5")


def _status(site: Site) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_port}/status", timeout=5) as r:
        return dict(json.load(r))






def test_a_killed_ingest_worker_is_restarted_and_loses_nothing(make_site, agents) -> None:
    assert INGEST_WORKERS == 2
    assert sorted(owner_of(m, 2) for m in BOARDS) == [0, 0, 1, 1]
    folders = {}

    def configure(site: Site) -> None:
        for meter_id in BOARDS:
            folders[meter_id] = make_board(site, meter_id)

    site = make_site(configure, bind_client_ids=True)
    for folder in folders.values():
        connect_board(folder, site)
    agent = AgentProcess(site).start()
    agents.append(agent)
    boards = [RunningBoard(folders[m], interval_ms=20) for m in BOARDS]
    try:
        wait_until(lambda: _status(site)["ingest_workers"]["up"], 20, "both workers subscribed")
        acknowledged_past(boards, 20, 30)
        pids = _status(site)["ingest_workers"]["pids"]
        victim = owner_of(BOARDS[0], 2)
        os.kill(pids[victim], signal.SIGKILL)

        # Noticed and restarted: a new process for the same partition, subscribed again.
        def restarted() -> bool:
            workers = _status(site)["ingest_workers"]
            return workers["pids"][victim] not in (None, pids[victim]) and workers["up"]

        wait_until(restarted, 30, "the killed worker to be restarted")
        assert _status(site)["ingest_workers"]["pids"][1 - victim] == pids[1 - victim]
        assert metric_value(agent.metrics(), "meterchain_agent_ingest_worker_restarts_total") == 1
        # Every board moves on, those of the killed worker included.
        acknowledged_past(boards, 20, 30 + 2 * ACK_TIMEOUT_S)
    finally:
        for board in boards:
            board.halt()
    for meter_id, board in zip(BOARDS, boards, strict=True):
        app = board.app
        watermark = app.uplink.watermark
        committed = committed_seqs(site, meter_id)
        assert committed == list(range(1, len(committed) + 1)), meter_id
        assert len(committed) >= watermark > 20, meter_id
        assert len(app.spool) == app.last_seq - watermark, meter_id
    assert agent.terminate() == 0


def test_a_workers_tally_counts_exactly_what_counting_in_process_counts() -> None:
    """Shipped through a pipe (pickled) in pieces, the same scrape as in-process counting."""
    t0 = 1_767_225_600
    readings = [
        Reading(f"mg1-m{i % 300:03d}", i // 300 + 1, t0 + i, 0, 0, 0, 0, "load", b"", b"")
        for i in range(3000)
    ]
    direct = AgentMetrics(clock=lambda: t0 + 7200, max_meter_series=100)
    shipped = AgentMetrics(clock=lambda: t0 + 7200, max_meter_series=100)
    tally = IngestTally()
    for i, reading in enumerate(readings):
        direct.accepted(reading, "mg1")
        tally.accepted(reading, "mg1")
        if i % 7 == 0:
            direct.rejected("bad_signature")
            tally.rejected("bad_signature")
        if i % 11 == 0:
            direct.duplicate(reading)
            tally.duplicate(reading)
            direct.deferred("sequence_gap")
            tally.deferred("sequence_gap")
        if i % 64 == 63:
            direct.batch(64, 0.01)
            tally.batch(64, 0.01)
        if i % 1000 == 999:  # a report to the agent
            shipped.add_tally(pickle.loads(pickle.dumps(tally.take())))
    assert tally.take().empty()

    def scrape(metrics: AgentMetrics) -> list[str]:  # without the series' creation times
        text = generate_latest(metrics.registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert scrape(shipped) == scrape(direct)
    assert shipped.last_reading_times() == direct.last_reading_times()


def test_meters_are_partitioned_by_a_stable_hash() -> None:
    # crc32 of the id: the same worker in every process and run, every worker used.
    assert [owner_of(f"mg1-m{i}", 3) for i in range(6)] == [
        owner_of(f"mg1-m{i}", 3) for i in range(6)
    ]
    assert owner_of("mg1-p0", 2) == 1 and owner_of("mg1-p4", 2) == 0
    counts = [0, 0, 0, 0]
    for i in range(10_000):
        counts[owner_of(f"mg1-m{i:05d}", 4)] += 1
    assert min(counts) > 2300
