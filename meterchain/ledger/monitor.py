"""`meterchain monitor DB`: run the violation-monitoring contract (M19) on a ledger and report.

Reads the committed ledger (SQLite path or postgresql:// URL, never created),
builds each participant's activity over a window of hours and prints the
monitoring report: indicator values per mille, the events behind them, the
score under the released model and the suspects with their strongest
indicators. Any node gets the same report from the same ledger.

What the ledger gives the monitor: every executed clearing trade (with the
weak centre's congestion cut applied: a cut is not the seller's deviation)
and its delivery from the hour's settlement; each microgrid's spare green
energy from the settled meter values against what it sold; multi-signed
orders and what their firing delivered. Settlement and escrow move money on
the ledger itself, so nothing recorded there is ever unpaid; the unpaid
indicator scores payment rows from other books. Related accounts come from
the regulator (``--related A:B``). Recorded suspect reports are re-run and
marked as confirmed or not.

Exit status: 0 report printed (suspects or not), 2 usage error or a ledger
that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from meterchain import codec
from meterchain.errors import MeterChainError
from meterchain.ledger.store import StoreError, open_store
from meterchain.ledger.transactions import Tx
from meterchain.market import monitoring as mon
from meterchain.market.clearing import ClearingResult
from meterchain.market.congestion import Adjustment


def activity_from_txs(
    txs: Iterable[Tx],
    *,
    from_hour: int | None = None,
    to_hour: int | None = None,
    related: Sequence[tuple[str, str]] = (),
) -> mon.Activity:
    """The monitor's input for hours ``[from_hour, to_hour)`` (default: every hour traded):
    each settled clearing hour (`monitoring.settled_hour_rows`, congestion cuts applied) and
    each fired order, exactly what the ledger's state keeps for recorded reports."""
    clearings: dict[int, Tx] = {}
    cuts: dict[int, list[int]] = {}
    orders: dict[str, dict[str, Any]] = {}
    trades: list[mon.TradeRow] = []
    capacity: list[mon.CapacityRow] = []
    for tx in txs:
        body = tx.body
        if tx.kind == "clearing":
            clearings[body["hour"]] = tx
        elif tx.kind == "congestion":
            record = Adjustment.from_cbor(body["record"])
            if record.cuts:  # a price notice cuts nothing
                cuts[body["hour"]] = [c.kept_wh for c in record.cuts]
        elif tx.kind == "settlement" and body["hour"] in clearings:
            clearing = clearings[body["hour"]].body
            rows, spare = clearing_rows(
                body["hour"], clearing["result"], cuts.get(body["hour"]), body
            )
            trades.extend(rows)
            capacity.extend(spare)
        elif tx.kind == "order":
            orders[body["id"]] = dict(body)
        elif tx.kind == "order_change" and body["order"] in orders:
            orders[body["order"]].update({k: body[k] for k in ("energy_wh", "price", "delivery")})
        elif tx.kind == "contract_fire" and body["order"] in orders:
            o = orders[body["order"]]
            trades.append(
                order_row(
                    o["delivery"],
                    o["seller"],
                    o["buyer"],
                    o["energy_wh"],
                    o["price"],
                    body["delivered_wh"],
                )
            )
    hours = [t.hour for t in trades] + [c.hour for c in capacity]
    start = min(hours, default=0) if from_hour is None else from_hour
    end = max(hours, default=start) + 1 if to_hour is None else to_hour
    return mon.Activity(
        start,
        end,
        tuple(t for t in trades if start <= t.hour < end),
        tuple(c for c in capacity if start <= c.hour < end),
        (),
        tuple(related),
    )


def clearing_rows(
    hour: int, result: bytes, kept: list[int] | None, settlement: Mapping[str, Any]
) -> tuple[tuple[mon.TradeRow, ...], tuple[mon.CapacityRow, ...]]:
    """The monitor's rows of a settled clearing hour: the committed clearing result's bytes,
    the Wh kept of each trade after a congestion cut (or None) and the settlement's body."""
    executed = ClearingResult.from_cbor(result).executed[0]
    trades = [(t.seller, t.buyer, t.energy_wh, t.price_per_kwh) for t in executed.trades]
    settled = codec.decode(settlement["result"])
    metered = codec.decode(settlement["metered"])
    return mon.settled_hour_rows(hour, trades, kept, settled["deliveries"], metered)


def order_row(
    hour: int, seller: str, buyer: str, energy_wh: int, price: int, delivered_wh: int
) -> mon.TradeRow:
    """A fired multi-signed order as the monitor sees it (contracted vs delivered Wh)."""
    return mon.TradeRow(hour, seller, buyer, energy_wh, price, min(energy_wh, delivered_wh))


def _related(values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        a, sep, b = value.partition(":")
        if not sep or not a or not b or a == b:
            raise ValueError(f"--related {value!r}: expected two different ids as A:B")
        pairs.append((a, b))
    return pairs


def _recorded(txs: Sequence[Tx]) -> list[tuple[Tx, dict[str, Any]]]:
    out = []
    for tx in txs:
        if tx.kind == "suspect_report":
            try:
                out.append((tx, mon.parse_suspect_report(tx.body["report"])))
            except mon.MonitoringError:
                continue  # the ledger refuses such a report; nothing to re-run
    return out


def _render(report: mon.MonitoringReport, recorded: list[tuple[str, bool]]) -> str:
    lines = [
        f"Violation monitoring (M19), hours {report.from_hour}..{report.to_hour - 1}, model "
        f"{report.model_version} ({report.model_digest.hex()[:16]})",
        "  indicators per mille of the participant's activity (events behind each)",
        "  "
        + f"{'participant':<16}"
        + "".join(f"{n:>15}" for n in mon.INDICATORS)
        + f"{'score':>7}  verdict",
    ]
    for s in report.scores:
        cells = "".join(f"{f'{v} ({n})':>15}" for v, n in zip(s.values, s.events, strict=True))
        verdict = f"SUSPECT: {', '.join(s.reasons)}" if s.suspect else "-"
        lines.append(f"  {s.participant:<16}{cells}{s.score:>7}  {verdict}")
    suspects = report.suspects
    lines.append(
        f"{len(suspects)} suspect(s)" + (": " + ", ".join(s.participant for s in suspects))
        if suspects
        else "no suspects"
    )
    for label, confirmed in recorded:
        state = "confirmed by re-running it" if confirmed else "NOT what the contract gives"
        lines.append(f"recorded suspect report {label}: {state}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meterchain monitor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("db", help="ledger: SQLite file or postgresql:// URL")
    parser.add_argument("--from-hour", type=int, help="first hour index of the window")
    parser.add_argument("--to-hour", type=int, help="hour index after the window")
    parser.add_argument(
        "--related",
        action="append",
        default=[],
        metavar="A:B",
        help="two accounts the regulator knows to be related (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    ns = parser.parse_args(argv)
    try:
        related = _related(ns.related)
        if not ns.db.startswith(("postgresql://", "postgres://")) and not Path(ns.db).exists():
            raise StoreError(f"{ns.db}: no such ledger file")
        with open_store(ns.db, create=False) as store:
            txs = [Tx.decode(body) for b in store.stored_blocks() for _, _, body in b.txs]
        activity = activity_from_txs(
            txs, from_hour=ns.from_hour, to_hour=ns.to_hour, related=related
        )
        report = mon.monitor(activity)
        checks = []
        for tx, recorded in _recorded(txs):
            window = activity_from_txs(
                txs,
                from_hour=recorded["from_hour"],
                to_hour=recorded["to_hour"],
                related=[tuple(p) for p in recorded["related"]],
            )
            try:
                mon.check_report(window, recorded)
                checks.append((tx.hash.hex()[:16], True))
            except mon.MonitoringError:
                checks.append((tx.hash.hex()[:16], False))
    except (MeterChainError, ValueError) as exc:
        print(f"meterchain monitor: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        out = report.to_json()
        out["recorded_reports"] = [{"tx": t, "confirmed": ok} for t, ok in checks]
        out["suspect_report"] = {
            k: (v.hex() if isinstance(v, bytes) else v) for k, v in report.suspect_dict().items()
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_render(report, checks))
    return 0
