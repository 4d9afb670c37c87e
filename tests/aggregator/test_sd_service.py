"""meterchain.service: sd_notify over a real unix datagram socket, watchdog, log lines, metrics."""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from meterchain import service


def test_notify_sends_datagrams_to_the_notify_socket(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert service.notify("READY=1") is True
        assert service.notify("WATCHDOG=1") is True
        assert listener.recv(100) == b"READY=1"
        assert listener.recv(100) == b"WATCHDOG=1"


def test_notify_is_a_no_op_outside_systemd(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert service.notify("STOPPING=1") is False  # logged, never raised


def test_watchdog_interval_follows_systemd_variables(monkeypatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert service.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert service.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert service.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert service.watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "nonsense")
    assert service.watchdog_interval() is None


def test_log_lines_are_key_value(capsys) -> None:
    log = service.setup_logging("meterchain-test", "debug")
    log.info('block "7" committed', extra={"height": 7, "proposer": "agg 1"})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("ts=") and line.endswith('height=7 proposer="agg 1"')
    assert 'level=info logger=meterchain-test msg="block \\"7\\" committed"' in line
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        service.setup_logging("x", "loud")
    logging.getLogger().handlers.clear()


def test_metrics_server_serves_a_registry() -> None:
    registry = CollectorRegistry()
    Counter("meterchain_test_things", "things", registry=registry).inc(3)
    server = service.start_metrics_server(0, "127.0.0.1", registry)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert "meterchain_test_things_total 3.0" in body
    finally:
        server.shutdown()


def test_the_aggregator_unit_is_a_watched_notify_service_for_an_unprivileged_user() -> None:
    unit = (
        Path(__file__).resolve().parents[2] / "deploy/systemd/meterchain-aggregator.service"
    ).read_text()
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in unit.splitlines() if "=" in ln
             and not ln.startswith("#")}  # fmt: skip
    assert lines["Type"] == "notify" and lines["Restart"] == "on-failure"
    assert int(lines["WatchdogSec"]) > 0 and lines["DynamicUser"] == "yes"
    assert lines["RestartPreventExitStatus"] == "2"  # a config error is not retried
    assert lines["ExecStart"].endswith(
        "meterchain aggregator run --config /etc/meterchain/aggregator.toml"
    )
