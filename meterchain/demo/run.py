"""The reference four-microgrid day, end to end: the demo is a lab site of the real services.

`run_demo(options)` writes a site with `meterchain.site.init` (four
microgrids of the reference day, three consensus members and one submitter,
twelve emulated SDM630s on Modbus RTU read by twelve emulated boards running
the firmware, a private Mosquitto with TLS and per-client ACLs on a free
loopback port, or `--broker URL`), starts it with `meterchain site up` (every
part a process of its own: broker, aggregator, four edge agents, the lab) on
a market clock that plays an hour in 2.5 s, waits until the aggregator has
settled the last hour asked for, and stops the site with `site down` (which
waits until every reading the broker acknowledged is on the ledger).

Every figure in `DemoReport` is read back from the aggregator's ledger
(clearings certified by the members, settlements re-executed from the
ledger's own readings) or computed by the market modules; the rolling vs
day-ahead penalty comparison is
`meterchain.market.rolling.compare_rolling_vs_day_ahead` on the reference case.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meterchain import codec
from meterchain.errors import MeterChainError
from meterchain.ledger.chain import verify_store
from meterchain.ledger.settle import decode_clearing
from meterchain.ledger.store import open_store
from meterchain.ledger.transactions import Tx
from meterchain.market import congestion
from meterchain.market.clearing import ClearingResult
from meterchain.market.explain import explain_hour, hour_gain, hour_shared_saving
from meterchain.market.network import reference_network
from meterchain.market.reference import compare_rolling_vs_day_ahead, reference_case
from meterchain.quorum import QuorumCertificate
from meterchain.site import layout, supervisor
from meterchain.site.init import DAY_START, LAB_SPEED, InitOptions, init_site

MARKET = "demo"
HOUR = 3600
CONSENSUS_MEMBERS = 3  # n = K + 1 pre-elected consensus microgrids; the rest only submit
PENALTY_SCENARIOS = 8  # seeded forecast-error days pooled in the rolling/day-ahead comparison
SETTLE_S = 2.0  # real seconds between the genesis block and the start of the market day


NETWORK = reference_network()


class DemoError(MeterChainError):
    """The demo cannot start or a stage did not complete; the message says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    hours: int = 24
    ledger: Path | None = None
    broker_url: str | None = None
    workdir: Path | None = None  # the site folder goes here (kept); default: a temporary one
    speed: float = LAB_SPEED


@dataclass(frozen=True)
class TradeLine:
    seller: str
    buyer: str
    energy_wh: int
    amount: int  # money minor units the buyer pays for the cleared energy
    price_per_kwh: int


@dataclass(frozen=True)
class HourLine:
    hour: int  # hour of the day
    certified_by: tuple[str, ...]  # the members whose finality signatures commit the clearing
    coalition: tuple[str, ...]
    trades: tuple[TradeLine, ...]
    saving: int  # total stage-2 saving of the hour (minor units)
    explanation: tuple[str, ...]  # prices and bargaining transfers (market.explain)
    penalty: int  # M5 shortfall payments in the settlement on the ledger (minor units)
    short_wh: int
    # The weak centre (M25): each feeder line's flow and limit (W) under the cleared schedule,
    # the energy cut back to restore the limits (Wh), and the published reason.
    loadings: tuple[tuple[str, int, int], ...] = ()
    cut_wh: int = 0
    congestion: str = ""
    # Failed execution (M21): (remedy, seller, buyer, provider, Wh) recorded on the ledger.
    remedies: tuple[tuple[str, str, str, str, int], ...] = ()


@dataclass(frozen=True)
class MicrogridLine:
    id: str
    role: str
    cost_without_trading: int  # sum over the hours of C_non_i(h) (minor units)
    cost_with_trading: int  # sum over the hours of C_i(h) + payment_i(h)
    hours_in_coalition: int
    settled_net: int  # money the microgrid received (+) or paid (-) in the settlements

    @property
    def improvement(self) -> int:
        return self.cost_without_trading - self.cost_with_trading


@dataclass
class DemoReport:
    hours: list[HourLine] = field(default_factory=list)
    microgrids: list[MicrogridLine] = field(default_factory=list)
    comparison: dict[str, Any] = field(default_factory=dict)
    readings_published: int = 0
    readings_on_ledger: int = 0
    ledger: str = ""
    ledger_valid: bool = False
    ledger_blocks: int = 0
    broker: str = ""
    site: str = ""
    restarts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def penalty_rolling(self) -> int:
        return int(self.comparison.get("rolling_penalty", 0))

    @property
    def penalty_day_ahead(self) -> int:
        return int(self.comparison.get("day_ahead_penalty", 0))

    def to_json(self) -> dict[str, Any]:
        return {
            "microgrids": [
                {
                    "id": m.id,
                    "role": m.role,
                    "cost_without_trading": m.cost_without_trading,
                    "cost_with_trading": m.cost_with_trading,
                    "improvement": m.improvement,
                    "hours_in_coalition": m.hours_in_coalition,
                    "settled_net": m.settled_net,
                }
                for m in self.microgrids
            ],
            "penalty_rolling": self.penalty_rolling,
            "penalty_day_ahead": self.penalty_day_ahead,
            "penalty_reduction_pct": self.comparison.get("reduction_pct"),
            "penalty_scenarios": self.comparison.get("scenarios"),
            "penalty_on_ledger": sum(h.penalty for h in self.hours),
            "readings_published": self.readings_published,
            "readings_on_ledger": self.readings_on_ledger,
            "ledger": self.ledger,
            "ledger_valid": self.ledger_valid,
            "ledger_blocks": self.ledger_blocks,
            "hours": [
                {
                    "hour": h.hour,
                    "certified_by": list(h.certified_by),
                    "coalition": list(h.coalition),
                    "saving": h.saving,
                    "explanation": list(h.explanation),
                    "penalty": h.penalty,
                    "short_wh": h.short_wh,
                    "line_loading": [
                        {"line": line, "flow_w": flow, "limit_w": limit}
                        for line, flow, limit in h.loadings
                    ],
                    "congestion_cut_wh": h.cut_wh,
                    "congestion": h.congestion,
                    "remedies": [
                        {"remedy": k, "seller": s, "buyer": b, "provider": p, "energy_wh": wh}
                        for k, s, b, p, wh in h.remedies
                    ],
                    "trades": [
                        {
                            "seller": t.seller,
                            "buyer": t.buyer,
                            "energy_wh": t.energy_wh,
                            "amount": t.amount,
                            "price_per_kwh": t.price_per_kwh,
                        }
                        for t in h.trades
                    ],
                }
                for h in self.hours
            ],
            "money_unit": "1/10000 currency unit",
            "broker": self.broker,
            "site": self.site,
            "restarts": self.restarts,
            "seconds": round(self.seconds, 1),
        }


def check_broker_url(url: str) -> str:
    """mqtt(s)://[user[:password]@]host[:port], checked; the site's services all use it."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise DemoError(f"--broker {url!r}: expected mqtt://[user:password@]host[:port]")
    try:
        _ = parts.port
    except ValueError as exc:
        raise DemoError(f"--broker {url!r}: {exc}") from exc
    return url


def run_demo(
    options: DemoOptions, progress: Callable[[int, int, str], None] | None = None
) -> DemoReport:
    """Play `options.hours` hours of the reference day on a lab site of the real services."""
    if not 1 <= options.hours <= 24:
        raise DemoError(f"--hours must be 1..24, got {options.hours}")
    if options.broker_url:
        check_broker_url(options.broker_url)
    if options.ledger is not None and options.ledger.exists():
        raise DemoError(f"{options.ledger}: a ledger is already there; the demo writes a new one")
    started = time.monotonic()
    note = progress or (lambda done, total, what: None)
    own = options.workdir is None
    root = Path(tempfile.mkdtemp(prefix="meterchain-demo-")) if own else options.workdir
    assert root is not None
    try:
        note(0, options.hours, "writing the site (keys, certificates, configs, boards)")
        site = init_site(
            root / "site",
            InitOptions(
                market=MARKET, members=CONSENSUS_MEMBERS, emulated=True, speed=options.speed,
                broker=options.broker_url or "",
            ),
        )  # fmt: skip
        report = DemoReport(site=str(site.root))
        report.broker = options.broker_url or f"site Mosquitto {site.site.broker_url}"
        note(0, options.hours, "starting broker, aggregator, agents and the lab")
        try:
            supervisor.up(site.root, settle_s=SETTLE_S)
            _wait_settled(site, options.hours, note)
        finally:
            final = supervisor.down(site.root)
        report.readings_published = int(final.get("published") or 0)
        report.restarts = {
            name: proc["restarts"] for name, proc in final.get("processes", {}).items()
        }
        if final.get("note"):
            raise DemoError(f"the site stopped with: {final['note']}")
        ledger = options.ledger if options.ledger is not None else root / "ledger.db"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        _copy_ledger(site.ledger, ledger)
        report.ledger = str(ledger)
        note(options.hours, options.hours, "comparing rolling and day-ahead clearing")
        _summarise(report, ledger, site, options.hours)
    except BaseException:
        if own:
            print(f"meterchain demo: the site is kept for a look: {root / 'site'}",
                  file=sys.stderr)  # fmt: skip
        raise
    if own:
        # The site (keys, boards' flash, logs) is scaffolding; the ledger is the result.
        shutil.rmtree(root / "site", ignore_errors=True)
        if options.ledger is not None:
            shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def _wait_settled(site: layout.Site, hours: int, note: Callable[[int, int, str], None]) -> None:
    """Until the aggregator settled hours 0 .. hours-1 of the day (a stall is an error)."""
    h0 = DAY_START // HOUR
    deadline = time.monotonic() + 60 + 6 * HOUR / site.clock.speed * hours
    done = 0
    while done < hours:
        if time.monotonic() > deadline:
            raise DemoError(f"only {done} of {hours} hours were settled in time; see the logs "
                            f"in {site.run_dir}")  # fmt: skip
        state = supervisor.status(site)
        if state.get("state") not in ("up", "starting"):
            raise DemoError(f"the site is {state.get('state')}: {state.get('note')}")
        settled = supervisor.settled_hours(site.ledger)
        now = sum(1 for h in range(h0, h0 + hours) if h in settled)
        if now != done:
            done = now
            note(done, hours, f"hour {done - 1:02d}: settled")
        time.sleep(0.2)


def _copy_ledger(source: Path, target: Path) -> None:
    """A consistent copy of the site's SQLite ledger (WAL included)."""
    if target.exists():
        raise DemoError(f"{target}: a ledger is already there; the demo writes a new one")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def _summarise(report: DemoReport, ledger: Path, site: layout.Site, hours: int) -> None:
    h0 = DAY_START // HOUR
    wanted = range(h0, h0 + hours)
    ids = list(site.microgrids)
    with open_store(str(ledger), create=False) as store:
        report.microgrids = _microgrid_totals(store, ids, list(site.site.members), wanted)
        report.hours = _hour_lines(store, h0, wanted)
        report.readings_on_ledger = store.reading_count()
        head = store.head()
        report.ledger_blocks = 0 if head is None else head[0] + 1
        try:
            verify_store(store, regulator=_regulator(store))
            report.ledger_valid = True
        except MeterChainError:
            report.ledger_valid = False
    report.comparison = compare_rolling_vs_day_ahead(reference_case(), scenarios=PENALTY_SCENARIOS)


def _regulator(store: Any) -> Any:
    """The regulator key the genesis block names (the ledger vouches for the rest)."""
    from meterchain.keys import PublicKey

    first = next(store.stored_blocks())
    for kind, _, raw in first.txs:
        if kind == "genesis":
            return PublicKey.from_point(Tx.decode(raw).body["regulator"])
    raise DemoError("the ledger has no genesis transaction")


def _hour_lines(store: Any, h0: int, wanted: range) -> list[HourLine]:
    """Each hour's committed clearing and its settlement, read back from the ledger."""
    results: dict[int, tuple[tuple[str, ...], ClearingResult]] = {}
    explanations: dict[int, tuple[str, ...]] = {}
    settlements: dict[int, dict[str, Any]] = {}
    records: dict[int, congestion.Adjustment] = {}
    remedies: dict[int, list[Any]] = {}
    for stored in store.stored_blocks():
        for kind, _, raw in stored.txs:
            if kind == "congestion":
                body = Tx.decode(raw).body
                records[body["hour"] - h0] = congestion.Adjustment.from_cbor(body["record"])
                continue
            if kind == "remedy":
                body = Tx.decode(raw).body
                remedies[body["hour"] - h0] = codec.decode(body["result"])["remedies"]
                continue
            if kind not in ("clearing", "settlement"):
                continue
            body = Tx.decode(raw).body
            if body["hour"] not in wanted:
                continue
            if kind == "clearing":
                signers = QuorumCertificate.from_cbor(body["qc"]).signers
                results[body["hour"] - h0] = (signers, ClearingResult.from_cbor(body["result"]))
                request, result = decode_clearing(body["request"], body["result"])
                explanations[body["hour"] - h0] = tuple(explain_hour(request, result))
            else:
                settlements[body["hour"] - h0] = codec.decode(body["result"])
    lines = []
    for h in sorted(settlements):
        signers, result = results[h]
        executed = result.executed[0]
        settlement = settlements[h]
        record = records.get(h)
        flows = record.before if record else congestion.check(NETWORK, result).loadings
        lines.append(
            HourLine(
                hour=h,
                certified_by=tuple(signers),
                coalition=executed.coalition,
                trades=tuple(
                    TradeLine(t.seller, t.buyer, t.energy_wh, t.amount, t.price_per_kwh)
                    for t in executed.trades
                ),
                saving=hour_shared_saving(executed),
                explanation=explanations[h],
                penalty=sum(e[2] for e in settlement["entries"] if e[3] == "shortfall"),
                short_wh=sum(d[2] - d[3] for d in settlement["deliveries"]),
                loadings=tuple((ld.line, ld.flow_w, ld.limit_w) for ld in flows),
                cut_wh=record.total_cut_wh if record else 0,
                congestion=record.reason if record else "",
                remedies=tuple(tuple(r[:5]) for r in remedies.get(h, [])),
            )
        )
    return lines


def _microgrid_totals(
    store: Any, ids: list[str], members: list[str], wanted: range
) -> list[MicrogridLine]:
    """Per-microgrid costs from the committed clearings and money from the settlements."""
    without = dict.fromkeys(ids, 0)
    with_trading = dict.fromkeys(ids, 0)
    in_coalition = dict.fromkeys(ids, 0)
    net = dict.fromkeys(ids, 0)
    for stored in store.stored_blocks():
        for kind, _, raw in stored.txs:
            if kind not in ("clearing", "settlement"):
                continue
            body = Tx.decode(raw).body
            if body["hour"] not in wanted:
                continue
            if kind == "clearing":
                result = ClearingResult.from_cbor(body["result"])
                hour = result.executed[0]
                for i, mg in enumerate(result.microgrids):
                    # the cost the hour would have had alone, stored energy valued (M3)
                    without[mg] += hour.final_cost(i) + hour_gain(result, i)
                    with_trading[mg] += hour.final_cost(i)
                    in_coalition[mg] += mg in hour.coalition
            else:
                for payer, payee, amount, _reason in codec.decode(body["result"])["entries"]:
                    if payer in net:
                        net[payer] -= amount
                    if payee in net:
                        net[payee] += amount
    return [
        MicrogridLine(
            mg, "consensus" if mg in members else "submit-only", without[mg], with_trading[mg],
            in_coalition[mg], net[mg],
        )  # fmt: skip
        for mg in ids
    ]
