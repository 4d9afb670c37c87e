"""An adaptive Byzantine coalition for the simulator: point to point, timed, equivocating, flooding.

The faulty members of a schedule form one `Coalition`: it holds all their keys,
sees every message any of them receives (and every message anyone publishes:
the adversary also schedules the network), and draws every choice from one
seeded `random.Random`, so a seed replays the attack exactly. Each faulty
member runs the honest `Node` underneath (so it knows rounds, views,
requests, statuses and certificates like anyone else) and the coalition
rewrites what it publishes:

- point to point: any message goes to a chosen subset, each copy with its own
  delay (0, delta, a random hold-back up to 6 delta, or landing on the victim's
  next deadline plus or minus 1 ms), or is withheld;
- as primary: up to three signed variants per view (its own request signed
  several ways, or a justification over another choice of statuses), each
  shown to a different part of the others at its own time;
- double votes for every proposal it knows, finality attestations for every
  certified value, blames with bundled proposals as evidence (also for an
  unrelated view), statuses reporting the highest, a lower or no lock;
- selective forwarding of vote and change-primary certificates and finals;
- floods: copies and distinct messages for the current and the next round,
  aimed at the hold buffer and the de-duplication;
- values withheld: as primary, the whole proposal (with the value) to all, a
  random subset or one correct node, and to the others its signed header
  only or nothing; votes towards one correct node only; fetches by digest
  answered honestly, not at all, or with a wrong body (another proposal of
  the view, or the right header with a value that does not hash to it);
- isolation (the withheld-value attack of `test_header_votes`, adaptively):
  the whole proposal to one correct victim only, landing one delta and a
  millisecond before the others' next deadline; every faulty vote to the
  victim only, no blame and no certificate to it; statuses without a lock,
  and as the next primary the victim's status ignored.

`Strategy` fixes which of these a schedule uses; `ScheduledLink` is the
network side (correct-to-correct delays stay within delta, chosen uniformly,
at the extremes, or to land on the receiver's next deadline).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from edge_agent.consensus.messages import (
    RoundId,
    Value,
    blame_statement,
    final_statement,
    header,
    seal,
    statement,
    vote_statement,
)
from edge_agent.consensus.node import Broadcast, Event, Message, Node, Open, _Round
from edge_agent.consensus.sim import Instance, Simulator, Targeted
from meterchain import codec


@dataclass
class Strategy:
    """What the coalition does in one schedule (drawn from the schedule's seed)."""

    silent: bool = False  # crash-like: publish nothing at all
    point_to_point: float = 0.5  # chance that a message goes to a random subset only
    withhold: float = 0.1  # chance that a message is not sent at all
    timing: str = "random"  # random | zero | delta | snipe (victim's deadline +-1 ms)
    variants: int = 1  # proposals signed per view as primary (1..3)
    double_vote: bool = False
    false_finals: bool = False
    blame_spam: bool = False
    bundle: bool = False  # blame evidence bundles proposals, also under an unrelated view
    status_lie: str = "honest"  # honest | none | lowest: which lock a status reports
    forward: bool = False  # re-send certificates and finals to chosen nodes only
    flood: int = 0  # distinct messages for the next round aimed at the hold buffer
    value_to: str = "all"  # all | subset | one: who gets a proposal with its value
    header_to_rest: bool = True  # the others get the signed header only (else nothing)
    votes_to_one: bool = False  # every vote towards one correct node only
    fetch_answers: str = "honest"  # honest | silent | wrong
    isolate: bool = False  # the value, and every faulty vote, to one correct victim only

    @classmethod
    def draw(cls, rng: random.Random) -> Strategy:
        if rng.random() < 0.06:
            return cls(silent=True)
        return cls(
            point_to_point=rng.choice([0.0, 0.5, 0.9]),
            withhold=rng.choice([0.0, 0.1, 0.3]),
            timing=rng.choice(["random", "zero", "delta", "snipe", "snipe"]),
            variants=rng.choice([1, 2, 3, 3]),
            double_vote=rng.random() < 0.6,
            false_finals=rng.random() < 0.4,
            blame_spam=rng.random() < 0.4,
            bundle=rng.random() < 0.5,
            status_lie=rng.choice(["honest", "none", "lowest"]),
            forward=rng.random() < 0.5,
            flood=rng.choice([0, 0, 0, 20]),
            value_to=rng.choice(["all", "subset", "one", "one"]),
            header_to_rest=rng.random() < 0.7,
            votes_to_one=rng.random() < 0.3,
            fetch_answers=rng.choice(["honest", "silent", "wrong"]),
            isolate=rng.random() < 0.25,
        )


@dataclass
class Coalition:
    """The faulty members of one schedule, acting together."""

    rng: random.Random
    strategy: Strategy
    sim: Simulator | None = None
    members: dict[str, ByzantineNode] = field(default_factory=dict)
    victim: str | None = None  # the correct node an isolation attack shows the value to
    sent: set[tuple[Any, ...]] = field(default_factory=set)  # one-off attacks already made

    def once(self, *key: Any) -> bool:
        if key in self.sent:
            return False
        self.sent.add(key)
        return True

    # --- timing ---------------------------------------------------------------------

    def delay_for(self, dst: str, now: int, delta: int) -> int:
        mode = self.strategy.timing
        if mode == "zero":
            return 0
        if mode == "delta":
            return delta
        if mode == "snipe" and self.sim is not None:
            due = _next_deadline(self.sim, dst)
            if due is not None and due - 1 >= now:
                return due - now + self.rng.choice([-1, 0, 1])
        return self.rng.randint(0, 6 * delta)

    def send(self, node: ByzantineNode, kind: str, data: bytes, out: list[Any]) -> None:
        """Send as a faulty member: to whom and when the coalition likes."""
        others = [m for m in node.membership.node_ids if m not in self.members]
        if not others or self.strategy.silent:
            return
        for m in self.members:  # the coalition shares everything at once
            if m != node.node_id:
                out.append(Targeted((m,), kind, data, 0))
        if self.rng.random() < self.strategy.withhold:
            return
        if self.rng.random() < self.strategy.point_to_point:
            chosen = [m for m in others if self.rng.random() < 0.5] or [self.rng.choice(others)]
        else:
            chosen = others
        for dst in chosen:
            out.append(Targeted((dst,), kind, data, self.delay_for(dst, node.now, node.delta)))

    def others(self, node: ByzantineNode) -> list[str]:
        return [m for m in node.membership.node_ids if m not in self.members]

    def isolated(self, node: ByzantineNode) -> str | None:
        """The isolation attack's victim (chosen once per schedule), if the attack is on."""
        others = self.others(node)
        if not self.strategy.isolate or self.strategy.silent or not others:
            return None
        if self.victim is None:
            self.victim = self.rng.choice(others)
        return self.victim

    def send_isolated(self, node: ByzantineNode, kind: str, data: bytes, out: list[Any]) -> None:
        """Route a message of a view a faulty primary leads around the victim; messages of
        the other views (statuses, a correct primary's view) go out as usual."""
        victim = self.isolated(node)
        assert victim is not None
        if kind == "value":
            return  # the victim is the only correct holder of the value: it alone answers
        env = node.decoder.envelope(data)
        if kind == "status":  # no lock (see _send_status), and at once: first at the next primary
            out.extend(Targeted((m,), kind, data, 0) for m in node.membership.node_ids)
            return
        if kind == "sync" or node.primary(env.round, env.view) not in self.members:
            self.send(node, kind, data, out)
            return
        for m in self.members:
            if m != node.node_id:
                out.append(Targeted((m,), kind, data, 0))
        if kind == "prop":
            # land one delta and a millisecond before the others' earliest deadline, so
            # that the victim's vote (with the header only) reaches them just before it
            dues = [_next_deadline(self.sim, m) for m in self.others(node) if m != victim]
            due = min((d for d in dues if d is not None), default=None) if self.sim else None
            at = node.now if due is None else max(node.now, due - node.delta - 1)
            out.append(Targeted((victim,), kind, data, at - node.now))
        elif kind in ("vote", "final"):
            out.append(Targeted((victim,), kind, data, 0))
        elif kind in ("blame", "req"):
            rest = tuple(m for m in self.others(node) if m != victim)
            if rest:
                out.append(Targeted(rest, kind, data, 0))
            if kind == "req":
                out.append(Targeted((victim,), kind, data, 0))

    def send_proposal(self, node: ByzantineNode, raw: bytes, out: list[Any]) -> None:
        """A proposal with its value to `value_to` of the correct nodes, its signed header
        (or nothing) to the others, each at the coalition's moment."""
        others, mode = self.others(node), self.strategy.value_to
        if self.isolated(node) is not None:
            self.send_isolated(node, "prop", raw, out)
            return
        if mode == "all" or not others or self.strategy.silent:
            self.send(node, "prop", raw, out)
            return
        if mode == "one":
            chosen = {self.rng.choice(others)}
        else:
            chosen = {m for m in others if self.rng.random() < 0.5}
        signed = header(node.decoder.envelope(raw))
        for m in self.members:
            if m != node.node_id:
                out.append(Targeted((m,), "prop", raw, 0))
        for dst in others:
            if dst in chosen or self.strategy.header_to_rest:
                data = raw if dst in chosen else signed
                out.append(
                    Targeted((dst,), "prop", data, self.delay_for(dst, node.now, node.delta))
                )


def _next_deadline(sim: Simulator, node_id: str) -> int | None:
    for inst in sim.instances.values():
        if inst.node_id == node_id and inst.up:
            return inst.node.next_deadline()
    return None


class ByzantineNode(Node):
    """A faulty member: honest bookkeeping underneath, the coalition's choices on the wire."""

    def __init__(self, *args: Any, coalition: Coalition, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.coalition = coalition
        coalition.members[self.node_id] = self
        self._alt_requests: dict[RoundId, list[bytes]] = {}

    # --- the wire -------------------------------------------------------------------

    def step(self, event: Event) -> list[Any]:
        honest = super().step(event)
        out: list[Any] = []
        st = self.coalition.strategy
        isolating = self.coalition.isolated(self) is not None
        for action in honest:
            if not isinstance(action, Broadcast):
                out.append(action)
            elif isolating:
                self.coalition.send_isolated(self, action.kind, action.data, out)
            elif action.kind == "value" and st.fetch_answers != "honest":
                if st.fetch_answers == "wrong" and not st.silent:
                    self._wrong_answer(action.data, out)
            elif action.kind == "vote" and st.votes_to_one and not st.silent:
                self._to_one(action.kind, action.data, out)
            else:
                self.coalition.send(self, action.kind, action.data, out)
        if not self.coalition.strategy.silent and not isolating:
            for rs in list(self.rounds.values()):
                self._attack(rs, out)
            if isinstance(event, Open):
                self._flood(event.round, out)
        return out

    def _to_one(self, kind: str, data: bytes, out: list[Any]) -> None:
        co = self.coalition
        for m in co.members:
            if m != self.node_id:
                out.append(Targeted((m,), kind, data, 0))
        others = co.others(self)
        if others:
            dst = co.rng.choice(others)
            out.append(Targeted((dst,), kind, data, co.delay_for(dst, self.now, self.delta)))

    def _wrong_answer(self, data: bytes, out: list[Any]) -> None:
        """Answer a fetch for (view, digest) with another body of the round, or with the
        right header and a value that does not hash to it."""
        env = self.decoder.envelope(data)
        rs = self.rounds.get(env.round)
        if rs is None:
            return
        others = [p.env.raw for p in rs.bodies.values() if p.env.raw != env.attachment]
        if others and self.coalition.rng.random() < 0.5:
            body = self.coalition.rng.choice(others)
        else:
            stmt, sender, sig, (value, vote, just) = codec.decode(env.attachment)
            body = codec.encode([stmt, sender, sig, [[value[0], ["wrong", value[1]]], vote, just]])
        answer = statement("value", self.market, rs.rid, env.view, env.ref)
        sealed = seal(self.node_id, self.signer.sign(answer), answer, body)
        self.coalition.send(self, "value", sealed, out)

    # --- as primary: up to three variants per view ------------------------------------

    def _publish_proposal(
        self, rs: _Round, value: Value, justification: Any, out: list[Any]
    ) -> None:
        variants = [(value, justification)]
        isolating = self.coalition.isolated(self) is not None
        if isolating:
            # one value, and not the one a correct next primary would propose afresh
            variants = [self._variant(rs, value, justification, 1) or variants[0]]
        for i in range(1, 1 if isolating else self.coalition.strategy.variants):
            alt = self._variant(rs, value, justification, i)
            if alt is not None:
                variants.append(alt)
        rs.proposed.add(rs.view)
        for val, just in variants:
            raw, _ = self.sign_proposal(rs, val, just)
            self._on_proposal(rs, self.decoder.envelope(raw))
            self.coalition.send_proposal(self, raw, out)
        rs.voted[rs.view] = value.digest
        rs.vote_time[rs.view] = self.now
        if isolating:
            # blame our own view at once towards the others, so that they leave it before
            # the value they fetch from the victim comes back
            self._blame(rs, rs.view, [], out)

    def _check_vcc(self, rs: _Round, out: list[Any]) -> None:
        super()._check_vcc(rs, out)
        if rs.waiting and self.coalition.isolated(self) is not None:
            rs.wait_until = self.now  # a faulty member need not wait to send its status

    def _commit_duty(self, rs: _Round, out: list[Any]) -> None:
        if self.coalition.isolated(self) is None:  # an isolating coalition never commits,
            super()._commit_duty(rs, out)  # so it votes for whatever comes next

    def _variant(
        self, rs: _Round, value: Value, justification: Any, i: int
    ) -> tuple[Value, Any] | None:
        """Another proposal a correct backup may accept: our own request signed another way,
        or (view > 0) the same value justified by another choice of statuses."""
        if justification is not None and i == 2:
            statuses = list(self.rounds[rs.rid].statuses.get(rs.view, {}).values())
            if len(statuses) > self.q:
                pick = sorted(self.coalition.rng.sample(statuses, self.q))
                return value, [pick, justification[1]]
        if justification is not None and justification[1] is not None:
            return None  # a locked value: backups accept nothing else
        stmt = statement("req", self.market, rs.rid, 0, bytes([i]) * 8, self.node_id, i)
        alt = self.decoder.request(seal(self.node_id, self.signer.sign(stmt), stmt))
        requests = {r.submitter: r for r in value.requests}
        requests[self.node_id] = alt
        ordered = tuple(requests[s] for s in sorted(requests))
        try:
            result = self.make_result(rs.rid, ordered)
        except Exception:  # noqa: BLE001 - a contract that refuses the variant: no variant
            return None
        cbor = [[r.raw for r in ordered], result]
        return self.decoder.value(self.market, rs.rid, cbor), justification

    # --- as a status sender: which lock to report -------------------------------------

    def _on_status(self, rs: _Round, env: Any) -> None:
        if env.sender != self.coalition.isolated(self):  # as next primary: not the victim's
            super()._on_status(rs, env)

    def _send_status(self, rs: _Round, out: list[Any]) -> None:
        lie = "none" if self.coalition.isolated(self) else self.coalition.strategy.status_lie
        keep = rs.lock
        if lie == "none":
            rs.lock = None
        elif lie == "lowest" and rs.qcs:
            usable = [k for k in rs.qcs if k in rs.qc_header and k[1] in rs.values]
            if usable:
                rs.lock = min(usable)
        try:
            super()._send_status(rs, out)
        finally:
            rs.lock = keep

    # --- everything else --------------------------------------------------------------

    def _attack(self, rs: _Round, out: list[Any]) -> None:
        st, co = self.coalition.strategy, self.coalition
        rid = rs.rid
        for view, headers in list(rs.headers.items()):
            for env in list(headers.values()):
                vd = env.ref
                if st.double_vote and co.once(self.node_id, rid, "vote", view, vd):
                    stmt = vote_statement(self.market, rid, view, vd)
                    co.send(self, "vote", seal(self.node_id, self.signer.sign(stmt), stmt, env.raw),
                            out)  # fmt: skip
            if st.bundle and len(headers) >= 1 and co.once(self.node_id, rid, "bundle", view):
                evidence = [e.raw for e in headers.values()][:2]
                for blamed in {view, view + 1}:
                    stmt = blame_statement(self.market, rid, blamed, self.primary(rid, blamed))
                    sig = self.signer.sign(stmt)
                    co.send(self, "blame", seal(self.node_id, sig, stmt, evidence), out)
        if st.blame_spam and co.once(self.node_id, rid, "blame", rs.view):
            stmt = blame_statement(self.market, rid, rs.view, self.primary(rid, rs.view))
            co.send(self, "blame", seal(self.node_id, self.signer.sign(stmt), stmt, []), out)
        for key, qc in list(rs.qcs.items()):
            if st.false_finals and co.once(self.node_id, rid, "final", key[1]):
                stmt = final_statement(self.market, rid, key[1])
                co.send(self, "final", seal(self.node_id, self.signer.sign(stmt), stmt), out)
            if st.forward and co.once(self.node_id, rid, "cert", key):
                stmt = statement("cert", self.market, rid, key[0], codec.digest(qc.statement))
                attachment = [qc.to_cbor(), rs.qc_header.get(key)]
                co.send(self, "cert", seal(self.node_id, self.signer.sign(stmt), stmt, attachment),
                        out)  # fmt: skip
        if st.forward:
            for view, vcc in list(rs.vcc.items()):
                if co.once(self.node_id, rid, "vcc", view):
                    stmt = statement("cert", self.market, rid, view, codec.digest(vcc.statement))
                    co.send(self, "cert",
                            seal(self.node_id, self.signer.sign(stmt), stmt, [vcc.to_cbor(), None]),
                            out)  # fmt: skip

    def _flood(self, rid: RoundId, out: list[Any]) -> None:
        """12n+1 copies of one signed sync for the next round (the de-duplication) and more
        distinct messages for it than the per-sender hold quota (the bound)."""
        if not self.coalition.strategy.flood:
            return
        ahead = RoundId(rid.seq + 1, "settle" if rid.kind == "clear" else "clear")
        stmt = statement("sync", self.market, ahead, 0, b"")
        copy = seal(self.node_id, self.signer.sign(stmt), stmt)
        for _ in range(12 * self.n + 1):
            self.coalition.send(self, "sync", copy, out)
        for view in range(self.coalition.strategy.flood):
            blame = blame_statement(self.market, ahead, view, self.primary(ahead, view))
            self.coalition.send(
                self, "blame", seal(self.node_id, self.signer.sign(blame), blame, []), out
            )


class ScheduledLink:
    """Correct-to-correct delays within delta, chosen by the adversary's scheduler."""

    MODES = ("uniform", "extreme", "snipe", "slow_victim")

    def __init__(self, sim: Simulator, rng: random.Random, mode: str, victim: str) -> None:
        self.sim, self.rng, self.mode, self.victim = sim, rng, mode, victim

    def __call__(self, src: Instance, dst: Instance, data: bytes, now: int) -> int | None:
        delta = self.sim.delta
        if self.mode == "extreme":
            return delta if self.rng.random() < 0.5 else 0
        if self.mode == "slow_victim":
            return delta if self.victim in (src.node_id, dst.node_id) else self.rng.randint(0, 1)
        if self.mode == "snipe":
            due = dst.node.next_deadline() if dst.up else None
            if due is not None and now <= due - 1 <= now + delta and self.rng.random() < 0.7:
                return min(delta, max(0, due - now + self.rng.choice([-1, 0, 1])))
        return self.rng.randint(0, delta)


__all__ = ["ByzantineNode", "Coalition", "Message", "ScheduledLink", "Strategy"]
