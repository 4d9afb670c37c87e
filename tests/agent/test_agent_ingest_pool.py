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
import signal
import sqlite3
import urllib.request

from agent_site import INGEST_WORKERS, AgentProcess, Site, metric_value, wait_until
from emulated_boards import ACK_TIMEOUT_S, RunningBoard, connect_board, make_board

from edge_agent.ingest_pool import owner_of

# Two boards per worker (owner_of(.., 2) gives 1, 1, 0, 0).
BOARDS = ("mg1-p0", "mg1-p1", "mg1-p4", "mg1-p5")


def _status(site: Site) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_port}/status", timeout=5) as r:
        return dict(json.load(r))


def _committed(site: Site, meter_id: str) -> list[int]:
    with sqlite3.connect(f"file:{site.database}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT seq FROM accepted WHERE meter_id = ?", (meter_id,)).fetchall()
    return sorted(int(seq) for (seq,) in rows)


def _acknowledged_past(boards: list[RunningBoard], margin: int, timeout: float) -> None:
    targets = [b.app.last_seq + margin for b in boards]
    wait_until(
        lambda: all(b.app.uplink.watermark >= t for b, t in zip(boards, targets, strict=True)),
        timeout,
        f"acknowledgements past {targets}",
    )


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
        _acknowledged_past(boards, 20, 30)
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
        _acknowledged_past(boards, 20, 30 + 2 * ACK_TIMEOUT_S)
    finally:
        for board in boards:
            board.halt()
    for meter_id, board in zip(BOARDS, boards, strict=True):
        app = board.app
        watermark = app.uplink.watermark
        committed = _committed(site, meter_id)
        assert committed == list(range(1, len(committed) + 1)), meter_id
        assert len(committed) >= watermark > 20, meter_id
        assert len(app.spool) == app.last_seq - watermark, meter_id
    assert agent.terminate() == 0
