"""The HIL conformance suite and fault scenarios that `meterchain hil run` runs on a rig.

Conformance (against the rig's boards and meters):
* signatures_verify -- every reading a board publishes verifies against the registry;
* sequence_gap_free -- each board's sequence numbers arrive strictly increasing, no gap;
* broker_outage -- readings taken while the broker is down reach it after it returns,
  each exactly once (store-and-forward in the board's flash spool);
* modbus_faults_flagged -- a cut RS-485 line gives readings flagged "meter read
  error" that repeat the last good registers; corrupted frames never yield wrong values.

Fault scenarios. The consensus ones drive three SDBFT members on the rig's
broker exactly as the agent runs them (`edge_agent.consensus`: the `Node`
state machine on its `NodeRunner` MQTT transport with an fsynced round log):
* byzantine_primary -- the primary raises its own payment and lowers another's: the
  backups refuse, change primary, and the round commits the honest result;
* crashed_agent -- a backup is down: the round still commits (2 of 3);
* broker_restart -- the broker restarts between rounds: boards and agents reconnect,
  readings and the next round go through.
The service ones run a lab site of the real processes (`meterchain.site`: Mosquitto,
the aggregator service, four agent services, the emulated lab) on an accelerated
market clock and kill the services themselves with SIGKILL mid-run:
* aggregator_kill9 -- the aggregator service dies; the site's supervisor restarts it,
  it verifies its ledger and goes on landing blocks;
* agent_kill9 -- a consensus member's agent service dies and comes back; the market
  keeps clearing and settling throughout. After both, `site down`: every reading the
  boards sent is on the ledger exactly once, and the ledger verifies.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.rig import CheckResult, Rig

DELTA_MS = 150


class Skip(Exception):
    """This check cannot run on this rig; the message says why (reported, never hidden)."""


@dataclass(frozen=True)
class Check:
    name: str
    group: str
    run: Callable[[Session, CheckResult], None]


# --- the rig session: broker, meters, boards, aggregator -------------------------------


@dataclass
class Session:
    """What a rig run starts once and every check shares."""

    rig: Rig
    workdir: Path
    broker: Any = None  # MosquittoBroker | EmbeddedBroker | None (url)
    passwords: dict[str, str] = field(default_factory=dict)
    meters: dict[str, Any] = field(default_factory=dict)  # board id -> MeterLink
    boards: dict[str, Any] = field(default_factory=dict)  # board id -> Board (emulated)
    collector: Any = None
    clock: Any = None
    _closers: list[Callable[[], None]] = field(default_factory=list)

    AGENTS = ("rig-node-a", "rig-node-b", "rig-node-c")

    site_run: dict[str, Any] | None = None  # the service scenarios' shared site run

    def address(self, user: str) -> Any:
        from hil.collector import BrokerAddress

        b = self.rig.broker
        if b.kind == "mosquitto":
            return BrokerAddress("localhost", self.broker.port, user, self.passwords[user],
                                 str(self.broker.ca_file))  # fmt: skip
        if b.kind == "embedded":
            return BrokerAddress(self.broker.host, self.broker.port)
        from urllib.parse import urlsplit

        parts = urlsplit(b.url)
        password = b.password_file.read_text().strip() if b.password_file else ""
        return BrokerAddress(
            parts.hostname or "localhost",
            parts.port or (8883 if parts.scheme == "mqtts" else 1883),
            b.username,
            password,
            str(b.ca_file) if b.ca_file else None,
        )

    def start(self) -> Session:
        from hil.rig_boards import Board, MeterLink, MeterSpec, VirtualClock, write_board_config

        rig = self.rig
        self.workdir.mkdir(parents=True, exist_ok=True)
        users = [b.id for b in rig.boards] + list(self.AGENTS) + ["rig-aggregator"]
        self.passwords = {u: secrets.token_hex(12) for u in users}
        if rig.broker.kind == "mosquitto":
            from hil.broker import MosquittoBroker
            from meterchain.mqtt_auth import meter_acl, node_acl, observer_acl

            acl = "".join(meter_acl(rig.market, b.id) + "\n" for b in rig.boards)
            acl += "".join(node_acl(rig.market, a) + "\n" for a in self.AGENTS)
            acl += observer_acl(rig.market, "rig-aggregator")
            self.broker = MosquittoBroker(self.workdir / "broker", users=self.passwords, acl=acl)
            self.broker.start()
            self._closers.append(self.broker.stop)
        elif rig.broker.kind == "embedded":
            from hil.embedded_broker import EmbeddedBroker

            self.broker = EmbeddedBroker().start()
            self._closers.append(self.broker.stop)
        self.clock = VirtualClock(time.time())
        for k, b in enumerate(rig.boards):
            if b.kind != "emulated":
                continue
            meter = rig.meters[b.meter]
            spec = MeterSpec(b.id, b.owner, meter.source)
            link = MeterLink(self.clock.now, seed=k + 1)
            self._closers.append(link.close)
            link.profile.default_w = meter.power_w
            self.meters[b.id] = link
            addr = self.address(b.id)
            ca = Path(addr.ca_file).read_bytes() if addr.ca_file else None
            write_board_config(
                self.workdir / "boards" / b.id, spec, rig.market, addr.host, addr.port,
                link.port, username=addr.username, password=addr.password,
                tls=ca is not None, ca_pem=ca,
            )  # fmt: skip
            board = Board(self.workdir / "boards" / b.id, self.clock)
            self._closers.append(board.close)
            self.boards[b.id] = board
        return self

    def registry(self, keys: dict[str, bytes] | None = None) -> Any:
        from meterchain.keys import PublicKey
        from meterchain.registry import Registry, make_meter

        entries = []
        for b in self.rig.boards:
            point = keys.get(b.id) if keys else b.key
            if point is None and b.id in self.boards:
                point = self.boards[b.id].public_point
            if point is None:
                raise Skip(f"board {b.id}: its public key is not known to the rig")
            entries.append(make_meter(b.id, PublicKey.from_point(point),
                                      b.owner, self.rig.meters[b.meter].source))  # fmt: skip
        return Registry(entries)

    def ensure_collector(self) -> Any:
        if self.collector is None:
            from hil.collector import ReadingCollector

            self.collector = ReadingCollector(
                self.rig.market, self.registry(), self.workdir / "guard.db",
                self.address("rig-aggregator"), self.clock.now,
            )  # fmt: skip
            self._closers.append(self.collector.close)
        return self.collector

    def sample(self, n: int, publish: bool = True) -> None:
        """n readings from every emulated board, one simulated minute apart."""
        for _ in range(n):
            self.clock.set(self.clock.now() + 60)
            for board in self.boards.values():
                board.sample()
            if publish:
                self.publish()

    def publish(self, timeout_s: float = 20.0) -> None:
        for board in self.boards.values():
            assert board.publish(timeout_s), (
                f"board {board.meter_id}: {board.pending} reading(s) not acknowledged: "
                f"{board.app.uplink.last_error}"
            )

    def wait_all(self, timeout_s: float = 20.0) -> None:
        total = sum(b.acked for b in self.boards.values())
        assert self.collector.wait_for(total, timeout_s), (
            f"aggregator received {self.collector.received} of {total} published readings"
        )

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                pass


def _need_emulated(s: Session) -> None:
    if not s.boards:
        raise Skip("needs emulated boards the rig can drive (real boards sample on their own)")


def _readings_by_meter(s: Session) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for batch in s.collector.by_hour.values():
        for r in batch:
            out.setdefault(r.meter_id, []).append(r)
    return out


# --- conformance ------------------------------------------------------------------------


def signatures_verify(s: Session, result: CheckResult) -> None:
    collector = s.ensure_collector()
    if s.boards:
        s.sample(s.rig.readings)
        s.wait_all()
    else:
        deadline = time.monotonic() + s.rig.listen_s
        need = s.rig.readings * len(s.rig.boards)
        while collector.received < need and time.monotonic() < deadline:
            time.sleep(0.5)
    assert not collector.rejected, f"refused: {collector.rejected[:3]}"
    assert collector.accepted >= s.rig.readings * len(s.rig.boards), (
        f"only {collector.accepted} verified readings"
    )
    result.details.append(f"{collector.accepted} readings verified, none refused")


def sequence_gap_free(s: Session, result: CheckResult) -> None:
    s.ensure_collector()
    if s.boards and not s.collector.accepted:
        s.sample(s.rig.readings)
        s.wait_all()
    by_meter = _readings_by_meter(s)
    for b in s.rig.boards:
        seqs = sorted(r.seq for r in by_meter.get(b.id, []))
        assert seqs, f"board {b.id}: no readings"
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"board {b.id}: gaps in {seqs}"
        result.details.append(f"{b.id}: seq {seqs[0]}..{seqs[-1]} without gaps")


def broker_outage(s: Session, result: CheckResult) -> None:
    _need_emulated(s)
    if s.rig.broker.kind != "mosquitto":
        raise Skip("needs the rig's own Mosquitto (broker.kind = \"mosquitto\") to cut it; the "
                   "embedded broker keeps no sessions and a URL broker is not ours to stop")
    collector = s.ensure_collector()
    before = collector.accepted
    s.broker.kill()
    s.sample(s.rig.readings, publish=False)
    for board in s.boards.values():
        board.publish(0.3)  # tries and fails: the readings stay in the spool
    spooled = {b.meter_id: b.pending for b in s.boards.values()}
    assert all(n >= s.rig.readings for n in spooled.values()), f"spooled only {spooled}"
    s.broker.start()
    assert collector.wait_subscribed(20), "the aggregator did not reconnect to the broker"
    s.publish(30)
    s.wait_all(30)
    got = collector.accepted - before
    expected = s.rig.readings * len(s.boards)
    assert got == expected, f"{got} readings arrived after the outage, {expected} were taken"
    sequence_gap_free(s, result)
    result.details.append(f"{expected} readings spooled during the outage, all delivered once")


def modbus_faults_flagged(s: Session, result: CheckResult) -> None:
    _need_emulated(s)
    from meterchain import reading

    board_id, board = next(iter(s.boards.items()))
    link = s.meters[board_id]
    collector = s.ensure_collector()
    s.sample(1)
    s.wait_all()
    link.modem.cut()
    try:
        s.sample(1)
    finally:
        link.modem.mend()
    s.wait_all()
    link.modem.corrupt(3)
    s.sample(1)
    s.wait_all()
    ours = sorted(_readings_by_meter(s)[board_id], key=lambda r: r.seq)
    good, cut, corrupted = ours[-3], ours[-2], ours[-1]
    flags = {r.seq: reading.verify(r.cose, collector.registry).flags for r in ours[-3:]}
    assert not flags[good.seq] & reading.FLAG_METER_READ_ERROR, "a good read was flagged"
    assert flags[cut.seq] & reading.FLAG_METER_READ_ERROR, "the cut line was not flagged"
    assert (cut.import_wh, cut.export_wh) == (good.import_wh, good.export_wh), (
        "a failed read must repeat the last good registers"
    )
    assert corrupted.import_wh >= good.import_wh and corrupted.export_wh >= good.export_wh
    result.details.append(
        f"cut line: seq {cut.seq} flagged, registers held; corrupted frames: seq "
        f"{corrupted.seq} {'flagged' if flags[corrupted.seq] & 2 else 'read after a retry'}"
    )


# --- fault scenarios: SDBFT members on the rig's broker, as the agent runs them ----------


class Member:
    """One consensus member: the agent's `Node` on its `NodeRunner` (MQTT, fsynced round log)."""

    def __init__(self, node: Any, folder: Path, address: Any) -> None:
        from edge_agent.consensus.transport import MqttSettings, NodeRunner, open_store

        store, _ = open_store(folder)
        # A session of its own per scenario: a persistent one left by an earlier scenario's
        # member would hand it that scenario's messages for the same round numbers.
        client_id = f"sdbft-{node.node_id}-{time.monotonic_ns()}"
        settings = MqttSettings(address.host, address.port, address.username, address.password,
                                address.ca_file, client_id=client_id)  # fmt: skip
        self.node = node
        self.node_id = node.node_id
        self.commits: dict[Any, Any] = {}
        self._changed = threading.Condition()
        self.runner = NodeRunner(node, store, settings, on_commit=self._committed).start()

    def _committed(self, commit: Any) -> None:
        with self._changed:
            self.commits[commit.round] = commit
            self._changed.notify_all()

    def open(self, rid: Any, trade: Any) -> None:
        deposit = f"deposit:{self.node_id}:{rid.seq}".encode()
        self.runner.open_round(rid, deposit=deposit, body=trade.to_dict())

    def wait_commit(self, rid: Any, timeout: float) -> Any:
        with self._changed:
            self._changed.wait_for(lambda: rid in self.commits, timeout)
            return self.commits.get(rid)

    def close(self) -> None:
        self.runner.stop()


def _members(s: Session, node_class: dict[str, Any] | None = None) -> tuple[Any, list[Member]]:
    from edge_agent.consensus.messages import Decoder
    from edge_agent.consensus.node import Node
    from edge_agent.consensus.signing import Keyring, P256Signer
    from edge_agent.consensus_clearing import clearing_contracts
    from meterchain.ledger.sandbox import named_key
    from meterchain.market.reference import reference_case
    from meterchain.quorum import Member as Listed
    from meterchain.quorum import Membership

    case = reference_case()
    market_name = s.rig.market
    keys = {a: named_key(f"{market_name}/{a}") for a in s.AGENTS}
    regulator = named_key(f"{market_name}/regulator")
    membership = Membership(
        market_name, 1, tuple(Listed(a, keys[a].public_key()) for a in s.AGENTS)
    ).signed_by(regulator)
    members = []
    for a in s.AGENTS:
        cls = (node_class or {}).get(a, Node)
        node = cls(P256Signer(a, keys[a]), Keyring(membership), clearing_contracts(case.market),
                   delta_ms=DELTA_MS, decoder=Decoder())  # fmt: skip
        folder = s.workdir / "agents" / f"{a}-{time.monotonic_ns()}"
        members.append(Member(node, folder, s.address(a)))
    return case, members


def _round_id(seq: int) -> Any:
    from edge_agent.consensus.messages import RoundId

    return RoundId(seq, f"clear-{seq % 24:02d}")


def _trade_requests(case: Any, hour: int, ids: tuple[str, ...]) -> dict[str, Any]:
    """The reference day's requests for `hour`, renamed to the rig's agents."""
    import dataclasses

    from meterchain.market.model import TradeRequest

    sc1 = case.request(hour, None)
    return {
        node: TradeRequest(dataclasses.replace(r.microgrid, id=node), r.deposit)
        for node, r in zip(ids, sc1.requests[: len(ids)], strict=True)
    }


def _round(members: list[Member], case: Any, seq: int, timeout: float = 60) -> dict[str, Any]:
    rid = _round_id(seq)
    trades = _trade_requests(case, seq % 24, tuple(m.node_id for m in members))
    for member in members:
        member.open(rid, trades[member.node_id])
    out = {}
    for member in members:
        got = member.wait_commit(rid, timeout)
        assert got is not None, f"round {rid} did not commit at {member.node_id}"
        out[member.node_id] = got
    assert len({c.value.digest for c in out.values()}) == 1, "members committed different values"
    return out


def _close(members: list[Member]) -> None:
    for m in members:
        m.close()


def byzantine_primary(s: Session, result: CheckResult) -> None:
    from edge_agent.consensus.node import Node

    liar_id = s.AGENTS[0]  # primary of round 0 in view 0 (rotation k = seq + view)

    class TamperingNode(Node):
        """Raises its own payment and lowers another microgrid's in every result it proposes."""

        def make_result(self, rid: Any, requests: Any) -> Any:
            honest = super().make_result(rid, requests)
            res = honest["result"]
            hour = res["executed"][0]
            ids = res["microgrids"]
            me, victim = ids.index(self.node_id), (ids.index(self.node_id) + 1) % len(ids)
            payments = list(hour["payments"])
            payments[me] -= 50_000  # pays 5 less ...
            payments[victim] += 50_000  # ... and makes another pay 5 more
            return {**honest, "result": {**res, "executed": [{**hour, "payments": payments}]}}

    case, members = _members(s, {liar_id: TamperingNode})
    try:
        commits = _round(members, case, 0)
        honest = [c for a, c in commits.items() if a != liar_id]
        decided = [c for c in honest if c.view >= 0]
        assert decided, "no honest member decided the round by its own votes"
        view = decided[0].view
        assert view >= 1, f"committed in view {view}: the tampered proposal was accepted"
        value = decided[0].value
        contract = members[1].node.contracts[value.requests[0].env.round.kind]
        assert contract.check(value.requests, value.result), "committed result is not honest"
        new_primary = members[1].node.primary(decided[0].round, view)
        assert new_primary != liar_id
        result.details.append(f"tampering primary {liar_id} replaced; {new_primary} committed "
                              f"the honest result in view {view}")  # fmt: skip
    finally:
        _close(members)


def crashed_agent(s: Session, result: CheckResult) -> None:
    case, members = _members(s)
    try:
        crashed = members[2]
        crashed.close()
        live = members[:2]
        rid = _round_id(0)
        trades = _trade_requests(case, 0, tuple(m.node_id for m in members))
        for member in live:
            member.open(rid, trades[member.node_id])
        for member in live:
            got = member.wait_commit(rid, 60)
            assert got is not None, f"no commit at {member.node_id} with {crashed.node_id} down"
            assert got.certificate is None or len(got.certificate.signers) >= 2
        result.details.append(f"{crashed.node_id} down: {live[0].node_id} and {live[1].node_id} "
                              "committed")  # fmt: skip
    finally:
        _close(members[:2])


def broker_restart(s: Session, result: CheckResult) -> None:
    if s.rig.broker.kind != "mosquitto":
        raise Skip("needs the rig's own Mosquitto to restart (broker.kind = \"mosquitto\")")
    case, members = _members(s)
    try:
        _round(members, case, 0)
        before = s.ensure_collector().accepted
        s.broker.restart()
        assert s.collector.wait_subscribed(20), "the aggregator did not reconnect"
        if s.boards:
            s.sample(2)
            s.wait_all(30)
            assert s.collector.accepted - before == 2 * len(s.boards)
        time.sleep(0.5)  # let the members' clients reconnect and resubscribe
        commits = _round(members, case, 1)
        result.details.append(f"after the restart: {2 * len(s.boards)} readings and round 1 "
                              f"committed (view {next(iter(commits.values())).view})")  # fmt: skip
    finally:
        _close(members)


# --- service scenarios: kill -9 of the real aggregator and agent services ----------------

SITE_HOURS = 2  # market hours the site settles after each kill


def _settled(ledger: Path) -> int:
    """How many hours the aggregator has settled on the ledger so far."""
    from meterchain.site.supervisor import settled_hours

    return len(settled_hours(ledger))


def _height(ledger: Path) -> int:
    """The height of the head block of `ledger` (-1 while it has none or is being created)."""
    from meterchain.errors import MeterChainError
    from meterchain.ledger.store import open_store

    if not ledger.exists():
        return -1
    try:
        with open_store(str(ledger), create=False) as store:
            head = store.head()
    except (MeterChainError, OSError):
        return -1
    return -1 if head is None else head[0]


def _until(what: str, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _kill9(site: Any, name: str) -> int:
    from meterchain.site import supervisor

    pid = supervisor.status(site)["processes"][name]["pid"]
    os.kill(pid, signal.SIGKILL)
    _until(f"{name} to be restarted",
           lambda: supervisor.status(site)["processes"][name]["restarts"] >= 1
           and supervisor.status(site)["processes"][name]["alive"], 30)  # fmt: skip
    return int(pid)


def run_site_with_kills(workdir: Path, market: str = "rig") -> dict[str, Any]:
    """A lab site of the real services; SIGKILL the aggregator, then a member's agent, each
    mid-run while hours keep settling; then `site down`. What happened, for the checks."""
    from meterchain.ledger.chain import verify_store
    from meterchain.ledger.store import open_store
    from meterchain.site import supervisor
    from meterchain.site.init import InitOptions, init_site

    site = init_site(workdir / f"site-{time.monotonic_ns()}",
                     InitOptions(market=market, emulated=True, speed=1440.0))  # fmt: skip
    run: dict[str, Any] = {"site": str(site.root)}
    supervisor.up(site.root, settle_s=8.0)
    try:
        per_hour = 3600 / site.clock.speed
        _until("a first settled hour", lambda: _settled(site.ledger) >= 1, 60)
        run["aggregator_pid"] = _kill9(site, "aggregator")
        at = _settled(site.ledger)
        _until(f"{SITE_HOURS} hours settled after the aggregator's kill",
               lambda: _settled(site.ledger) >= at + SITE_HOURS, 30 + 6 * per_hour * SITE_HOURS)
        victim = f"agent-{site.site.members[1]}"
        run["agent_pid"] = _kill9(site, victim)
        at = _settled(site.ledger)
        _until(f"{SITE_HOURS} hours settled after {victim}'s kill",
               lambda: _settled(site.ledger) >= at + SITE_HOURS, 30 + 6 * per_hour * SITE_HOURS)
        run["killed_agent"] = victim
        # The restarted member catches up from the sealed block copies queued for it; give it
        # a bounded time to reach the head before `site down` stops everything.
        member_db = site.root / "state" / "agents" / victim.removeprefix("agent-") / "ledger.db"
        _until(f"{victim}'s ledger copy to reach the head",
               lambda: _height(member_db) >= _height(site.ledger) - 1,
               30 + 2 * per_hour)  # fmt: skip
    finally:
        final = supervisor.down(site.root)
    run["final"] = final
    with open_store(str(site.ledger), create=False) as store:
        _, report = verify_store(store)
        run["blocks"], run["readings"] = report.blocks, report.readings
        run["settlements"] = report.kinds.get("settlement", 0)
        run["stored_readings"] = store.reading_count()
    run["published"] = json.loads(site.lab_status.read_text())["published"]
    # The killed member caught up: its own ledger copy (applied from the blocks it voted
    # for and the sealed copies of those it missed) verifies and reaches the head.
    member = victim.removeprefix("agent-")
    with open_store(str(site.root / "state" / "agents" / member / "ledger.db"),
                    create=False) as store:  # fmt: skip
        _, copy = verify_store(store)
        run["member_blocks"] = copy.blocks
    return run


def _site_run(s: Session) -> dict[str, Any]:
    if s.site_run is None:
        s.site_run = run_site_with_kills(s.workdir, s.rig.market)
    return s.site_run


def aggregator_kill9(s: Session, result: CheckResult) -> None:
    run = _site_run(s)
    procs = run["final"]["processes"]
    assert procs["aggregator"]["restarts"] >= 1 and -9 in procs["aggregator"]["exits"]
    assert run["published"] == run["readings"] == run["stored_readings"], (
        f"{run['published']} readings published, {run['readings']} on the ledger"
    )
    result.details.append(
        f"aggregator (pid {run['aggregator_pid']}) killed and restarted; ledger verifies: "
        f"{run['blocks']} blocks, {run['settlements']} hours settled, {run['readings']} of "
        f"{run['published']} published readings, each once"
    )


def agent_kill9(s: Session, result: CheckResult) -> None:
    run = _site_run(s)
    name = run["killed_agent"]
    procs = run["final"]["processes"]
    assert procs[name]["restarts"] >= 1 and -9 in procs[name]["exits"]
    assert run["published"] == run["readings"]
    # its copy may miss only the blocks committed while `site down` stopped it
    assert run["member_blocks"] >= run["blocks"] - 2, (
        f"{name}'s ledger copy has {run['member_blocks']} of {run['blocks']} blocks"
    )
    result.details.append(
        f"{name} (pid {run['agent_pid']}) killed and restarted; {SITE_HOURS} more hours "
        f"settled meanwhile; its ledger copy caught up ({run['member_blocks']} of "
        f"{run['blocks']} blocks); {run['readings']} readings on a verifying ledger"
    )


CHECKS: tuple[Check, ...] = (
    Check("signatures_verify", "conformance", signatures_verify),
    Check("sequence_gap_free", "conformance", sequence_gap_free),
    Check("broker_outage", "conformance", broker_outage),
    Check("modbus_faults_flagged", "conformance", modbus_faults_flagged),
    Check("byzantine_primary", "fault", byzantine_primary),
    Check("crashed_agent", "fault", crashed_agent),
    Check("broker_restart", "fault", broker_restart),
    Check("aggregator_kill9", "fault", aggregator_kill9),
    Check("agent_kill9", "fault", agent_kill9),
)
