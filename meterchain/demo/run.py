"""The reference four-microgrid day, end to end: meters, boards, broker, agents, consensus, ledger.

`run_demo(options)` starts everything in this process (or against an
external broker) and plays the day on a virtual market clock:

* before each hour every microgrid bids its model for the rest of the day
  (the reference case's seeded lead-time forecasts, `meterchain.market`);
  three consensus agents run an SDBFT round over MQTT with the clearing
  contract, the fourth microgrid only submits; the committed result and its
  quorum certificate go on the ledger in a block the agents re-execute and sign;
* during the hour the plant follows the executed dispatch: the emulated SDM630s
  show the reference day's actual renewable output and load, and the point of
  common coupling the balance (the grid absorbs every forecast error); twelve
  emulated boards running the firmware sample them over Modbus RTU, sign and
  publish; the aggregator verifies every reading;
* after the hour the readings and then the SC2 settlement (re-executed from
  the ledger's own readings) are committed.

Every figure in `DemoReport` is read back from the ledger or computed by the
market modules; the rolling vs day-ahead penalty comparison is
`meterchain.market.rolling.compare_rolling_vs_day_ahead` on the reference case.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from aggregator.former import BlockFormer
from edge_agent.consensus.messages import RoundId
from meterchain import codec
from meterchain.demo.agents import (
    BrokerAddress,
    ConsensusAgent,
    SubmitOnlyAgent,
    keyring_for,
)
from meterchain.demo.collector import ReadingCollector
from meterchain.demo.site import HOUR, Board, MeterLink, MeterSpec, VirtualClock, write_board_config
from meterchain.errors import MeterChainError
from meterchain.keys import PublicKey
from meterchain.ledger.chain import verify_store
from meterchain.ledger.review import BlockReviewer, Proposal, encode_committed, parse_reply
from meterchain.ledger.sandbox import Sandbox
from meterchain.ledger.settle import decode_clearing
from meterchain.ledger.store import open_store
from meterchain.ledger.transactions import Tx, signed
from meterchain.market.clearing import ClearingResult
from meterchain.market.explain import explain_hour, hour_gain, hour_shared_saving
from meterchain.market.reference import compare_rolling_vs_day_ahead, reference_case
from meterchain.market.rolling import DayCase
from meterchain.quorum import Member, Membership
from meterchain.registry import Registry, make_meter

MARKET = "demo"
DAY_START = 1_718_064_000  # 2024-06-11T00:00:00Z: a UTC midnight, so hour index = hour of day
CONSENSUS_MEMBERS = 3  # n = K + 1 pre-elected consensus microgrids; the rest only submit
PENALTY_SCENARIOS = 8  # seeded forecast-error days pooled in the rolling/day-ahead comparison
SETTLE_GRACE_S = 20  # settle an hour this long after it ended (the readings are in by then)


class DemoError(MeterChainError):
    """The demo cannot start or a stage did not complete; the message says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    hours: int = 24
    ledger: Path | None = None
    broker_url: str | None = None
    samples_per_hour: int = 4
    delta_ms: int = 150
    workdir: Path | None = None
    keep_workdir: bool = False


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
    primary: str
    view: int
    coalition: tuple[str, ...]
    trades: tuple[TradeLine, ...]
    saving: int  # total stage-2 saving of the hour (minor units)
    explanation: tuple[str, ...]  # prices and bargaining transfers (market.explain)
    penalty: int  # M5 shortfall payments in the settlement on the ledger (minor units)
    short_wh: int


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
    readings_refused: list[str] = field(default_factory=list)
    ledger: str = ""
    ledger_valid: bool = False
    ledger_blocks: int = 0
    block_refusals: list[str] = field(default_factory=list)
    broker: str = ""
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
            "readings_refused": len(self.readings_refused),
            "ledger": self.ledger,
            "ledger_valid": self.ledger_valid,
            "ledger_blocks": self.ledger_blocks,
            "hours": [
                {
                    "hour": h.hour,
                    "primary": h.primary,
                    "view": h.view,
                    "coalition": list(h.coalition),
                    "saving": h.saving,
                    "explanation": list(h.explanation),
                    "penalty": h.penalty,
                    "short_wh": h.short_wh,
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
            "seconds": round(self.seconds, 1),
        }


def parse_broker_url(url: str) -> BrokerAddress:
    """mqtt://[user[:password]@]host[:port] (mqtts:// is not supported by the demo's boards)."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise DemoError(f"--broker {url!r}: expected mqtt://[user:password@]host[:port]")
    try:
        port = parts.port or 1883
    except ValueError as exc:
        raise DemoError(f"--broker {url!r}: {exc}") from exc
    return BrokerAddress(
        parts.hostname, port, unquote(parts.username or ""), unquote(parts.password or "")
    )


def _meter_specs(case: DayCase) -> list[MeterSpec]:
    specs = []
    for mg in case.microgrids:
        short = mg.id.split("-", 1)[0]
        green = "wind" if "wind" in mg.id or "hospital" in mg.id else "pv"
        specs.append(MeterSpec(f"{short}-{green}", mg.id, green))
        specs.append(MeterSpec(f"{short}-load", mg.id, "load"))
        specs.append(MeterSpec(f"{short}-pcc", mg.id, "bidir"))
    return specs


class _Stack:
    """Everything the demo started, so one `close()` stops it in reverse order."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], None]] = []

    def push(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # noqa: BLE001 - shutting down: finish stopping the rest
                pass


def run_demo(
    options: DemoOptions, progress: Callable[[int, int, str], None] | None = None
) -> DemoReport:
    """Play `options.hours` hours of the reference day through the whole pipeline."""
    if not 1 <= options.hours <= 24:
        raise DemoError(f"--hours must be 1..24, got {options.hours}")
    if options.samples_per_hour < 1:
        raise DemoError("samples per hour must be at least 1")
    started = time.monotonic()
    own_workdir = options.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="meterchain-demo-")) if own_workdir else options.workdir
    assert workdir is not None
    ledger_path = options.ledger if options.ledger is not None else workdir / "ledger.db"
    if ledger_path.exists():
        raise DemoError(f"{ledger_path}: a ledger is already there; the demo writes a new one")
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    stack = _Stack()
    report = DemoReport(ledger=str(ledger_path))
    note = progress or (lambda done, total, what: None)
    try:
        _run(options, workdir, ledger_path, stack, report, note)
    finally:
        stack.close()
        if own_workdir and not options.keep_workdir:
            # Boards' flash, agents' state: scaffolding. The ledger is the result and stays.
            shutil.rmtree(workdir / "state", ignore_errors=True)
            if options.ledger is not None:
                shutil.rmtree(workdir, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def _run(
    options: DemoOptions,
    workdir: Path,
    ledger_path: Path,
    stack: _Stack,
    report: DemoReport,
    note: Callable[[int, int, str], None],
) -> None:
    case = reference_case()
    ids = [mg.id for mg in case.microgrids]
    members, submitters = ids[:CONSENSUS_MEMBERS], ids[CONSENSUS_MEMBERS:]
    h0 = DAY_START // HOUR
    clock = VirtualClock(DAY_START - HOUR)

    # --- broker -----------------------------------------------------------------------
    if options.broker_url:
        broker = parse_broker_url(options.broker_url)
        report.broker = options.broker_url
    else:
        from hil.embedded_broker import EmbeddedBroker

        embedded = EmbeddedBroker().start()
        stack.push(embedded.stop)
        broker = BrokerAddress(embedded.host, embedded.port)
        report.broker = f"embedded {embedded.url}"

    # --- identities: regulator, consensus members, participants ------------------------
    sb = Sandbox(market=MARKET, members=CONSENSUS_MEMBERS)
    sb.node_ids = list(members)
    sb.membership = Membership(
        MARKET, 1, tuple(Member(n, sb.key(n).public_key()) for n in members)
    ).signed_by(sb.regulator)
    regulator = sb.regulator.public_key()

    # --- meters and boards -------------------------------------------------------------
    note(0, options.hours, "starting meters and boards")
    specs = _meter_specs(case)
    meters: dict[str, MeterLink] = {}
    boards: dict[str, Board] = {}
    for k, spec in enumerate(specs):
        link = MeterLink(spec, clock, seed=k + 1)
        stack.push(link.close)
        meters[spec.meter_id] = link
        folder = workdir / "state" / "boards" / spec.meter_id
        write_board_config(
            folder, spec, MARKET, broker.host, broker.port, link.port,
            username=broker.username, password=broker.password,
        )  # fmt: skip
        board = Board(folder, clock)
        stack.push(board.close)
        boards[spec.meter_id] = board
    registry = Registry(
        make_meter(s.meter_id, PublicKey.from_point(boards[s.meter_id].public_point), s.owner,
                   s.source)
        for s in specs
    )  # fmt: skip

    # --- aggregator and agents ---------------------------------------------------------
    store = open_store(str(ledger_path))
    stack.push(store.close)
    collector = ReadingCollector(
        MARKET, registry, workdir / "state" / "aggregator-guard.db", broker, clock.now
    )
    stack.push(collector.close)
    participants = {mg: sb.key(mg).public_key() for mg in ids}
    agents: dict[str, ConsensusAgent] = {}
    reviewers = []
    for mg in members:
        agent = ConsensusAgent(
            mg, sb.key(mg), keyring_for(sb.membership, participants), case.market, broker,
            workdir / "state" / "agents" / mg, delta_ms=options.delta_ms,
        )  # fmt: skip
        stack.push(agent.close)
        agents[mg] = agent
        agent_store = open_store(str(workdir / "state" / "agents" / mg / "ledger.db"))
        stack.push(agent_store.close)
        reviewers.append(BlockReviewer(agent_store, mg, sb.key(mg), regulator=regulator))
    submit_only = {mg: SubmitOnlyAgent(mg, sb.key(mg), MARKET, broker) for mg in submitters}
    for agent_so in submit_only.values():
        stack.push(agent_so.close)
    former = BlockFormer(store, None, proposer="aggregator", settle_grace_s=SETTLE_GRACE_S)

    def certify(proposal: Proposal, now: int) -> None:
        """Consensus agents re-execute and sign; more than n/2 votes seal the block."""
        votes, refusals = [], []
        for reviewer in reviewers:
            reply = parse_reply(reviewer.review(proposal.encode(), now))
            if reply.kind == "block-vote" and reply.header_hash == proposal.block.hash:
                votes.append((reply.node_id, reply.signature))
            else:
                refusals.append(f"{reply.node_id}: {reply.reason}")
        report.block_refusals.extend(refusals)
        if len(votes) < sb.membership.quorum:
            raise DemoError(f"block {proposal.block.height} refused: {'; '.join(refusals)}")
        block = former.commit(proposal, votes)
        for reviewer in reviewers:
            reviewer.committed(encode_committed(block))

    def form_block(now: int) -> None:
        formation = former.propose(now)
        if formation.dropped:
            raise DemoError(f"the block former dropped {formation.dropped[0][0].kind}: "
                            f"{formation.dropped[0][1]}")  # fmt: skip
        if formation.proposal is not None:
            certify(formation.proposal, now)

    # --- genesis: market, membership, participants, meters -----------------------------
    t = DAY_START - HOUR + 60
    clock.set(t)
    genesis_txs: list[Tx] = [sb.participant(mg, "microgrid", t) for mg in ids]
    for s in specs:
        terms = {"id": s.meter_id, "owner": s.owner, "key": boards[s.meter_id].public_point,
                 "source": s.source, "time": t}  # fmt: skip
        genesis_txs.append(signed(MARKET, "meter", terms, sb.regulator))
    certify(former.propose_genesis(sb.genesis_tx(t), genesis_txs, t), t)

    # --- a first reading of every meter before the day: the registers the day starts from
    published = 0

    def sample_all(at: int) -> None:
        nonlocal published
        clock.set(at)
        for board in boards.values():
            board.sample()
        for board in boards.values():
            if not board.publish():
                raise DemoError(f"board {board.meter_id}: the broker did not acknowledge "
                                f"{board.pending} reading(s): {board.app.uplink.last_error}")
        published = sum(b.acked for b in boards.values())
        if not collector.wait_for(published, 30):
            raise DemoError(f"the aggregator received {collector.received} of {published} "
                            "published readings")  # fmt: skip

    sample_all(DAY_START - 600)
    store.ingest_readings(collector.take(h0 - 1))
    form_block(DAY_START - 590)

    soc: dict[str, int] | None = None
    cleared: dict[int, tuple[RoundId, Any, ClearingResult]] = {}

    def clear_hour(h: int) -> None:
        """The SDBFT clearing round for hour h, its block, and the plant's dispatch for h."""
        nonlocal soc
        hour_start = DAY_START + h * HOUR
        clock.set(hour_start - 300)
        sc1 = case.request(h, soc)
        trade = {r.microgrid.id: r for r in sc1.requests}
        rid = RoundId(h, "clear")
        for mg, agent_so in submit_only.items():
            agent_so.submit(rid, trade[mg])
        for agent in agents.values():
            if not agent.wait_requests(rid, set(submitters), 30):
                raise DemoError(f"hour {h}: {agent.node_id} did not receive the submitted "
                                "requests")  # fmt: skip
        for mg, agent in agents.items():
            agent.open(rid, trade[mg])
        commits = {}
        for mg, agent in agents.items():
            got = agent.wait_commit(rid, 60)
            if got is None:
                raise DemoError(f"hour {h}: consensus round did not commit at {mg}: "
                                f"{agent.node.last_error or 'timeout'}")  # fmt: skip
            commits[mg] = got
        if len({c.value.digest for c in commits.values()}) != 1:
            raise DemoError(f"hour {h}: agents committed different values")
        # A node that decided by its own 2-delta rule holds the vote certificate of its view;
        # one that caught up through a finality certificate reports view -1.
        decided = [c for c in commits.values() if c.view >= 0 and c.certificate is not None]
        if not decided:
            raise DemoError(f"hour {h}: no agent holds the vote certificate of the round")
        committed = decided[0]
        value = committed.value
        if value.result.get("result") is None:
            raise DemoError(f"hour {h}: the clearing rejected every request: "
                            f"{value.result.get('rejected')}")  # fmt: skip
        contract = agents[members[0]].contract.contract(h)
        request, _ = contract.clearing_request(value.requests)
        result = ClearingResult.from_dict(value.result["result"])
        clearing_tx = Tx.make(
            "clearing",
            {
                "round": rid.seq, "round_kind": rid.kind, "view": committed.view,
                "hour": h0 + h, "requests": [r.raw for r in value.requests],
                "value": codec.encode(value.result), "request": request.to_cbor(),
                "result": result.to_cbor(), "qc": committed.certificate.to_cbor(),
            },
        )  # fmt: skip
        store.submit_tx(clearing_tx, hour_start - 240)
        form_block(hour_start - 240)
        # The plant follows the executed dispatch; the grid takes every deviation.
        executed = result.executed[0]
        by_id = {mg.id: mg for mg in case.microgrids}
        for i, mg_id in enumerate(result.microgrids):
            mg, d = by_id[mg_id], executed.dispatch[i]
            for s in specs:
                if s.owner != mg_id:
                    continue
                if s.source == "load":
                    power = mg.load_w[h]
                elif s.source == "bidir":
                    power = mg.load_w[h] + d.charge_w - mg.renewable_w[h] - d.gas_w - d.discharge_w
                else:
                    power = -mg.renewable_w[h]
                meters[s.meter_id].profile.set(h0 + h, power)
        soc = {mg_id: d.soc_wh for mg_id, d in zip(result.microgrids, executed.dispatch,
                                                    strict=True)}  # fmt: skip
        cleared[h] = (rid, committed, result)

    note(0, options.hours, "hour 00: clearing")
    clear_hour(0)
    step = HOUR // options.samples_per_hour
    for h in range(options.hours):
        hour_start = DAY_START + h * HOUR
        note(h, options.hours, f"hour {h:02d}: metering")
        for k in range(1, options.samples_per_hour + 1):
            at = hour_start + k * step - 1
            if h + 1 < options.hours and h + 1 not in cleared and at > hour_start + HOUR - 300:
                note(h, options.hours, f"hour {h + 1:02d}: clearing")
                clear_hour(h + 1)  # bids for the next hour go in before this one ends
            sample_all(at)
        note(h, options.hours, f"hour {h:02d}: settling")
        # The readings of the hour, then (same block) its settlement re-executed from them.
        store.ingest_readings(collector.take(h0 + h))
        form_block(hour_start + HOUR + SETTLE_GRACE_S)
        if h0 + h not in (former.state.settlements if former.state else {}):
            raise DemoError(f"hour {h} was not settled")
        note(h + 1, options.hours, f"hour {h:02d}: done")

    report.readings_published = published
    report.readings_refused = list(collector.rejected)
    report.microgrids = _microgrid_totals(store, ids, members)
    report.hours = _hour_lines(store, h0, agents[members[0]].node.primary, cleared)
    report.readings_on_ledger = store.reading_count()
    head = store.head()
    report.ledger_blocks = 0 if head is None else head[0] + 1
    note(options.hours, options.hours, "comparing rolling and day-ahead clearing")
    report.comparison = compare_rolling_vs_day_ahead(case, scenarios=PENALTY_SCENARIOS)
    try:
        verify_store(store, regulator=regulator)
        report.ledger_valid = True
    except MeterChainError:
        report.ledger_valid = False


def _hour_lines(
    store: Any,
    h0: int,
    primary: Callable[[RoundId, int], str],
    cleared: dict[int, tuple[RoundId, Any, Any]],
) -> list[HourLine]:
    """Each hour's committed clearing and its settlement, read back from the ledger."""
    results: dict[int, tuple[int, ClearingResult]] = {}
    explanations: dict[int, tuple[str, ...]] = {}
    settlements: dict[int, dict[str, Any]] = {}
    for stored in store.stored_blocks():
        for kind, _, raw in stored.txs:
            if kind == "clearing":
                body = Tx.decode(raw).body
                results[body["hour"] - h0] = (body["view"],
                                              ClearingResult.from_cbor(body["result"]))  # fmt: skip
                request, result = decode_clearing(body["request"], body["result"])
                explanations[body["hour"] - h0] = tuple(explain_hour(request, result))
            elif kind == "settlement":
                body = Tx.decode(raw).body
                settlements[body["hour"] - h0] = codec.decode(body["result"])
    lines = []
    for h in sorted(settlements):
        view, result = results[h]
        executed = result.executed[0]
        settlement = settlements[h]
        rid = cleared[h][0]
        lines.append(
            HourLine(
                hour=h,
                primary=primary(rid, view),
                view=view,
                coalition=executed.coalition,
                trades=tuple(
                    TradeLine(t.seller, t.buyer, t.energy_wh, t.amount, t.price_per_kwh)
                    for t in executed.trades
                ),
                saving=hour_shared_saving(executed),
                explanation=explanations[h],
                penalty=sum(e[2] for e in settlement["entries"] if e[3] == "shortfall"),
                short_wh=sum(d[2] - d[3] for d in settlement["deliveries"]),
            )
        )
    return lines


def _microgrid_totals(store: Any, ids: list[str], members: list[str]) -> list[MicrogridLine]:
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
