"""`meterchain demo --plot FILE`: an SVG chart of the day (no plotting library needed).

Bars: green energy traded between microgrids per hour (kWh); line: the
saving each hour's clearing shared out (currency units). Both read from the
demo report, which reads them from the ledger.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

from meterchain.demo.run import DemoReport

WIDTH, HEIGHT, PAD = 760, 360, 50


def svg(report: DemoReport) -> str:
    hours = report.hours
    traded = [sum(t.energy_wh for t in h.trades) / 1000 for h in hours]
    saving = [h.saving / 10_000 for h in hours]
    n = max(len(hours), 1)
    top_kwh = max(traded, default=0) or 1.0
    top_money = max(saving, default=0) or 1.0
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    slot = inner_w / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{PAD}" y="20" font-size="14">MeterChain demo: green power traded per hour '
        "(bars, kWh) and shared saving (line, currency units)</text>",
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
        'stroke="black"/>',
    ]
    for i, (h, kwh) in enumerate(zip(hours, traded, strict=True)):
        bar_h = inner_h * kwh / top_kwh
        x = PAD + i * slot + slot * 0.15
        parts.append(
            f'<rect x="{x:.1f}" y="{HEIGHT - PAD - bar_h:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{bar_h:.1f}" fill="#4caf50"><title>{h.hour:02d}:00 {kwh:.1f} kWh'
            "</title></rect>"
        )
        parts.append(
            f'<text x="{x + slot * 0.35:.1f}" y="{HEIGHT - PAD + 14}" '
            f'text-anchor="middle">{h.hour:02d}</text>'
        )
    points = " ".join(
        f"{PAD + (i + 0.5) * slot:.1f},{HEIGHT - PAD - inner_h * s / top_money:.1f}"
        for i, s in enumerate(saving)
    )
    if points:
        parts.append(f'<polyline points="{points}" fill="none" stroke="#1565c0" stroke-width="2"/>')
    parts.append(
        f'<text x="{PAD}" y="{PAD - 8}">max {top_kwh:,.1f} kWh / {top_money:,.2f} saved; '
        f"ledger {escape(report.ledger)}</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_svg(report: DemoReport, path: Path) -> None:
    path.write_text(svg(report))
