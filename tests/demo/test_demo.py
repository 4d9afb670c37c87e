"""`meterchain demo`: a short run of the whole pipeline and the invariants of the issue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hil.broker import MosquittoBroker
from meterchain.demo.run import DemoError, DemoOptions, parse_broker_url, run_demo
from meterchain.market.reference import reference_case
from meterchain.market.rolling import run_day

HOURS = 3
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
    # 12 meters, one reading before the day and four per hour
    assert report["readings_published"] == 12 * (1 + 4 * HOURS)
    assert report["readings_on_ledger"] == report["readings_published"]
    assert report["readings_refused"] == 0


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


def test_improvements_are_equal_by_the_nash_split(demo_run: tuple[dict[str, Any], Path, Path]):
    report, _, _ = demo_run
    mgs = report["microgrids"]
    assert [m["id"] for m in mgs] == [mg.id for mg in reference_case().microgrids]
    for m in mgs:
        assert m["improvement"] == m["cost_without_trading"] - m["cost_with_trading"]
        assert m["improvement"] > 0  # nobody is worse off, and here everybody gains
        assert m["hours_in_coalition"] == HOURS
    improvements = [m["improvement"] for m in mgs]
    # each hour's saving is split equally; integer rounding moves at most 1 minor unit per hour
    assert max(improvements) - min(improvements) <= HOURS
    assert sum(h["saving"] for h in report["hours"]) == sum(improvements)


def test_rolling_clearing_has_lower_penalties(demo_run: tuple[dict[str, Any], Path, Path]):
    report, _, _ = demo_run
    assert 0 < report["penalty_rolling"] < report["penalty_day_ahead"]
    assert report["penalty_scenarios"] == 8


def test_committed_clearings_are_the_market_contracts(demo_run: tuple[dict[str, Any], Path, Path]):
    """The pipeline (forecasts, SDBFT, ledger) commits exactly what the contract clears."""
    report, _, _ = demo_run
    reference = run_day(reference_case(), "rolling")
    for line, outcome in zip(report["hours"], reference.hours[:HOURS], strict=False):
        expected = [
            {"seller": t.seller, "buyer": t.buyer, "energy_wh": t.energy_wh, "amount": t.amount,
             "price_per_kwh": t.price_per_kwh}
            for t in outcome.executed.trades
        ]  # fmt: skip
        assert line["trades"] == expected
        assert line["saving"] == outcome.executed.saving
    assert [h["primary"] for h in report["hours"]] == ["mg1-campus", "mg2-hospital",
                                                         "mg3-solar-park"]  # fmt: skip


def test_plot_is_an_svg_of_the_day(demo_run: tuple[dict[str, Any], Path, Path]) -> None:
    _, _, plot = demo_run
    text = plot.read_text()
    assert text.startswith("<svg")
    # Both axes are labelled (matplotlib keeps SVG text as text), and every hour is a tick.
    assert "energy cleared (kWh)" in text and "saving (currency units)" in text
    assert all(f"{h:02d}:00" in text for h in range(HOURS))


def test_text_report_names_every_part(tmp_path: Path) -> None:
    proc = meterchain("demo", "--hours", "1", "--ledger", str(tmp_path / "l.db"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("Per-hour clearing", "mg4-wind-farm ->", "Settlement per microgrid",
                   "rolling clearing", "day-ahead clearing", "published (acknowledged by the "
                   "broker) 60", "on the ledger                          60", "valid"):  # fmt: skip
        assert needle in out, needle


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
        parse_broker_url("http://example")
    assert parse_broker_url("mqtt://u:p%40ss@h:1884").password == "p@ss"


def test_external_broker(tmp_path: Path) -> None:
    """`--broker URL`: the same run against a real Mosquitto with password authentication."""
    with MosquittoBroker(tmp_path / "broker", users={"demo": "s3cret"}, plain_port=True) as b:
        url = f"mqtt://demo:s3cret@127.0.0.1:{b.plain_port}"
        proc = meterchain("demo", "--hours", "1", "--ledger", str(tmp_path / "l.db"),
                          "--broker", url, "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["broker"] == url
    assert report["readings_on_ledger"] == report["readings_published"] == 60
