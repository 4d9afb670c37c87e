"""`meterchain report settlement|plot`: statements and a market report, from a verified ledger.

Both first verify the ledger (hashes, Merkle roots, QCs, rules and re-executed
settlement; `--signatures` adds every reading signature), so nothing is
reported that the ledger does not prove. `settlement` writes one statement
line per hour and party (CSV or JSON): energy bought, sold and short (Wh) and
the money each settlement reason moved (minor units, + received, - paid),
including trade orders fired by the contract client. `plot` writes one HTML
page of matplotlib charts (inline SVG): energy traded per hour (cleared and
delivered), energy prices and bargaining transfers, each microgrid's cost
with and without trading, green certificates, an hour table and a glossary
of every figure (`GLOSSARY`). Times are ISO-8601 UTC.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from meterchain import charts, codec
from meterchain.errors import MeterChainError
from meterchain.ledger.chain import ChainError, verify_store
from meterchain.ledger.readings import HOUR
from meterchain.ledger.state import LedgerState
from meterchain.ledger.store import LedgerStore, StoreError, open_store
from meterchain.ledger.transactions import Tx
from meterchain.market import congestion
from meterchain.market.explain import GLOSSARY as MARKET_TERMS
from meterchain.market.explain import hour_gain
from meterchain.market.model import RESERVE
from meterchain.market.network import Network, load_network
from meterchain.times import iso_local, iso_utc

MONEY_SCALE = 10_000  # minor units per currency unit
SETTLEMENT_REASONS = (
    "energy", "shortfall", "wheeling", "bargaining-transfer", "retail", "feed-in", "deposit",
    "deposit-refund",
)  # fmt: skip
ORDER_REASONS = ("order-payment", "order-forfeit")
REMEDY_REASON = "remedy"  # every entry of a failed-execution remedy (M21), summed
REASONS = SETTLEMENT_REASONS + ORDER_REASONS + (REMEDY_REASON,)


@dataclass
class Statement:
    """One party's money and energy in one hour (Wh; minor units, + received / - paid)."""

    hour: int
    party: str
    bought_wh: int = 0
    sold_wh: int = 0
    short_wh: int = 0
    money: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    @property
    def net(self) -> int:
        return sum(self.money.values())

    def row(self) -> dict[str, Any]:
        return {
            "hour": self.hour,
            "time": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(self.hour * HOUR)),
            "party": self.party,
            "bought_wh": self.bought_wh,
            "sold_wh": self.sold_wh,
            "short_wh": self.short_wh,
            **{reason: self.money[reason] for reason in REASONS},
            "net": self.net,
        }


@dataclass
class HourOfTrade:
    """The executed hour of a committed clearing, as the charts use it."""

    hour: int
    trades: list[tuple[str, str, int, int]]  # seller, buyer, cleared Wh, price per kWh
    delivered: dict[tuple[str, str], int]  # (seller, buyer) -> delivered Wh (after settlement)
    retail: dict[str, int]  # microgrid -> retail price per kWh that hour
    feed_in: dict[str, int]  # microgrid -> feed-in tariff per kWh
    standalone_cost: dict[str, int]  # cost alone (minor units)
    final_cost: dict[str, int]  # cost with trading, after bargaining payments
    settled: bool = False  # a settlement of this hour is on the ledger
    # line -> (DC flow W, thermal limit W) of the cleared dispatch, with a network site file
    loadings: dict[str, tuple[int, int]] = field(default_factory=dict)
    cut_wh: int = 0  # trades cut back by the weak centre to restore line limits
    remedied_wh: int = 0  # short energy taken over by other sellers or storage (M21)


@dataclass
class MarketReport:
    """Everything the statements and the charts show, read from one verified ledger."""

    market: str
    statements: list[Statement]
    hours: list[HourOfTrade]
    certificates: dict[str, dict[str, int]]
    blocks: int

    @property
    def microgrids(self) -> list[str]:
        """Every microgrid in a cleared hour, sorted."""
        return sorted({mg for h in self.hours for mg in h.standalone_cost})


def _stored_txs(store: LedgerStore) -> list[Tx]:
    return [Tx.decode(body) for b in store.stored_blocks() for _, _, body in b.txs]


def build(
    store: LedgerStore, *, signatures: bool = False, network: Network | None = None
) -> MarketReport:
    """Verify the ledger, then gather statements and chart series from it.

    With the market's `network` (its site file, M25), or else the grid network
    the regulator recorded on the ledger, each cleared hour's DC line flows are
    computed for the line-loading chart.
    """
    state, report = verify_store(store, signatures=signatures)
    if state is None:
        return MarketReport("", [], [], {}, 0)
    if network is None and state.network is not None:
        from meterchain.ledger.weakcentre import network_from

        network = network_from(state.network)
    statements: dict[tuple[int, str], Statement] = {}

    def line(hour: int, party: str) -> Statement:
        return statements.setdefault((hour, party), Statement(hour, party))

    hours: dict[int, HourOfTrade] = {}
    orders: dict[str, dict[str, Any]] = {}
    for tx in _stored_txs(store):
        if tx.kind == "clearing":
            hours[tx.body["hour"]] = _hour_of_trade(tx, network)
        elif tx.kind == "congestion" and tx.body["hour"] in hours:
            record = congestion.Adjustment.from_cbor(tx.body["record"])
            hours[tx.body["hour"]].cut_wh = record.total_cut_wh
        elif tx.kind == "remedy":
            hour = tx.body["hour"]
            for kind, _seller, _buyer, _provider, wh, entries in codec.decode(
                tx.body["result"]
            )["remedies"]:
                if hour in hours and kind != "ftr":
                    hours[hour].remedied_wh += wh
                for payer, payee, amount, _reason in entries:
                    line(hour, payer).money[REMEDY_REASON] -= amount
                    line(hour, payee).money[REMEDY_REASON] += amount
        elif tx.kind == "settlement":
            hour = tx.body["hour"]
            settled = codec.decode(tx.body["result"])
            if hour in hours:
                hours[hour].settled = True
            for seller, buyer, cleared, delivered in settled["deliveries"]:
                line(hour, seller).sold_wh += delivered
                line(hour, seller).short_wh += cleared - delivered
                line(hour, buyer).bought_wh += delivered
                if hour in hours:
                    hours[hour].delivered[(seller, buyer)] = delivered
            for payer, payee, amount, reason in settled["entries"]:
                line(hour, payer).money[reason] -= amount
                line(hour, payee).money[reason] += amount
        elif tx.kind == "order":
            orders[tx.body["id"]] = dict(tx.body)
        elif tx.kind == "order_change":
            orders[tx.body["order"]].update(
                {k: tx.body[k] for k in ("energy_wh", "price", "delivery")}
            )
        elif tx.kind == "contract_fire":
            order = orders[tx.body["order"]]
            hour, paid = order["delivery"], tx.body["payment"]
            line(hour, order["buyer"]).money["order-payment"] -= paid
            line(hour, order["buyer"]).bought_wh += tx.body["delivered_wh"]
            line(hour, order["seller"]).money["order-payment"] += paid
            line(hour, order["seller"]).sold_wh += tx.body["delivered_wh"]
        elif tx.kind == "deposit_forfeit":
            hour = orders[tx.body["order"]]["delivery"]
            line(hour, tx.body["party"]).money["order-forfeit"] -= tx.body["amount"]
            line(hour, RESERVE).money["order-forfeit"] += tx.body["amount"]
    return MarketReport(
        state.market,
        sorted(statements.values(), key=lambda s: (s.hour, s.party)),
        [hours[h] for h in sorted(hours)],
        _balances(state),
        report.blocks,
    )


def _hour_of_trade(tx: Tx, network: Network | None) -> HourOfTrade:
    from meterchain.ledger.settle import decode_clearing

    request, result = decode_clearing(tx.body["request"], tx.body["result"])
    executed = result.executed[0]
    t = executed.period - request.first_period
    ids = result.microgrids
    loadings = {}
    if network is not None:
        flows = congestion.check(network, result)  # MarketError: the site file does not fit
        loadings = {ld.line: (ld.flow_w, ld.limit_w) for ld in flows.loadings}
    return HourOfTrade(
        tx.body["hour"],
        [(tr.seller, tr.buyer, tr.energy_wh, tr.price_per_kwh) for tr in executed.trades],
        {},
        {mg.id: mg.retail_price_per_kwh[t] for mg in request.microgrids},
        {mg.id: mg.feed_in_tariff_per_kwh for mg in request.microgrids},
        # the hour alone, stored energy valued as the bargain values it (market.explain)
        {mg: executed.final_cost(i) + hour_gain(result, i) for i, mg in enumerate(ids)},
        {mg: executed.final_cost(i) for i, mg in enumerate(ids)},
        loadings=loadings,
    )


def _balances(state: LedgerState) -> dict[str, dict[str, int]]:
    out = state.certificate_balances()
    for participant in state.participants:
        out.setdefault(participant, {"held": 0, "retired": 0})
    return dict(sorted(out.items()))


# --- settlement statements ---------------------------------------------------------


def statements_csv(statements: Sequence[Statement]) -> str:
    out = io.StringIO()
    columns = ["hour", "time", "party", "bought_wh", "sold_wh", "short_wh", *REASONS, "net"]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for s in statements:
        writer.writerow(s.row())
    return out.getvalue()


def statements_json(report: MarketReport) -> str:
    totals: dict[str, dict[str, int]] = {}
    for s in report.statements:
        t = totals.setdefault(s.party, {"bought_wh": 0, "sold_wh": 0, "short_wh": 0, "net": 0})
        t["bought_wh"] += s.bought_wh
        t["sold_wh"] += s.sold_wh
        t["short_wh"] += s.short_wh
        t["net"] += s.net
    doc = {
        "market": report.market,
        "money_unit": f"1/{MONEY_SCALE} currency unit",
        "sign_convention": "money: + received, - paid by the party; net: the sum over every "
        "reason; energy in Wh (bought, sold, and short: cleared but not delivered)",
        "time": "the start of the hour, ISO-8601 UTC",
        "statements": [s.row() for s in report.statements],
        "totals": totals,
    }
    return json.dumps(doc, indent=2) + "\n"


# --- the HTML report -------------------------------------------------------------------

# Every figure the report shows, in words (the README's glossary says the same); prices,
# bargaining transfers and gains in the market's own words (meterchain.market.explain).
_REPORT_TERMS: tuple[tuple[str, str], ...] = (
    ("cleared energy",
     "Energy a seller agreed to deliver to a buyer in the committed clearing of an hour "
     "(the plan, signed by the consensus agents before the hour)."),
    ("delivered energy",
     "Energy the meters show the seller actually delivered to that buyer in the hour, as "
     "settled after it (M5): local demand is served first, a seller with several buyers "
     "delivers pro rata. Cleared minus delivered is the shortfall."),
    ("cost without trading",
     "A microgrid's own cost if it traded with nobody (the disagreement point): gas, "
     "storage wear, grid purchases minus feed-in sales. Negative means it earns money."),
    ("cost with trading",
     "Its cost in the committed clearing after energy payments and bargaining transfers. "
     "Cost without trading minus cost with trading is its improvement (never negative)."),
    ("penalty",
     "For each kWh cleared but not delivered the seller pays the buyer the buyer's green loss "
     "coefficient plus max(0, retail price - energy price) (M5)."),
    ("sign convention",
     "Money in a statement is + received and - paid by that party; net is their sum over "
     "every settlement reason. Costs are + spent and - earned."),
    ("money unit",
     f"Ledgers hold integer minor units, 1/{MONEY_SCALE:,} of a currency unit; charts show "
     "currency units."),
    ("line loading",
     "The DC power flow on a line in the cleared dispatch as a percentage of its thermal "
     "limit, from the network site file (M25); above 100 % the line is overloaded and "
     "congestion management cuts trades."),
    ("congestion cut",
     "Energy of the cleared trades the weak centre cut back because a line was over its limit: "
     "the smallest total cut that restores every limit; settled as the cut trades."),
    ("remedy",
     "When a trade delivered short, its energy taken over by another seller's spare energy or "
     "by storage reserve, or compensated to transmission-right holders (M21); the statements' "
     "remedy column sums its money."),
    ("green certificate",
     "One per MWh of verified renewable generation (M22); held until retired, once."),
    ("times",
     "ISO-8601 in UTC (the Z suffix); an hour is named by its start and covers the next "
     "60 minutes."),
)  # fmt: skip
GLOSSARY = _REPORT_TERMS[:2] + tuple(MARKET_TERMS.items()) + _REPORT_TERMS[2:]

# The page lays charts out in fixed boxes, so a screenshot can be checked chart by chart.
PAGE_W, HEADER_H, CHART_H, CHART_GAP = 1000, 170, 440, 20


def _kwh(wh: float) -> float:
    return wh / 1000


def _currency(minor: float) -> float:
    return minor / MONEY_SCALE


def energy_figure(report: MarketReport) -> Figure:
    """Energy traded per hour and pair: cleared (hatched, left) next to delivered (solid, right)."""
    fig, (ax,) = charts.figure()
    ax.set_title("Energy traded between microgrids per hour: cleared and delivered")
    ax.set_ylabel("energy (kWh)")
    hours = [h.hour for h in report.hours]
    edges = charts.hour_edges(hours)
    pairs = sorted({(s, b) for h in report.hours for s, b, _, _ in h.trades})
    names = {pair: f"{pair[0]} → {pair[1]}" for pair in pairs}
    palette = charts.colours(names.values())
    hour = (edges[1] - edges[0]) if edges else 1.0
    cleared_base = [0.0] * len(hours)
    delivered_base = [0.0] * len(hours)
    for pair in pairs:
        cleared = [_kwh(sum(w for s, b, w, _ in h.trades if (s, b) == pair)) for h in report.hours]
        delivered = [_kwh(h.delivered.get(pair, 0)) for h in report.hours]
        starts = edges[:-1]
        ax.bar([x + 0.08 * hour for x in starts], cleared, 0.4 * hour, bottom=cleared_base,
               align="edge", color=palette[names[pair]], alpha=0.45, hatch="//",
               edgecolor=palette[names[pair]], linewidth=0.5)  # fmt: skip
        ax.bar([x + 0.52 * hour for x in starts], delivered, 0.4 * hour, bottom=delivered_base,
               align="edge", color=palette[names[pair]], label=names[pair])  # fmt: skip
        cleared_base = [a + b for a, b in zip(cleared_base, cleared, strict=True)]
        delivered_base = [a + b for a, b in zip(delivered_base, delivered, strict=True)]
    for x, h in zip(edges[:-1], report.hours, strict=False):
        if h.trades and not h.settled:
            ax.annotate("not settled yet", (x + 0.72 * hour, 0), rotation=90, fontsize="x-small",
                        ha="center", va="bottom", color="#616161")  # fmt: skip
    if not pairs:
        charts.empty_note(ax, "no energy traded between microgrids in these hours")
    # Explicit: zero-height bars stacked on the tallest would pin the top (sticky edges).
    ax.set_ylim(0, max([*cleared_base, *delivered_base, 0.0]) * 1.08 or 1.0)
    charts.hour_axis(ax, hours)
    charts.legend_outside(ax, "seller → buyer", extra=(
        Patch(facecolor="#bdbdbd", edgecolor="#616161", hatch="//", label="left bar: cleared"),
        Patch(facecolor="#616161", label="right bar: delivered"),
    ))  # fmt: skip
    return fig


def price_figure(report: MarketReport) -> Figure:
    """Energy prices per kWh (top) and the bargaining transfers of each hour (bottom)."""
    fig, (top, bottom) = charts.figure(rows=2)
    top.set_title("Energy price per kWh, and bargaining transfers (Nash, M3)")
    top.set_ylabel("currency per kWh")
    hours = [h.hour for h in report.hours]
    edges = charts.hour_edges(hours)
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    nan = float("nan")
    pairs = sorted({(s, b) for h in report.hours for s, b, _, _ in h.trades})
    palette = charts.colours(f"{s} → {b}" for s, b in pairs)
    for pair in pairs:
        name = f"{pair[0]} → {pair[1]}"
        prices = [next((_currency(p) for s, b, w, p in h.trades if (s, b) == pair and w), nan)
                  for h in report.hours]  # fmt: skip
        top.plot(centres, prices, marker="o", color=palette[name], label=name)
    bands = {
        "retail price": [_currency(sum(h.retail.values()) / len(h.retail)) if h.retail else nan
                         for h in report.hours],
        "feed-in tariff": [_currency(sum(h.feed_in.values()) / len(h.feed_in)) if h.feed_in
                           else nan for h in report.hours],
    }  # fmt: skip
    for name, values in bands.items():
        top.plot(centres, values, linestyle="--", marker="_", markersize=14,
                 color=charts.colour(name), label=f"{name} (mean over microgrids)")  # fmt: skip
    charts.zero_line(top)
    if not pairs:
        charts.empty_note(top, "no trades between microgrids in these hours")
    charts.legend_outside(top, "energy price, seller → buyer")
    bottom.set_ylabel("currency\n(+ received, − paid)")
    transfers = _transfers(report)
    parties = sorted(transfers)
    palette = charts.colours(parties)
    hour = (edges[1] - edges[0]) if edges else 1.0
    width = 0.8 * hour / max(len(parties), 1)
    for k, party in enumerate(parties):
        bottom.bar([x + 0.1 * hour + k * width for x in edges[:-1]],
                   [_currency(transfers[party].get(h, 0)) for h in hours],
                   width, align="edge", color=palette[party], label=party)  # fmt: skip
    charts.zero_line(bottom)
    if not any(v for t in transfers.values() for v in t.values()):
        charts.empty_note(bottom, "no bargaining transfers in these hours")
    charts.legend_outside(bottom, "microgrid")
    charts.hour_axis(bottom, hours)
    return fig


def _transfers(report: MarketReport) -> dict[str, dict[int, int]]:
    """Settled bargaining transfers: party -> hour -> minor units (+ received, - paid)."""
    out: dict[str, dict[int, int]] = {}
    for s in report.statements:
        if s.party in report.microgrids:
            out.setdefault(s.party, {})[s.hour] = s.money["bargaining-transfer"]
    return out


def cost_figure(report: MarketReport) -> Figure:
    """Each microgrid's cost over the period without and with trading; negative is earnings."""
    fig, (ax,) = charts.figure()
    ax.set_title("Cost over the period, without and with trading (negative = earned)")
    ax.set_ylabel("currency (+ spent, − earned)")
    microgrids = report.microgrids
    xs = list(range(len(microgrids)))
    for offset, name, field_name in ((-0.2, "without trading", "standalone_cost"),
                                     (0.2, "with trading", "final_cost")):  # fmt: skip
        values = [_currency(sum(getattr(h, field_name).get(mg, 0) for h in report.hours))
                  for mg in microgrids]  # fmt: skip
        bars = ax.bar([x + offset for x in xs], values, 0.4, color=charts.colour(name), label=name)
        ax.bar_label(bars, fmt="{:,.2f}", fontsize="x-small", padding=2)
    charts.zero_line(ax)
    ax.set_xticks(xs, microgrids)
    ax.set_xlabel("microgrid")
    ax.margins(y=0.15)
    if not microgrids:
        charts.empty_note(ax, "no cleared hours on the ledger")
    charts.legend_outside(ax)
    return fig


def certificates_figure(report: MarketReport) -> Figure:
    """Green certificates held and retired per participant (whole numbers)."""
    fig, (ax,) = charts.figure()
    ax.set_title("Green certificates per participant (1 per MWh of verified green generation)")
    ax.set_ylabel("certificates")
    owners = list(report.certificates)
    xs = list(range(len(owners)))
    for offset, name in ((-0.2, "held"), (0.2, "retired")):
        values = [report.certificates[o][name] for o in owners]
        bars = ax.bar([x + offset for x in xs], values, 0.4, color=charts.colour(name), label=name)
        ax.bar_label(bars, fontsize="x-small", padding=2)
    ax.set_xticks(xs, owners)
    ax.set_xlabel("participant")
    charts.integer_axis(ax)
    if not owners:
        charts.empty_note(ax, "no participants on the ledger")
    charts.legend_outside(ax)
    return fig


def line_figure(report: MarketReport) -> Figure:
    """Each line's loading per hour: |DC flow| as a percentage of its thermal limit (M25)."""
    fig, (ax,) = charts.figure()
    ax.set_title("Line loading per hour: |DC flow| / thermal limit (M25)")
    ax.set_ylabel("loading (% of the limit)")
    hours = [h.hour for h in report.hours]
    edges = charts.hour_edges(hours)
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    lines = sorted({line for h in report.hours for line in h.loadings})
    palette = charts.colours(lines)
    nan = float("nan")
    for line in lines:
        pct = [100 * abs(h.loadings[line][0]) / h.loadings[line][1] if line in h.loadings else nan
               for h in report.hours]  # fmt: skip
        ax.plot(centres, pct, marker="o", color=palette[line], label=line)
        over = [(x, v) for x, v in zip(centres, pct, strict=True) if v > 100]
        if over:
            ax.scatter(*zip(*over, strict=True), s=90, facecolors="none", edgecolors="#c62828",
                       linewidths=1.5, zorder=3)  # fmt: skip
    ax.axhline(100, color="#c62828", linestyle="--", linewidth=1, label="thermal limit (100 %)")
    ax.set_ylim(bottom=0)
    ax.margins(y=0.1)
    charts.hour_axis(ax, hours)
    charts.legend_outside(ax, "line (circled: overloaded)")
    return fig


FIGURES = (
    ("energy", energy_figure),
    ("prices", price_figure),
    ("costs", cost_figure),
    ("certificates", certificates_figure),
    ("lines", line_figure),
)


def figures_for(report: MarketReport) -> list[tuple[str, Callable[[MarketReport], Figure]]]:
    """The charts this report draws: line loading only when the line flows are known."""
    known = any(h.loadings for h in report.hours)
    return [(name, draw) for name, draw in FIGURES if name != "lines" or known]


def _hours_table(report: MarketReport) -> str:
    rows = []
    for h in report.hours:
        cleared = sum(w for _, _, w, _ in h.trades)
        delivered = sum(h.delivered.values()) if h.settled else None
        rows.append(
            f"<tr><td>{iso_utc(h.hour * HOUR)}</td><td>{iso_local(h.hour * HOUR)}</td>"
            f"<td>{cleared / 1000:,.1f}</td>"
            f"<td>{'not settled yet' if delivered is None else f'{delivered / 1000:,.1f}'}</td>"
            f"<td>{len(h.trades)}</td><td>{escape(_most_loaded(h))}</td>"
            f"<td>{h.cut_wh / 1000:,.1f}</td><td>{h.remedied_wh / 1000:,.1f}</td></tr>"
        )
    return (
        "<table><tr><th>hour starting (UTC)</th><th>(local time here)</th>"
        "<th>cleared kWh</th><th>delivered kWh</th>"
        "<th>trades</th><th>most loaded line</th><th>congestion cut kWh</th>"
        "<th>remedied kWh</th></tr>\n" + "\n".join(rows) + "\n</table>"
    )


def _most_loaded(h: HourOfTrade) -> str:
    """The hour's most loaded feeder line as "line: flow / limit kW (percent)" (M25)."""
    if not h.loadings:
        return "no network"
    line, (flow, limit) = max(
        h.loadings.items(), key=lambda ld: (abs(ld[1][0]) * 1000 // ld[1][1], ld[0])
    )
    pct = abs(flow) * 100 // limit
    return f"{line}: {abs(flow) / 1000:,.1f} / {limit / 1000:,.1f} kW ({pct} %)"


def render_html(report: MarketReport) -> str:
    """One self-contained HTML page: the charts (inline SVG), an hour table and the glossary."""
    title = f"MeterChain market {escape(report.market)}"
    span = (
        f"{iso_utc(report.hours[0].hour * HOUR)} to "
        f"{iso_utc((report.hours[-1].hour + 1) * HOUR)}"
        if report.hours else "no cleared hours"
    )  # fmt: skip
    figures = []
    for name, build_figure in figures_for(report):
        figures.append(f'<figure class="chart" id="chart-{name}">'
                       f"{charts.svg(build_figure(report))}</figure>")  # fmt: skip
    glossary = "\n".join(f"<dt>{escape(t)}</dt><dd>{escape(d)}</dd>" for t, d in GLOSSARY)
    lines_note = (
        "Line loading: a DC power flow over the grid network (<code>--network</code>, or the "
        "one recorded on the ledger)."
        if any(h.loadings for h in report.hours)
        else "Line loading is not shown: the ledger records no grid network; give the network "
        "site file (<code>--network</code>) to see it."
    )
    style = (
        f"body{{margin:0;font-family:sans-serif;width:{PAGE_W}px}}"
        f"header{{height:{HEADER_H}px;overflow:hidden;padding:0 16px;box-sizing:border-box}}"
        f"figure.chart{{margin:0 0 {CHART_GAP}px 0;width:{PAGE_W}px;height:{CHART_H}px}}"
        "figure.chart svg{width:100%;height:100%}"
        "section{padding:0 16px}table{border-collapse:collapse}"
        "td,th{border:1px solid #bdbdbd;padding:2px 8px;text-align:right}"
        "dt{font-weight:bold;margin-top:6px}code{white-space:nowrap}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{style}</style></head>\n<body>\n<header>"
        f"<h1>{title}</h1>\n<p>{report.blocks} blocks, {len(report.hours)} cleared hour(s), "
        f"{span}, read from a ledger that verified (hashes, Merkle roots, quorum "
        f"certificates, re-executed settlement). {lines_note} Terms and signs: below the "
        "charts.</p></header>\n"
        + "\n".join(figures)
        + f"\n<section><h2>Hours</h2>\n{_hours_table(report)}\n"
        f"<h2>What the figures mean</h2>\n<dl>\n{glossary}\n</dl></section>\n</body></html>\n"
    )


# --- command line -------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meterchain report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("settlement", help="per-microgrid settlement statements")
    p.add_argument("ledger", help="SQLite file or postgresql:// URL")
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--party", help="only this participant's statements")
    p.add_argument("--out", type=Path, help="write here instead of stdout")
    p.add_argument("--signatures", action="store_true", help="also check reading signatures")
    p = sub.add_parser("plot", help="HTML report: charts, hour table and glossary")
    p.add_argument("ledger")
    p.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument("--signatures", action="store_true")
    p.add_argument(
        "--network", type=Path, metavar="SITE.toml",
        help="the market's network site file: adds line loading per hour (M25)",
    )  # fmt: skip
    ns = parser.parse_args(argv)
    target = ns.ledger
    if "://" not in target and not Path(target).exists():
        print(f"meterchain report: {target}: no such ledger file", file=sys.stderr)
        return 2
    try:
        network = load_network(ns.network) if getattr(ns, "network", None) else None
        with open_store(target, create=False) as store:
            report = build(store, signatures=ns.signatures, network=network)
    except ChainError as exc:
        print(f"meterchain report: the ledger does not verify: {exc}", file=sys.stderr)
        return 1
    except (StoreError, MeterChainError) as exc:
        print(f"meterchain report: {exc}", file=sys.stderr)
        return 2
    if ns.command == "settlement":
        if ns.party:
            report.statements = [s for s in report.statements if s.party == ns.party]
        text = statements_csv(report.statements) if ns.format == "csv" else statements_json(report)
    else:
        text = render_html(report)
    if getattr(ns, "out", None):
        ns.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
