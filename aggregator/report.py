"""`meterchain report settlement|plot`: statements and a market report, from a verified ledger.

Both first verify the ledger (hashes, Merkle roots, QCs, rules and re-executed
settlement; `--signatures` adds every reading signature), so nothing is
reported that the ledger does not prove. `settlement` writes one statement
line per hour and party (CSV or JSON): energy bought, sold and short (Wh) and
the money each settlement reason moved (minor units, + received, - paid),
including trade orders fired by the contract client. `plot` writes one HTML
page with inline SVG charts: energy traded between microgrids per hour, trade
and retail prices, each microgrid's cost with and without trading, and green
certificate balances.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from meterchain import codec
from meterchain.errors import MeterChainError
from meterchain.ledger.chain import ChainError, verify_store
from meterchain.ledger.readings import HOUR
from meterchain.ledger.state import LedgerState
from meterchain.ledger.store import LedgerStore, StoreError, open_store
from meterchain.ledger.transactions import Tx
from meterchain.market.model import RESERVE

MONEY_SCALE = 10_000  # minor units per currency unit
SETTLEMENT_REASONS = (
    "energy", "shortfall", "wheeling", "transfer", "retail", "feed-in", "deposit",
    "deposit-refund",
)  # fmt: skip
ORDER_REASONS = ("order-payment", "order-forfeit")
REASONS = SETTLEMENT_REASONS + ORDER_REASONS


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
    standalone_cost: dict[str, int]  # cost alone (minor units)
    final_cost: dict[str, int]  # cost with trading, after bargaining payments


@dataclass
class MarketReport:
    market: str
    statements: list[Statement]
    hours: list[HourOfTrade]
    certificates: dict[str, dict[str, int]]
    blocks: int


def _stored_txs(store: LedgerStore) -> list[Tx]:
    return [Tx.decode(body) for b in store.stored_blocks() for _, _, body in b.txs]


def build(store: LedgerStore, *, signatures: bool = False) -> MarketReport:
    """Verify the ledger, then gather statements and chart series from it."""
    state, report = verify_store(store, signatures=signatures)
    if state is None:
        return MarketReport("", [], [], {}, 0)
    statements: dict[tuple[int, str], Statement] = {}

    def line(hour: int, party: str) -> Statement:
        return statements.setdefault((hour, party), Statement(hour, party))

    hours: dict[int, HourOfTrade] = {}
    orders: dict[str, dict[str, Any]] = {}
    for tx in _stored_txs(store):
        if tx.kind == "clearing":
            hours[tx.body["hour"]] = _hour_of_trade(tx)
        elif tx.kind == "settlement":
            hour = tx.body["hour"]
            settled = codec.decode(tx.body["result"])
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


def _hour_of_trade(tx: Tx) -> HourOfTrade:
    from meterchain.ledger.settle import decode_clearing

    request, result = decode_clearing(tx.body["request"], tx.body["result"])
    executed = result.executed[0]
    t = executed.period - request.first_period
    ids = result.microgrids
    return HourOfTrade(
        tx.body["hour"],
        [(tr.seller, tr.buyer, tr.energy_wh, tr.price_per_kwh) for tr in executed.trades],
        {},
        {mg.id: mg.retail_price_per_kwh[t] for mg in request.microgrids},
        dict(zip(ids, executed.standalone_cost, strict=True)),
        {mg: executed.final_cost(i) for i, mg in enumerate(ids)},
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
        "statements": [s.row() for s in report.statements],
        "totals": totals,
    }
    return json.dumps(doc, indent=2) + "\n"


# --- the HTML report -------------------------------------------------------------------

PALETTE = ("#2e7d32", "#1565c0", "#ef6c00", "#6a1b9a", "#00838f", "#c62828", "#827717")
W, H, PAD = 760, 300, 56


def _frame(title: str, y_label: str, top: float) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="11" role="img">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{PAD}" y="18" font-size="14">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD - 20}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<text x="8" y="{PAD - 24}">{escape(y_label)}</text>',
    ]
    for k in range(5):
        value = top * k / 4
        y = H - PAD - (H - 2 * PAD + 20) * k / 4
        parts.append(f'<text x="{PAD - 4}" y="{y + 4:.1f}" text-anchor="end">{value:,.0f}</text>')
    return parts


def _legend(names: Sequence[str], colours: Sequence[str]) -> list[str]:
    parts = []
    for i, (name, colour) in enumerate(zip(names, colours, strict=True)):
        x = PAD + 10 + (i % 4) * 170
        y = H - 4 - (i // 4) * 13
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="{y}">{escape(name)}</text>')
    return parts


def _bars(
    title: str, y_label: str, labels: Sequence[str], series: dict[str, list[float]],
    *, stacked: bool,
) -> str:  # fmt: skip
    names = list(series)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    n = max(len(labels), 1)
    if stacked:
        top = max((sum(series[s][i] for s in names) for i in range(len(labels))), default=0)
    else:
        top = max((v for s in names for v in series[s]), default=0)
    top = top or 1.0
    parts = _frame(title, y_label, top)
    inner_h = H - 2 * PAD + 20
    slot = (W - 2 * PAD) / n
    for i, label in enumerate(labels):
        base = 0.0
        for j, name in enumerate(names):
            value = series[name][i]
            if stacked:
                x, width = PAD + i * slot + slot * 0.15, slot * 0.7
                y0 = base
                base += value
            else:
                width = slot * 0.7 / max(len(names), 1)
                x, y0 = PAD + i * slot + slot * 0.15 + j * width, 0.0
            height = inner_h * value / top
            y = H - PAD - inner_h * y0 / top - height
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" '
                f'fill="{colours[j]}"><title>{escape(label)} {escape(name)}: {value:,.1f}'
                "</title></rect>"
            )
        parts.append(
            f'<text x="{PAD + (i + 0.5) * slot:.1f}" y="{H - PAD + 14}" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
    parts += _legend(names, colours)
    parts.append("</svg>")
    return "\n".join(parts)


def _lines(title: str, y_label: str, labels: Sequence[str], series: dict[str, list[float]]) -> str:
    names = list(series)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    top = max((v for s in names for v in series[s]), default=0) or 1.0
    bottom = min(0.0, min((v for s in names for v in series[s]), default=0))
    parts = _frame(title, y_label, top)
    inner_h = H - 2 * PAD + 20
    slot = (W - 2 * PAD) / max(len(labels), 1)
    for j, name in enumerate(names):
        points = " ".join(
            f"{PAD + (i + 0.5) * slot:.1f},"
            f"{H - PAD - inner_h * (v - bottom) / (top - bottom or 1):.1f}"
            for i, v in enumerate(series[name])
        )
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colours[j]}" stroke-width="2">'
            f"<title>{escape(name)}</title></polyline>"
        )
    for i, label in enumerate(labels):
        parts.append(
            f'<text x="{PAD + (i + 0.5) * slot:.1f}" y="{H - PAD + 14}" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
    parts += _legend(names, colours)
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(report: MarketReport) -> str:
    labels = [time.strftime("%d %H:00", time.gmtime(h.hour * HOUR)) for h in report.hours]
    pairs = sorted({(s, b) for h in report.hours for s, b, _, _ in h.trades})
    traded = {
        f"{s} → {b}": [h.delivered.get((s, b), sum(w for ss, bb, w, _ in h.trades
                                                     if (ss, bb) == (s, b))) / 1000
                        for h in report.hours]
        for s, b in pairs
    }  # fmt: skip
    prices: dict[str, list[float]] = {
        "trade price (energy-weighted)": [
            sum(w * p for _, _, w, p in h.trades) / sum(w for _, _, w, _ in h.trades)
            / MONEY_SCALE if h.trades and sum(w for _, _, w, _ in h.trades) else 0.0
            for h in report.hours
        ],
        "mean retail price": [
            sum(h.retail.values()) / len(h.retail) / MONEY_SCALE if h.retail else 0.0
            for h in report.hours
        ],
    }  # fmt: skip
    microgrids = sorted({mg for h in report.hours for mg in h.standalone_cost})
    costs = {
        "without trading": [sum(h.standalone_cost.get(mg, 0) for h in report.hours) / MONEY_SCALE
                            for mg in microgrids],
        "with trading": [sum(h.final_cost.get(mg, 0) for h in report.hours) / MONEY_SCALE
                         for mg in microgrids],
    }  # fmt: skip
    owners = list(report.certificates)
    certs = {
        "held": [float(report.certificates[o]["held"]) for o in owners],
        "retired": [float(report.certificates[o]["retired"]) for o in owners],
    }
    charts = [
        _bars("Energy traded between microgrids per hour", "kWh", labels, traded, stacked=True),
        _lines("Prices", "per kWh", labels, prices),
        _bars(
            "Cost over the period, with and without trading",
            "currency",
            microgrids,
            costs,
            stacked=False,
        ),  # fmt: skip
        _bars("Green certificates", "certificates", owners, certs, stacked=False),
    ]
    title = f"MeterChain market {escape(report.market)}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<title>{title}</title></head>\n<body style="font-family:sans-serif">\n'
        f"<h1>{title}</h1>\n<p>{report.blocks} blocks, {len(report.hours)} cleared hour(s), "
        "all figures read from a ledger that verified (hashes, Merkle roots, quorum "
        "certificates, re-executed settlement).</p>\n"
        + "\n".join(f"<figure>{c}</figure>" for c in charts)
        + "\n</body></html>\n"
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
    p = sub.add_parser("plot", help="HTML report with inline SVG charts")
    p.add_argument("ledger")
    p.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    p.add_argument("--signatures", action="store_true")
    ns = parser.parse_args(argv)
    target = ns.ledger
    if "://" not in target and not Path(target).exists():
        print(f"meterchain report: {target}: no such ledger file", file=sys.stderr)
        return 2
    try:
        with open_store(target, create=False) as store:
            report = build(store, signatures=ns.signatures)
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
