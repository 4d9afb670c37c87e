"""`meterchain demo`: the reference day on a lab site of the real services, and its invariants.

The demo is `site init --emulated` + `site up` + `site down` (separate
processes: Mosquitto, the aggregator, three consensus agents and one
submitter, twelve emulated boards on emulated SDM630s); these tests check what
it reports against the ledger it leaves.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hil.broker import MosquittoBroker
from meterchain.demo.run import DemoError, DemoOptions, check_broker_url, run_demo
from meterchain.market.reference import reference_case

HOURS = 3
METERS = 12
REPO = Path(__file__).resolve().parents[2]


def meterchain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterchain.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    out = tmp_path_factory.mktemp("demo")
    ledger, plot = out / "ledger.db", out / "day.svg"
    proc = meterchain(
        "demo", "--hours", str(HOURS), "--ledger", str(ledger), "--json", "--plot", str(plot)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), ledger, plot


def test_every_published_reading_is_on_the_ledger(demo_run: tuple[dict[str, Any], Path, Path]):
    report, _, _ = demo_run
    # 12 boards sample every 15 market minutes; the site runs a little beyond the hours asked
    assert report["readings_published"] >= METERS * 4 * HOURS
    assert report["readings_on_ledger"] == report["readings_published"]
    assert all(n == 0 for n in report["restarts"].values()), report["restarts"]


def test_the_ledger_verifies(demo_run: tuple[dict[str, Any], Path, Path]) -> None:
    report, ledger, _ = demo_run
    assert report["ledger"] == str(ledger) and report["ledger_valid"] is True
    proc = meterchain("ledger", "verify", str(ledger), "--json")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["valid"] is True
    assert verdict["readings"] == report["readings_on_ledger"]
    assert verdict["reading_signatures_checked"] == report["readings_on_ledger"]
    assert verdict["blocks"] == report["ledger_blocks"]


def test_the_services_cleared_and_settled_every_hour(demo_run: tuple[dict[str, Any], Path, Path]):
    report, _, _ = demo_run
    ids = [mg.id for mg in reference_case().microgrids]
    assert [h["hour"] for h in report["hours"]] == list(range(HOURS))
    for hour in report["hours"]:
        # final by more than half of the three consensus members, never by the submitter
        assert 2 <= len(hour["certified_by"]) <= 3 and set(hour["certified_by"]) <= set(ids[:3])
        assert hour["trades"] and hour["saving"] > 0
        assert all(t["seller"] in ids and t["buyer"] in ids for t in hour["trades"])
    mgs = report["microgrids"]
    assert [m["id"] for m in mgs] == ids
    assert [m["role"] for m in mgs] == ["consensus"] * 3 + ["submit-only"]
    for m in mgs:
        assert m["improvement"] == m["cost_without_trading"] - m["cost_with_trading"]
        assert m["improvement"] > 0  # nobody is worse off, and here everybody gains
    improvements = [m["improvement"] for m in mgs if m["hours_in_coalition"] == HOURS]
    # each hour's saving is split equally; integer rounding moves at most 1 minor unit per hour
    assert improvements and max(improvements) - min(improvements) <= HOURS
    assert sum(h["saving"] for h in report["hours"]) == sum(m["improvement"] for m in mgs)


def test_rolling_clearing_has_lower_penalties(demo_run: tuple[dict[str, Any], Path, Path]):
    report, _, _ = demo_run
    assert 0 < report["penalty_rolling"] < report["penalty_day_ahead"]
    assert report["penalty_scenarios"] == 8


def test_plot_is_an_svg_of_the_hours(demo_run: tuple[dict[str, Any], Path, Path]) -> None:
    _, _, plot = demo_run
    text = plot.read_text()
    assert text.startswith("<svg")
    assert "energy cleared (kWh)" in text and "saving (currency units)" in text
    assert all(f"{h:02d}:00" in text for h in range(HOURS))


def test_an_existing_ledger_is_never_overwritten(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    ledger.write_bytes(b"precious")
    proc = meterchain("demo", "--hours", "1", "--ledger", str(ledger))
    assert proc.returncode == 2
    assert "a ledger is already there" in proc.stderr
    assert ledger.read_bytes() == b"precious"


def test_bad_options_are_named() -> None:
    with pytest.raises(DemoError, match="--hours must be 1..24"):
        run_demo(DemoOptions(hours=25))
    with pytest.raises(DemoError, match="expected mqtt://"):
        check_broker_url("http://example")
    with pytest.raises(DemoError, match="--broker"):
        check_broker_url("mqtt://host:99999")
    assert check_broker_url("mqtt://u:p%40ss@h:1884") == "mqtt://u:p%40ss@h:1884"


def test_the_core_never_imports_the_services() -> None:
    """meterchain/ (the shared core, the demo and the site tools) imports neither
    edge_agent nor aggregator: the demo starts them as processes."""
    offenders = []
    for path in (REPO / "meterchain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] in ("edge_agent", "aggregator", "hil")]  # fmt: skip
    assert not offenders, offenders


def test_external_broker(tmp_path: Path) -> None:
    """`--broker URL`: the same site against a Mosquitto the demo did not start (one user)."""
    with MosquittoBroker(tmp_path / "broker", users={"demo": "s3cret"}, plain_port=True) as b:
        url = f"mqtt://demo:s3cret@127.0.0.1:{b.plain_port}"
        proc = meterchain("demo", "--hours", "1", "--ledger", str(tmp_path / "l.db"),
                          "--broker", url, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["broker"] == url and report["ledger_valid"]
    assert report["readings_on_ledger"] == report["readings_published"] >= METERS * 4
