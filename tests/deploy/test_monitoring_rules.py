"""Monitoring out of the box: the Prometheus alert rules and the Grafana dashboard in deploy/.

promtool (Debian package prometheus, installed by `make setup`) checks the
rules and the example scrape config and runs the rules' unit tests, which
feed each alert the failure it names. Every metric the rules and panels use
must be one the services export, and every panel expression must parse.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import CollectorRegistry

from aggregator.service import AggregatorMetrics
from edge_agent.metrics import AgentMetrics
from edge_agent.status import AgentStatus
from meterchain.service import register_build_info

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "meterchain-alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "meterchain-site.json"
METRIC = re.compile(r"\b(meterchain_[a-z_]+)\b")


def promtool(*args: str, cwd: Path = DEPLOY / "prometheus") -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make setup` installs it (Makefile system-deps)"
    proc = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def exported_names() -> set[str]:
    """Every series name the agent and the aggregator expose (counters as *_total, ...)."""
    names: set[str] = set()
    agent = AgentMetrics()
    AgentStatus(SimpleNamespace(metrics=agent))  # type: ignore[arg-type] - boards' online gauge
    for registry in (agent.registry, AggregatorMetrics().registry, CollectorRegistry()):
        register_build_info(registry, "test")
        names |= set(registry._names_to_collectors)  # noqa: SLF001 - the exposition names
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def test_rules_and_scrape_config_pass_promtool() -> None:
    assert "SUCCESS: 14 rules found" in promtool("check", "rules", RULES.name)
    promtool("check", "config", "prometheus.example.yml")


def test_each_alert_fires_on_its_failure_and_not_on_a_healthy_site() -> None:
    assert "SUCCESS" in promtool("test", "rules", "meterchain-alerts.test.yml")


def test_the_alerts_cover_what_an_operator_must_hear_about() -> None:
    alerts = {name for name, _ in rule_exprs()}
    assert {"MeterChainReadingsStalled", "MeterChainRoundsFailing", "MeterChainBlocksNotLanding",
            "MeterChainPrimaryChanged", "MeterChainModbusErrors",
            "MeterChainServiceDown"} <= alerts  # fmt: skip
    tested = (DEPLOY / "prometheus" / "meterchain-alerts.test.yml").read_text()
    for name in ("MeterChainReadingsStalled", "MeterChainRoundsFailing",
                 "MeterChainBlocksNotLanding", "MeterChainPrimaryChanged",
                 "MeterChainModbusErrors"):  # fmt: skip
        assert f"alertname: {name}\n        exp_alerts:" in tested, f"{name} never shown to fire"


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_used_is_one_the_services_export(source: str) -> None:
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    known = exported_names()
    unknown = {(where, m) for where, e in exprs for m in METRIC.findall(e) if m not in known}
    assert not unknown, f"{source} use metrics nobody exports: {sorted(unknown)}"
    assert len({m for _, e in exprs for m in METRIC.findall(e)}) >= 8


def test_dashboard_is_a_well_formed_grafana_dashboard(tmp_path: Path) -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "meterchain-site" and doc["schemaVersion"] >= 36
    assert [v["type"] for v in doc["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in doc["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["description"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
    # Every panel query parses as PromQL: promtool checks them as recording rules.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_exprs())]}]}  # fmt: skip
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", "panels.yml", cwd=tmp_path)
