"""`meterchain demo --plot FILE`: an SVG chart of the day, drawn with matplotlib.

Bars: green energy cleared between microgrids per hour (kWh, left axis);
line: the saving each hour's clearing shared out (currency units, right
axis). Both read from the demo report, which reads them from the ledger.
"""

from __future__ import annotations

from pathlib import Path

from meterchain import charts
from meterchain.demo.run import DemoReport

MONEY_SCALE = 10_000  # minor units per currency unit (meterchain.market.units)


def svg(report: DemoReport) -> str:
    fig, (ax,) = charts.figure()
    hours = [h.hour for h in report.hours]
    traded = [sum(t.energy_wh for t in h.trades) / 1000 for h in report.hours]
    saving = [h.saving / MONEY_SCALE for h in report.hours]
    ax.set_title(f"MeterChain demo: green energy cleared per hour and shared saving "
                 f"(ledger {report.ledger})")  # fmt: skip
    ax.bar(hours, traded, 0.7, color=charts.colour("with trading"),
           label="energy cleared between microgrids (kWh)")  # fmt: skip
    ax.set_ylabel("energy cleared (kWh)")
    ax.set_xlabel("hour of the demo day (UTC), each bar covers its hour")
    ax.set_xticks(hours, [f"{h:02d}:00" for h in hours], rotation=90 if len(hours) > 12 else 0)
    ax.margins(y=0.1)
    money = ax.twinx()
    money.plot(hours, saving, marker="o", color=charts.colour("retail price"),
               label="saving shared by the clearing (currency units)")  # fmt: skip
    money.set_ylabel("saving (currency units)")
    money.set_ylim(bottom=min(0.0, *saving) if saving else 0.0)
    if not hours:
        charts.empty_note(ax, "no hours were played")
    handles = ax.get_legend_handles_labels()[0] + money.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.22), frameon=False,
              ncols=2, fontsize="small")  # fmt: skip
    return charts.svg(fig) + "\n"


def write_svg(report: DemoReport, path: Path) -> None:
    path.write_text(svg(report))
