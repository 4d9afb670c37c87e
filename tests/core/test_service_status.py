"""The services' local HTTP API (/metrics, /healthz, /status) and `meterchain status` reading it."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from meterchain import __version__, service
from meterchain.status import main as status_main
from meterchain.times import iso_utc


class Service:
    """A stand-in service whose health and status a test changes while the server runs."""

    def __init__(self) -> None:
        self.health = service.Health()
        self.doc: dict[str, Any] = {
            "node_id": "mg1",
            "role": "node",
            "market": "m1",
            "market_clock": {"now": iso_utc(1_767_225_600), "speed": 1.0},
            "ledger": {"height": 7, "head_hash": b"\xab\xcd"},
            "meters": [{"id": "mg1-pv", "last_reading": iso_utc(1_767_225_590),
                        "last_reading_age_s": 10.0}],  # fmt: skip
            "peers_seen": {"mg2": iso_utc(1_767_225_599)},
        }
        self.fail_status = False
        self.fail_health = False

    def check(self) -> service.Health:
        if self.fail_health:
            raise ValueError("store closed")
        return self.health

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("half-built state")
        return self.doc


@pytest.fixture
def running() -> Iterator[tuple[Service, str, CollectorRegistry]]:
    svc = Service()
    registry = CollectorRegistry()
    Counter("meterchain_test_things", "things", registry=registry).inc(3)
    server = service.start_metrics_server(
        0, "127.0.0.1", registry, service_name="agent", status=svc.status,
        health=svc.check,
    )  # fmt: skip
    try:
        yield svc, f"http://127.0.0.1:{server.server_address[1]}", registry
    finally:
        server.shutdown()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_metrics_carry_build_info_and_other_paths_are_not_metrics(running) -> None:
    _, url, registry = running
    code, kind, body = _get(url + "/metrics")
    assert code == 200 and kind.startswith("text/plain")
    assert "meterchain_test_things_total 3.0" in body
    assert 'meterchain_build_info{python="' in body and f'version="{__version__}"' in body
    assert 'service="agent"' in body
    for path in ("/", "/metricsx", "/metrics/../status/x", "/healthzz", "/anything"):
        code, kind, body = _get(url + path)
        assert code == 404 and kind == "application/json", path
        assert "meterchain_test_things" not in body and "/healthz" in json.loads(body)["paths"]
    # A second server on the same registry does not register build_info twice.
    again = service.start_metrics_server(0, "127.0.0.1", registry, service_name="agent")
    again.shutdown()


def test_healthz_says_live_and_ready_and_why_not(running) -> None:
    svc, url, _ = running
    assert _get(url + "/healthz")[0] == 200
    svc.health = service.Health(live=True, ready=False, reasons=("broker not connected",))
    code, _, body = _get(url + "/healthz")
    assert code == 503 and json.loads(body) == {
        "live": True, "ready": False, "reasons": ["broker not connected"]}  # fmt: skip
    assert _get(url + "/healthz/live")[0] == 200
    assert _get(url + "/healthz/ready")[0] == 503
    svc.fail_health = True
    code, _, body = _get(url + "/healthz/live")
    assert code == 503 and "health check failed" in json.loads(body)["reasons"][0]


def test_status_is_json_with_health_and_survives_a_failing_source(running) -> None:
    svc, url, _ = running
    code, kind, body = _get(url + "/status")
    doc = json.loads(body)
    assert code == 200 and kind == "application/json"
    assert doc["service"] == "agent" and doc["version"] == __version__
    assert doc["ledger"] == {"height": 7, "head_hash": "abcd"}  # bytes as hex
    assert doc["health"] == {"live": True, "ready": True, "reasons": []}
    svc.fail_status = True
    code, _, body = _get(url + "/status")
    assert code == 500 and "half-built state" in json.loads(body)["error"]
    svc.fail_status = False
    assert _get(url + "/status")[0] == 200  # the server is still serving


def test_concurrent_requests_are_served() -> None:
    gate = threading.Event()

    def slow_status() -> dict[str, Any]:
        gate.wait(5)
        return {}

    server = service.start_metrics_server(0, "127.0.0.1", CollectorRegistry(),
                                          status=slow_status)  # fmt: skip
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        waiting = threading.Thread(target=_get, args=(url + "/status",))
        waiting.start()
        assert _get(url + "/healthz")[0] == 200  # not stuck behind the slow /status
        gate.set()
        waiting.join(5)
    finally:
        server.shutdown()
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.server_address[1]))


def test_status_command_prints_for_people_and_exits_by_health(running, capsys) -> None:
    svc, url, _ = running
    assert status_main(["--url", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("agent mg1 node (market m1, ") and out.splitlines()[0].endswith("ready")
    assert "2026-01-01T00:00:00Z (local 20" in out  # UTC and local, ISO-8601
    assert "  uptime" not in out and "market clock:\n    now: 2026-01-01T00:00:00Z" in out
    assert "last reading age 10.0 s" in out and "head hash: abcd" in out
    svc.health = service.Health(ready=False, reasons=("no round for 2 hours",))
    assert status_main(["--url", url]) == 1
    out = capsys.readouterr().out
    assert "NOT READY" in out and "! no round for 2 hours" in out
    assert status_main(["--url", url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["health"]["ready"] is False


def test_status_command_finds_the_port_in_a_config_and_says_what_is_wrong(
    running, tmp_path: Path, capsys
) -> None:
    _, url, _ = running
    port = int(url.rsplit(":", 1)[1])
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nmetrics_port = {port}\nmetrics_host = "0.0.0.0"\n')
    assert status_main(["--config", str(config)]) == 0
    capsys.readouterr()
    config.write_text('[aggregator]\nmetrics_port = 0\n')
    assert status_main(["--config", str(config)]) == 2
    assert "aggregator.metrics_port: is 0: the service serves no status API" in (
        capsys.readouterr().err)  # fmt: skip
    config.write_text("[agent\n")
    assert status_main(["--config", str(config)]) == 2
    assert "config error" in capsys.readouterr().err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    assert status_main(["--url", f"http://127.0.0.1:{free}"]) == 2
    assert "cannot read http://127.0.0.1:" in capsys.readouterr().err
