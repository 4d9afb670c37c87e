"""A seeded discrete-event simulator for consensus state machines: delays, loss, crashes, replays.

Time is an integer number of milliseconds that only the simulator advances;
every random choice comes from one `random.Random(seed)`, so a seed replays a
schedule exactly. The simulator owns the "disk" of each node (the `Persist`
records, written before the node's other actions of the same step are
routed) and rebuilds a node from it on restart. Instances are named
separately from node ids so that two instances can share one id and key
(Twins). Byzantine test nodes may emit `Targeted` actions (send only to some
nodes), which the simulator routes but a real MQTT transport cannot.

`PbftNode` is the anchor for message counts: the normal case of PBFT
(pre-prepare, all-to-all prepare, all-to-all commit) run in the same
simulator with the same requests.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.consensus.messages import Decoder, MessageError, RoundId, seal, statement
from edge_agent.consensus.node import (
    Action,
    Broadcast,
    Commit,
    Event,
    Final,
    Message,
    Open,
    Persist,
    Tick,
)
from edge_agent.consensus.signing import Keyring, Signer
from meterchain import codec


@dataclass(frozen=True)
class Targeted:
    """Send `data` only to the instances of the listed node ids (simulated adversaries only).

    With `delay` the sender also picks the delivery delay (a faulty sender may hold a
    message back as long as it likes); otherwise the link policy decides.
    """

    to: tuple[str, ...]
    kind: str
    data: bytes
    delay: int | None = None


class StateMachine(Protocol):
    node_id: str

    def step(self, event: Event) -> list[Any]: ...

    def next_deadline(self) -> int | None: ...


@dataclass
class Instance:
    """One running copy of a node, with its disk and what it decided."""

    name: str
    node: StateMachine
    rebuild: Callable[[list[bytes]], StateMachine] | None = None
    up: bool = True
    disk: dict[RoundId, bytes] = field(default_factory=dict)
    next_tick: int | None = None
    commits: dict[RoundId, tuple[int, bytes]] = field(default_factory=dict)
    finals: dict[RoundId, tuple[int, bytes]] = field(default_factory=dict)
    conflicts: list[tuple[RoundId, bytes, bytes]] = field(default_factory=list)
    actions: list[Commit | Final] = field(default_factory=list)
    scheduled: list[RoundId] = field(default_factory=list)  # rounds the application opened
    restarts: int = 0

    @property
    def node_id(self) -> str:
        return self.node.node_id


LinkPolicy = Callable[[Instance, Instance, bytes, int], int | None]


class Simulator:
    """Discrete-event network of state machines; `run(until)` processes events in time order."""

    def __init__(self, delta_ms: int, seed: int, *, decoder: Decoder | None = None) -> None:
        self.delta = delta_ms
        self.rng = random.Random(seed)
        self.decoder = decoder or Decoder()
        self.now = 0
        self._queue: list[tuple[int, int, str, Any]] = []
        self._seq = 0
        self.instances: dict[str, Instance] = {}
        self.link: LinkPolicy = self.uniform_delay
        self.publishes: Counter[str] = Counter()
        self.deliveries: Counter[str] = Counter()
        self.history: list[tuple[bytes, str]] = []
        self.keep_history = False
        self.trace: list[str] | None = None

    # --- set-up ----------------------------------------------------------------------

    def add(
        self,
        name: str,
        node: StateMachine,
        rebuild: Callable[[list[bytes]], StateMachine] | None = None,
    ) -> Instance:
        inst = Instance(name, node, rebuild)
        self.instances[name] = inst
        return inst

    def uniform_delay(self, src: Instance, dst: Instance, data: bytes, now: int) -> int | None:
        return self.rng.randint(0, self.delta)

    def _push(self, at: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def at(self, when: int, fn: Callable[[], None]) -> None:
        self._push(when, "call", fn)

    def open(self, when: int, name: str, event_fields: Mapping[str, Any]) -> None:
        self._push(when, "open", (name, dict(event_fields)))

    def crash(self, when: int, name: str) -> None:
        self._push(when, "crash", name)

    def restart(self, when: int, name: str) -> None:
        self._push(when, "restart", name)

    def inject(self, when: int, data: bytes, sender: str, to: Iterable[str] | None = None) -> None:
        """A message from outside the simulated nodes (a submit-only participant, a replay)."""
        names = list(to) if to is not None else list(self.instances)
        tag = self._kind(data)
        for name in names:
            self._push(when, "deliver", (name, data, sender, tag))

    # --- running ---------------------------------------------------------------------

    def run(self, until: int, stop: Callable[[], bool] | None = None) -> None:
        while self._queue and self._queue[0][0] <= until:
            when, _, kind, payload = heapq.heappop(self._queue)
            self.now = when
            if kind == "deliver":
                name, data, sender, tag = payload
                inst = self.instances[name]
                if inst.up:
                    self.deliveries[tag] += 1
                    self._step(inst, Message(when, data, sender))
            elif kind == "tick":
                inst = self.instances[payload]
                if inst.up and inst.next_tick == when:
                    inst.next_tick = None
                    self._step(inst, Tick(when))
            elif kind == "open":
                name, fields = payload
                inst = self.instances[name]
                event = Open(when, **fields)
                inst.scheduled.append(event.round)
                if inst.up:
                    self._step(inst, event)
            elif kind == "crash":
                inst = self.instances[payload]
                inst.up = False
                inst.next_tick = None
            elif kind == "restart":
                self._restart(self.instances[payload])
            elif kind == "call":
                payload()
            if stop is not None and stop():
                return
        self.now = max(self.now, until)

    def _kind(self, data: bytes) -> str:
        try:
            return self.decoder.envelope(data).tag
        except MessageError:
            return "malformed"

    def _restart(self, inst: Instance) -> None:
        if inst.up or inst.rebuild is None:
            return
        inst.node = inst.rebuild(list(inst.disk.values()))
        inst.up = True
        inst.restarts += 1
        # like the application after a restart: every round it opened (or should have
        # opened while down) that the node's disk does not know is opened to catch up
        known = getattr(inst.node, "knows_round", None)
        for rid in inst.scheduled:
            if known is not None and not known(rid):
                self._step(inst, Open(self.now, rid, submit=False, catch_up=True))
        self._step(inst, Tick(self.now))

    def _step(self, inst: Instance, event: Event) -> None:
        actions = inst.node.step(event)
        self.apply(inst, actions)

    def apply(self, inst: Instance, actions: list[Action | Targeted]) -> None:
        for action in actions:
            if isinstance(action, Persist):
                inst.disk[action.round] = action.record
            elif isinstance(action, Broadcast):
                self._route(inst, action.kind, action.data, None)
            elif isinstance(action, Targeted):
                self._route(inst, action.kind, action.data, set(action.to), action.delay)
            elif isinstance(action, Commit):
                inst.actions.append(action)
                self._decide(inst, inst.commits, action.round, action.digest)
            elif isinstance(action, Final):
                inst.actions.append(action)
                self._decide(inst, inst.finals, action.round, action.digest)
        self._schedule_tick(inst)

    def _decide(
        self,
        inst: Instance,
        book: dict[RoundId, tuple[int, bytes]],
        rid: RoundId,
        digest: bytes,
    ) -> None:
        # a conflict is any two different digests for one round, across commits and finals
        for seen in (inst.commits.get(rid), inst.finals.get(rid)):
            if seen is not None and seen[1] != digest:
                inst.conflicts.append((rid, seen[1], digest))
        book.setdefault(rid, (self.now, digest))
        if self.trace is not None:
            self.trace.append(f"{self.now} {inst.name} decide {rid} {digest.hex()[:8]}")

    def _route(
        self, src: Instance, kind: str, data: bytes, only: set[str] | None, fixed: int | None = None
    ) -> None:
        self.publishes[kind] += 1
        if self.keep_history:
            self.history.append((data, src.node_id))
        if self.trace is not None:
            self.trace.append(f"{self.now} {src.name} -> {kind} {sorted(only) if only else '*'}")
        for dst in self.instances.values():
            if dst is src or dst.node_id == src.node_id:
                continue
            if only is not None and dst.node_id not in only:
                continue
            delay = fixed if fixed is not None else self.link(src, dst, data, self.now)
            if delay is not None:
                self._push(self.now + delay, "deliver", (dst.name, data, src.node_id, kind))

    def _schedule_tick(self, inst: Instance) -> None:
        if not inst.up:
            return
        deadline = inst.node.next_deadline()
        if deadline is None:
            return
        deadline = max(deadline, self.now + 1)
        if inst.next_tick is None or deadline < inst.next_tick or inst.next_tick <= self.now:
            inst.next_tick = deadline
            self._push(deadline, "tick", inst.name)


# --- the PBFT anchor -------------------------------------------------------------------


class PbftNode:
    """PBFT normal case (no view change) for message counting: f = (n-1)//3, quorums 2f+1.

    The primary of round seq proposes once it holds every member's request (or
    after 2 delta), its pre-prepare carrying that request set (as SDBFT's
    proposal carries its value, so bytes compare like with like); backups
    broadcast PREPARE; a node holding the proposal and
    2f matching PREPAREs broadcasts COMMIT; 2f+1 COMMITs decide. Messages are
    signed like SDBFT's so both cost the same per message.
    """

    def __init__(self, signer: Signer, keyring: Keyring, delta_ms: int) -> None:
        self.signer = signer
        self.node_id = signer.node_id
        self.keyring = keyring
        self.members = keyring.membership.node_ids
        self.market = keyring.membership.market
        self.n = len(self.members)
        self.f = (self.n - 1) // 3
        self.delta = delta_ms
        self.now = 0
        self.rounds: dict[RoundId, dict[str, Any]] = {}

    def _round(self, rid: RoundId) -> dict[str, Any]:
        return self.rounds.setdefault(
            rid,
            {
                "requests": {},
                "opened": None,
                "digest": None,
                "prepares": {},
                "commits": {},
                "sent_commit": False,
                "done": False,
                "proposed": False,
            },
        )

    def _signed(self, tag: str, rid: RoundId, ref: Any, attachment: Any = None) -> bytes:
        stmt = codec.encode([tag, self.market, rid.to_cbor(), 0, ref])
        return codec.encode([stmt, self.node_id, self.signer.sign(stmt), attachment])

    def step(self, event: Event) -> list[Any]:
        self.now = max(self.now, event.now_ms)
        out: list[Any] = []
        if isinstance(event, Open):
            rs = self._round(event.round)
            rs["opened"] = self.now
            stmt = statement(
                "req", self.market, event.round, 0, event.deposit, self.node_id, event.body
            )
            raw = seal(self.node_id, self.signer.sign(stmt), stmt)
            rs["requests"][self.node_id] = raw
            out.append(Broadcast("req", raw))
            self._advance(event.round, out)
        elif isinstance(event, Message):
            outer = codec.decode(event.data)
            stmt, sender, sig, _ = outer
            if not self.keyring.verify(sender, stmt, sig):
                return out
            tag, _, rnd, _, ref, *extra = codec.decode(stmt)
            rid = RoundId.from_cbor(rnd)
            rs = self._round(rid)
            if tag == "req":
                rs["requests"].setdefault(sender, event.data)
            elif tag == "pre-prepare":
                rs["digest"] = ref
                rs["prepares"].setdefault(ref, set()).add(sender)
                if sender != self.node_id and not rs.get("prepared_sent"):
                    rs["prepared_sent"] = True
                    rs["prepares"][ref].add(self.node_id)
                    out.append(Broadcast("prepare", self._signed("prepare", rid, ref)))
            elif tag == "prepare":
                rs["prepares"].setdefault(ref, set()).add(sender)
            elif tag == "commit":
                rs["commits"].setdefault(ref, set()).add(sender)
            self._advance(rid, out)
        else:
            for rid in list(self.rounds):
                self._advance(rid, out)
        return out

    def _advance(self, rid: RoundId, out: list[Any]) -> None:
        rs = self._round(rid)
        if rs["done"] or rs["opened"] is None:
            return
        primary = self.members[rid.seq % self.n]
        if primary == self.node_id and not rs["proposed"]:
            if len(rs["requests"]) == self.n or self.now >= rs["opened"] + 2 * self.delta:
                rs["proposed"] = True
                # Like with like: the pre-prepare carries the request set it orders, as
                # SDBFT's proposal carries its value (PBFT's backups need it to execute).
                requests = [rs["requests"][s] for s in sorted(rs["requests"])]
                digest = codec.digest(requests)
                rs["digest"] = digest
                rs["prepares"].setdefault(digest, set()).add(self.node_id)
                out.append(
                    Broadcast("pre-prepare", self._signed("pre-prepare", rid, digest, requests))
                )
        digest = rs["digest"]
        if digest is None:
            return
        if not rs["sent_commit"] and len(rs["prepares"].get(digest, ())) >= 2 * self.f + 1:
            rs["sent_commit"] = True
            rs["commits"].setdefault(digest, set()).add(self.node_id)
            out.append(Broadcast("commit", self._signed("commit", rid, digest)))
        if len(rs["commits"].get(digest, ())) >= 2 * self.f + 1:
            rs["done"] = True
            out.append(Final(rid, digest, None, None))  # type: ignore[arg-type]

    def next_deadline(self) -> int | None:
        times = [
            rs["opened"] + 2 * self.delta
            for rid, rs in self.rounds.items()
            if not rs["proposed"]
            and rs["opened"] is not None
            and self.members[rid.seq % self.n] == self.node_id
        ]
        times = [t for t in times if t > self.now]
        return min(times) if times else None


# --- building a simulated market -------------------------------------------------------


def node_names(n: int) -> list[str]:
    return [f"n{i}" for i in range(n)]


def membership_for(market: str, keys: Mapping[str, Any]) -> Any:
    """An (unsigned) membership of `keys` (node id -> public key) in the given order."""
    from meterchain.quorum import Member, Membership

    return Membership(market, 1, tuple(Member(node, key) for node, key in keys.items()))
