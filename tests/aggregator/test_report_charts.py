"""The market report's charts as an operator sees them: axes, ticks, negatives, legends, pixels.

Figures are checked as matplotlib laid them out (tick labels, bar heights,
legend boxes) on a 1-hour ledger and on a synthetic 24-hour market with
negative costs; then the HTML page is rendered in headless Chromium and each
chart's box in the screenshot must hold a drawn chart. Screenshots are kept
in out/report-screenshots/ (gitignored) for people to look at.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ledger"))

from ledger_world import H0, build_world  # noqa: E402

from aggregator.report import (  # noqa: E402
    CHART_GAP,
    CHART_H,
    FIGURES,
    HEADER_H,
    PAGE_W,
    HourOfTrade,
    MarketReport,
    Statement,
    build,
    certificates_figure,
    cost_figure,
    energy_figure,
    figures_for,
    line_figure,
    price_figure,
    render_html,
)
from meterchain import charts  # noqa: E402
from meterchain.ledger.store import open_store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "out" / "report-screenshots"
MGS = ("mg1-campus", "mg2-hospital", "mg3-solar-park", "mg4-wind-farm")


@pytest.fixture(scope="module")
def one_hour(tmp_path_factory: pytest.TempPathFactory) -> MarketReport:
    """The ledger test world: one cleared and settled hour between two microgrids."""
    path = tmp_path_factory.mktemp("charts") / "ledger.db"
    build_world(open_store(str(path))).store.close()
    with open_store(str(path), create=False) as store:
        report = build(store)
    assert [h.hour for h in report.hours] == [H0 + 1]
    return report


def day_market() -> MarketReport:
    """24 hours, four microgrids: the sellers earn (negative costs), transfers both ways."""
    hours, statements = [], []
    for k in range(24):
        hour = H0 + k
        wind = 100_000 + 5_000 * k
        trades = [("mg4-wind-farm", "mg1-campus", wind, 2_800 + 10 * k),
                  ("mg3-solar-park", "mg2-hospital", 40_000 * (k % 12), 3_100)]  # fmt: skip
        trades = [t for t in trades if t[2]]
        delivered = {(s, b): w - (w // 10 if k % 5 == 0 else 0) for s, b, w, _ in trades}
        hours.append(HourOfTrade(
            hour, trades, delivered if k < 22 else {},
            dict.fromkeys(MGS, 3_500 + 100 * (k // 6)), dict.fromkeys(MGS, 2_500),
            {"mg1-campus": 400_000, "mg2-hospital": 500_000, "mg3-solar-park": -90_000,
             "mg4-wind-farm": 30_000},
            {"mg1-campus": 380_000, "mg2-hospital": 470_000, "mg3-solar-park": -110_000,
             "mg4-wind-farm": -20_000},
            settled=k < 22,
            # the feeder line runs hot at noon: over its limit from 11:00 to 13:00
            loadings={"sub-n1": (-(300_000 + 20_000 * min(k, 24 - k)), 500_000),
                      "n1-n2": (40_000 * (k % 12), 400_000)},
        ))  # fmt: skip
        for j, mg in enumerate(MGS):
            line = Statement(hour, mg)
            line.money["transfer"] = (1 if j % 2 else -1) * (1_000 + 100 * k) if k < 22 else 0
            statements.append(line)
    certificates = {mg: {"held": 3 * j, "retired": j} for j, mg in enumerate(MGS)}
    return MarketReport("lab", statements, hours, certificates, 30)


def _ticks(fig: Figure, axis: str, index: int = 0) -> list[str]:
    fig.draw_without_rendering()
    ax = fig.axes[index]
    labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
    return [lab.get_text() for lab, t in zip(labels, ticks, strict=True) if low <= t <= high]


def _overlaps(fig: Figure) -> list[str]:
    """Legends that cover an axes, and tick labels that run into each other."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    found = []
    for ax in fig.axes:
        legend = ax.get_legend()
        boxes = [a.get_window_extent(renderer) for a in fig.axes]
        if legend is not None:
            lbox = legend.get_window_extent(renderer)
            found += [f"legend of {ax.get_title()!r} covers an axes"
                      for b in boxes if lbox.overlaps(b)]  # fmt: skip
        texts = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        extents = sorted((t.get_window_extent(renderer) for t in texts), key=lambda b: b.x0)
        found += [f"x tick labels overlap in {ax.get_title()!r}"
                  for a, b in zip(extents, extents[1:], strict=False) if a.x1 > b.x0]  # fmt: skip
    return found


@pytest.mark.parametrize("which", ["one_hour", "day"])
def test_tick_labels_are_distinct_and_nothing_overlaps(which: str, one_hour: MarketReport) -> None:
    report = one_hour if which == "one_hour" else day_market()
    for name, build_figure in FIGURES:
        fig = build_figure(report)
        assert _overlaps(fig) == [], name
        for index in range(len(fig.axes)):
            labels = _ticks(fig, "y", index)
            assert len(labels) >= 2 and len(set(labels)) == len(labels), (name, index, labels)
    # Hour labels: distinct HH:MM ticks, a new day's midnight as its date (MM-DD); the axis
    # label names the UTC span.
    fig = energy_figure(report)
    hours = _ticks(fig, "x")
    assert len(set(hours)) == len(hours) >= 2, hours
    assert all(len(h) == 5 and h[2] in ":-" for h in hours), hours
    assert "hour (UTC), 20" in fig.axes[0].get_xlabel()


def test_negative_costs_are_drawn_below_zero() -> None:
    fig = cost_figure(day_market())
    ax = fig.axes[0]
    heights = {round(p.get_height(), 2) for p in ax.patches}
    # mg3 earns 24 x 9 (without) and 24 x 11 (with trading); mg4 earns with trading only.
    assert {-216.0, -264.0, -48.0, 72.0} <= heights
    low, high = ax.get_ylim()
    assert low < -264 and high > 24 * 50
    assert any(t.startswith("−") for t in _ticks(fig, "y"))  # matplotlib's minus sign


def test_one_hour_charts_still_show_their_points(one_hour: MarketReport) -> None:
    fig = price_figure(one_hour)
    prices = [line for line in fig.axes[0].get_lines() if "→" in str(line.get_label())]
    assert prices and all(line.get_marker() == "o" for line in prices)
    assert sum(1 for y in prices[0].get_ydata() if y == y) == 1  # one point, drawn as a marker
    certs = certificates_figure(one_hour)
    labels = _ticks(certs, "y")
    assert all(label.lstrip("−").isdigit() for label in labels), labels  # whole certificates


def test_cleared_and_delivered_are_both_drawn_and_labelled() -> None:
    report = day_market()
    fig = energy_figure(report)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "left bar: cleared" in legend and "right bar: delivered" in legend
    # Hour 0 of the wind pair: 100 kWh cleared, 90 delivered (a shortfall of a tenth).
    first_hour = ax.get_xlim()[0] + 1 / 24
    tall = sorted(round(p.get_height(), 1) for p in ax.patches if p.get_x() < first_hour)
    assert 100.0 in tall and 90.0 in tall
    assert any(t.get_text() == "not settled yet" for t in ax.texts)
    # The tallest stack is not cut by the frame, even with an empty pair stacked on it.
    tall_hour = report.hours[23]
    tall_hour.trades = [t for t in tall_hour.trades if t[0] == "mg3-solar-park"]
    tall_hour.trades = [(s, b, 900_000, p) for s, b, _, p in tall_hour.trades]
    ax = energy_figure(report).axes[0]
    assert ax.get_ylim()[1] > 900 * 1.05


def test_line_loading_marks_overloads_against_the_limit() -> None:
    fig = line_figure(day_market())
    ax = fig.axes[0]
    feeder = next(ln for ln in ax.get_lines() if ln.get_label() == "sub-n1")
    loading = list(feeder.get_ydata())
    assert loading[0] == pytest.approx(60.0) and loading[12] == pytest.approx(108.0)
    circled = [y for c in ax.collections for _, y in c.get_offsets()]
    # sub-n1 at 11:00, 12:00, 13:00 (104-108 %), n1-n2 at 11:00 and 23:00 (110 %)
    assert sorted(round(y) for y in circled) == [104, 104, 108, 110, 110]
    assert any(ln.get_label() == "thermal limit (100 %)" for ln in ax.get_lines())
    assert ax.get_ylim()[1] > 108


def test_series_keep_their_colours_across_reports() -> None:
    one = charts.colours(["mg1 → mg2", "mg4-wind-farm → mg1-campus"])
    other = charts.colours(["mg4-wind-farm → mg1-campus", "mg3 → mg1", "mg9 → mg2"])
    assert one["mg4-wind-farm → mg1-campus"] == other["mg4-wind-farm → mg1-campus"]
    assert charts.colour("with trading") == charts.FIXED_COLOURS["with trading"]
    many = charts.colours(f"mg{i}" for i in range(10))
    assert len(set(many.values())) == 10  # no two series drawn together share a colour


def _screenshot(html: str, name: str, tmp_path: Path, charts_drawn: int) -> Image.Image:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: `make setup` installs it (Makefile system-deps)"
    page = tmp_path / f"{name}.html"
    page.write_text(html, encoding="utf-8")
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / f"{name}.png"
    shot.unlink(missing_ok=True)
    height = HEADER_H + charts_drawn * (CHART_H + CHART_GAP)
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--hide-scrollbars",
         "--force-device-scale-factor=1", f"--window-size={PAGE_W},{height}",
         f"--screenshot={shot}", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return Image.open(shot).convert("RGB")


@pytest.mark.parametrize("which", ["one_hour", "day"])
def test_the_report_renders_in_chromium(which: str, one_hour: MarketReport, tmp_path) -> None:
    report = one_hour if which == "one_hour" else day_market()
    drawn = figures_for(report)
    assert [n for n, _ in drawn] == [n for n, _ in FIGURES if n != "lines" or which == "day"]
    image = _screenshot(render_html(report), f"report-{which}", tmp_path, len(drawn))
    assert image.width == PAGE_W
    for k, (name, _) in enumerate(drawn):
        top = HEADER_H + k * (CHART_H + CHART_GAP)
        box = image.crop((0, top, PAGE_W, top + CHART_H)).resize((PAGE_W // 4, CHART_H // 4))
        pixels = np.asarray(box, dtype=int).reshape(-1, 3)
        ink = float((pixels.min(axis=1) < 200).mean())
        # Series colours (saturated, not grey text or grid lines) show the data is drawn.
        saturated = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 60]
        colours = {tuple(c) for c in (saturated // 32).tolist()}
        assert ink > 0.02, f"chart {name} looks blank ({ink:.1%} ink) in {which}"
        assert len(colours) >= 2, f"chart {name} has no coloured series in {which}"
    header = image.crop((0, 0, PAGE_W, HEADER_H))
    assert int((np.asarray(header).min(axis=2) < 128).sum()) > 500  # the title and summary
    # ... and it fits its box: the rows just above the first chart are blank, nothing cut off.
    assert int(np.asarray(image.crop((0, HEADER_H - 12, PAGE_W, HEADER_H))).min()) > 200
