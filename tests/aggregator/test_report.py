"""Settlement statements and the HTML market report, read from a verified ledger."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ledger"))

from ledger_world import H0, build_world  # noqa: E402

from aggregator.report import FIGURES, GLOSSARY, REASONS, build  # noqa: E402
from aggregator.report import main as report_main
from meterchain import codec  # noqa: E402
from meterchain.ledger.store import open_store  # noqa: E402
from meterchain.times import iso_local  # noqa: E402


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "ledger.db"
    build_world(open_store(str(path))).store.close()
    return path


def _settlement(ledger: Path) -> dict:
    with sqlite3.connect(ledger) as conn:
        (body,) = conn.execute("SELECT body FROM txs WHERE kind = 'settlement'").fetchone()
    return codec.decode(codec.decode(body)[1]["result"])


def test_statements_add_up_to_the_settlement_and_conserve_money(ledger: Path, capsys) -> None:
    assert report_main(["settlement", str(ledger)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["hour"] for r in rows} == {str(H0 + 1)}
    by_party = {r["party"]: r for r in rows}
    settled = _settlement(ledger)
    for reason in ("energy", "wheeling", "retail", "deposit", "deposit-refund"):
        for party, row in by_party.items():
            expected = sum(a for _, payee, a, why in settled["entries"]
                           if why == reason and payee == party) - sum(
                a for payer, _, a, why in settled["entries"] if why == reason and payer == party
            )  # fmt: skip
            assert int(row[reason]) == expected, (party, reason)
    # Every reason, and so every hour, sums to zero over the parties: money is conserved.
    for reason in (*REASONS, "net"):
        assert sum(int(r[reason]) for r in rows) == 0, reason
    # mg1 sold the cleared 165 kWh in full, and 450 kWh through its order with mg2.
    assert int(by_party["mg1"]["sold_wh"]) == 165_087 + 450_000
    assert int(by_party["mg2"]["bought_wh"]) == 165_087 + 450_000
    assert int(by_party["mg1"]["order-payment"]) == 360_000
    assert int(by_party["mg1"]["order-forfeit"]) == -285


def test_json_statements_and_a_party_filter(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "mg2.json"
    assert report_main(["settlement", str(ledger), "--format", "json", "--party", "mg2",
                        "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["market"] == "m1" and list(doc["totals"]) == ["mg2"]
    assert doc["totals"]["mg2"]["net"] == sum(s["net"] for s in doc["statements"])
    assert doc["sign_convention"].startswith("money: + received, - paid by the party")


def test_html_report_has_every_chart_the_hour_table_and_the_glossary(
    ledger: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    assert report_main(["plot", str(ledger), "--out", str(out)]) == 0
    html = out.read_text()
    for name, _ in FIGURES:  # line loading needs the network site file (below)
        assert html.count(f'<figure class="chart" id="chart-{name}"><svg') == (name != "lines")
    for title in (
        "Energy traded between microgrids per hour: cleared and delivered",
        "Energy price per kWh, and bargaining transfers (Nash, M3)",
        "Cost over the period, without and with trading (negative = earned)",
        "Green certificates per participant",
    ):
        assert title in html
    # The hour table: cleared and delivered kWh of the executed hour, its start in ISO-8601 UTC.
    local = iso_local(H0 * 3600 + 3600)
    assert f"<td>2026-01-01T01:00:00Z</td><td>{local}</td><td>165.1</td><td>165.1</td>" in html
    for term, meaning in GLOSSARY:
        assert f"<dt>{term}</dt><dd>{escape(meaning)}</dd>" in html
    assert "mg1 → mg2" in html


def test_a_ledger_that_does_not_verify_is_not_reported(ledger: Path, tmp_path: Path,
                                                       capsys) -> None:  # fmt: skip
    bad = tmp_path / "bad.db"
    bad.write_bytes(ledger.read_bytes())
    with sqlite3.connect(bad) as conn:
        conn.execute("UPDATE readings SET export_wh = export_wh + 1 WHERE pos = 0")
    assert report_main(["settlement", str(bad)]) == 1
    assert "the ledger does not verify: block 3: reading batch 0" in capsys.readouterr().err
    assert report_main(["plot", str(tmp_path / "none.db"), "--out", "x.html"]) == 2


def test_the_readme_glossary_defines_every_term_the_report_uses(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    glossary = readme[readme.index("Glossary (the report prints the same words):") :]
    glossary = glossary[: glossary.index("\n#")]
    for term, _ in GLOSSARY:
        assert f"**{term}**" in glossary, term


NETWORK = """
name = "test-feeder"
grid_bus = "sub"
[[bus]]
id = "sub"
[[bus]]
id = "n1"
[[bus]]
id = "n2"
[[line]]
id = "sub-n1"
from = "sub"
to = "n1"
reactance_mohm = 100
limit_w = 400000
[[line]]
id = "n1-n2"
from = "n1"
to = "n2"
reactance_mohm = 100
limit_w = 100000
[microgrids]
mg1 = "n1"
mg2 = "n2"
"""


def test_line_loading_from_the_network_site_file(ledger: Path, tmp_path: Path, capsys) -> None:
    from meterchain.market.network import load_network

    site = tmp_path / "network.toml"
    site.write_text(NETWORK)
    out = tmp_path / "report.html"
    assert report_main(["plot", str(ledger), "--out", str(out), "--network", str(site)]) == 0
    html = out.read_text()
    assert 'id="chart-lines"' in html and "Line loading per hour" in html
    assert "Line loading: a DC power flow over the grid network" in html
    # The figures are the cleared dispatch's DC flows against the file's limits.
    with open_store(str(ledger), create=False) as store:
        report = build(store, network=load_network(site))
    (hour,) = report.hours
    assert set(hour.loadings) == {"sub-n1", "n1-n2"}
    assert hour.loadings["n1-n2"][1] == 100_000 and hour.loadings["sub-n1"][1] == 400_000
    # mg2 sits at the end of the feeder: everything it takes crosses n1-n2.
    assert hour.loadings["n1-n2"][0] != 0
    # Without the file the chart is left out and the page says why.
    assert report_main(["plot", str(ledger), "--out", str(out)]) == 0
    assert 'id="chart-lines"' not in out.read_text()
    assert "give the network site file (<code>--network</code>)" in out.read_text()
    # A site file that does not place every microgrid is refused with the reason.
    site.write_text(NETWORK.replace('mg2 = "n2"\n', ""))
    assert report_main(["plot", str(ledger), "--out", str(out), "--network", str(site)]) == 2
    assert "mg2" in capsys.readouterr().err
