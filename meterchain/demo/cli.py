"""`meterchain demo [--hours N] [--ledger PATH] [--json] [--plot FILE] [--broker URL]`.

Runs a lab site of the real services (`meterchain site init --emulated`, then
`site up`, then `site down`) on the reference four-microgrid day and prints
per-hour clearing, the per-microgrid settlement, the rolling vs
day-ahead deviation penalties and the reading counts; `--json` prints one
JSON document instead. Exit status 0 when the run finished with readings
published == readings on the ledger and a ledger that verifies, 1 when
it finished but one of those checks failed, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from meterchain.demo.run import DemoOptions, DemoReport, HourLine, run_demo
from meterchain.errors import MeterChainError
from meterchain.market.explain import glossary_lines

MONEY_SCALE = 10_000  # minor units per currency unit (meterchain.market.units)


def money(amount: int) -> str:
    """Minor units as currency with two decimals (display only)."""
    sign = "-" if amount < 0 else ""
    cents = (abs(amount) + 50) // 100
    return f"{sign}{cents // 100:,}.{cents % 100:02d}"


def kwh(wh: int) -> str:
    return f"{wh / 1000:,.1f} kWh"


class ProgressBar:
    """A one-line progress bar on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._last = ""

    def __call__(self, done: int, total: int, what: str) -> None:
        filled = self.width * done // max(total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {done:>2}/{total} h  {what}"
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self._last)))
        elif what.endswith("done") or done == 0 and not self._last:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _feeder(h: HourLine) -> str:
    """The hour's line loading (M25): the most loaded line, or every line over its limit."""
    if not h.loadings:
        return "no network"
    over = [(line, flow, limit) for line, flow, limit in h.loadings if abs(flow) > limit]
    if not over:
        line, flow, limit = max(h.loadings, key=lambda ld: abs(ld[1]) * 1000 // ld[2])
        return f"within limits (most loaded {line} {kwh(abs(flow))[:-1]} of {kwh(limit)[:-1]})"
    text = ", ".join(
        f"{line} {kwh(abs(flow))[:-1]} > {kwh(limit)[:-1]} ({abs(flow) * 100 // limit} %)"
        for line, flow, limit in over
    )
    if not h.cut_wh:
        return f"OVERLOADED {text}; congestion priced for the re-bid"
    return f"OVERLOADED {text}; trades cut by {kwh(h.cut_wh)} to restore the limit"


def render(report: DemoReport, out: TextIO) -> None:
    w = out.write
    w("\nPer-hour clearing (SDBFT-committed, on the ledger; kWh are cleared energy, the plan "
      "agreed before the hour; `meterchain report plot` sets delivered energy beside it):\n")
    for h in report.hours:
        head = f"  {h.hour:02d}:00  final by {','.join(h.certified_by)}"
        if not h.trades:
            w(f"{head}  no trade (no saving to share)\n")
            continue
        w(f"{head}  saving {money(h.saving)}, penalties {money(h.penalty)}\n")
        for line in h.explanation:
            w(f"         {line}\n")
        w(f"         feeder: {_feeder(h)}\n")
        for kind, seller, buyer, provider, wh in h.remedies:
            w(f"         remedy ({kind}): {kwh(wh)} short of {seller} -> {buyer} "
              f"{'compensated to' if kind == 'ftr' else 'taken over by'} {provider}\n")
    w("\nSettlement per microgrid (currency units; Nash split of each hour's saving):\n")
    w(f"  {'microgrid':<16} {'role':<12} {'without trading':>16} {'with trading':>14} "
      f"{'improvement':>12} {'hours traded':>13} {'settled net':>13}\n")  # fmt: skip
    for m in report.microgrids:
        w(f"  {m.id:<16} {m.role:<12} {money(m.cost_without_trading):>16} "
          f"{money(m.cost_with_trading):>14} {money(m.improvement):>12} "
          f"{m.hours_in_coalition:>13} {money(m.settled_net):>13}\n")  # fmt: skip
    w("  costs: + spent, - earned (feed-in sales); settled net: money the microgrid received "
      "(+) or paid (-) in this run's settlements on the ledger, all reasons together\n")
    shared = {m.hours_in_coalition for m in report.microgrids}
    if len(shared) == 1:
        w("  every microgrid traded in every hour: the improvements are equal (to the minor "
          "unit of rounding per hour)\n")
    else:
        w("  each hour's saving is split equally among the microgrids that trade in it; a "
          "microgrid that gains nothing in an hour is not forced to trade\n")
    c = report.comparison
    w(f"\nDeviation penalties (M5), the whole 24-hour reference day whatever --hours says, "
      f"{c.get('scenarios')} seeded forecast-error days pooled:\n")  # fmt: skip
    w(f"  rolling clearing   {money(report.penalty_rolling):>14}\n")
    w(f"  day-ahead clearing {money(report.penalty_day_ahead):>14}\n")
    w(f"  rolling is {c.get('reduction_pct')} % lower (lower on {c.get('rolling_lower_days')} "
      f"of {c.get('scenarios')} days); this run's settlements on the ledger: "
      f"{money(sum(h.penalty for h in report.hours))}\n")  # fmt: skip
    w("\nGlossary:\n")
    for line in glossary_lines():
        w(f"  {line}\n")
    w("\nReadings:\n")
    w(f"  published (sent by the boards)         {report.readings_published}\n")
    w(f"  on the ledger                          {report.readings_on_ledger}\n")
    verdict = "valid" if report.ledger_valid else "INVALID"
    w(f"\nLedger {report.ledger}: {report.ledger_blocks} blocks, {verdict} "
      f"(check it with `meterchain ledger verify {report.ledger}`)\n")  # fmt: skip
    restarted = {name: n for name, n in report.restarts.items() if n}
    w(f"Broker: {report.broker}; processes restarted: {restarted or 'none'}; "
      f"{report.seconds:.1f} s\n")  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meterchain demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hours", type=int, default=24, help="hours of the day to run (1-24)")
    parser.add_argument("--ledger", type=Path, help="write the ledger here (SQLite, new file)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write an SVG chart of the day")
    parser.add_argument("--broker", metavar="URL", help="use mqtt://[user:pass@]host[:port]")
    parser.add_argument("--site", type=Path, metavar="DIR",
                        help="keep the site (configs, keys, logs) in this new folder")  # fmt: skip
    ns = parser.parse_args(argv)
    bar = ProgressBar(sys.stderr)
    try:
        report = run_demo(
            DemoOptions(hours=ns.hours, ledger=ns.ledger, broker_url=ns.broker, workdir=ns.site),
            bar,
        )  # fmt: skip
    except MeterChainError as exc:
        bar.finish()
        print(f"meterchain demo: {exc}", file=sys.stderr)
        return 2
    bar.finish()
    if ns.plot:
        from meterchain.demo.plot import write_svg

        write_svg(report, ns.plot)
    if ns.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render(report, sys.stdout)
        if ns.plot:
            print(f"Chart: {ns.plot}")
    ok = report.ledger_valid and report.readings_published == report.readings_on_ledger
    return 0 if ok else 1
