"""Named regressions for the adversarial review of SDBFT (issue 11), on the real `Node`.

Each finding is replayed as the attack that broke the old state machine, with
every correct-to-correct delay within delta and correct opens within delta of
each other, over many seeded timings (the old code failed a share of them);
the properties are the simulator's: agreement over commits and finals, one
finality certificate per round from everything ever published, and every
correct node committing within `liveness_bound_ms`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from edge_agent.consensus.contracts import Tally
from edge_agent.consensus.messages import (
    Decoder,
    RoundId,
    Value,
    blame_statement,
    seal,
    statement,
    vote_statement,
)
from edge_agent.consensus.node import Broadcast, Node, _Round
from edge_agent.consensus.sim import Simulator, Targeted
from tests.consensus.scenarios import (
    Built,
    PropertyViolation,
    Scenario,
    _market,
    build,
    check,
)

R0 = RoundId(0, "settle")
R_CLEAR = RoundId(0, "clear")


def own_variants(
    node: Node, rs: _Round, value: Value, count: int, drop: tuple[str, ...] = (), first: int = 0
) -> list[Value]:
    """`count` values a correct backup accepts (unless its request is among `drop`, left
    out): the primary's own request signed differently."""
    out = []
    for i in range(first, first + count):
        stmt = statement("req", node.market, rs.rid, 0, bytes([i + 1]) * 8, node.node_id, 100 + i)
        mine = node.decoder.request(seal(node.node_id, node.signer.sign(stmt), stmt))
        requests = {r.submitter: r for r in value.requests if r.submitter not in drop}
        requests[node.node_id] = mine
        ordered = tuple(requests[s] for s in sorted(requests))
        result = node.make_result(rs.rid, ordered)
        out.append(node.decoder.value(node.market, rs.rid, [[r.raw for r in ordered], result]))
    return out


@dataclass
class Plan:
    """What a colluding coalition knows and wants: the simulator (an adaptive adversary reads
    every node's next deadline), the correct node `h` that is to commit B and the correct
    nodes `cs` that are to be led elsewhere."""

    sim: Simulator
    h: str
    cs: tuple[str, ...]
    rng: random.Random
    t_commit_h: int = 0  # when h will treat B as final (known once h has B)

    def deadline(self, node_id: str) -> int:
        due = self.sim.instances[node_id].node.next_deadline()
        assert due is not None
        return due


class SplitColluder(Node):
    """Finding 1 (n = 3, f = 1 and n = 5, f = 2). As the view-0 primary: waits for the
    backups `cs` to blame view 0 without evidence (their proposal deadline), then shows them
    two proposals X and Y one millisecond later -- or bundles both into a blame for an
    unrelated view -- and shows `h` a third proposal B at the same moment. All colluders vote
    B towards h only, attest only B towards h, blame view 0 towards the cs only, and in view 1
    report no lock to the cs, holding their statuses back until h has treated B as final, and
    vote for whatever fresh value a c proposes there."""

    def __init__(self, *args: Any, plan: Plan, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.bundle = plan.rng.random() < 0.3
        self.voted: set[tuple[int, bytes]] = set()

    def _publish_proposal(self, rs: _Round, value: Value, justification: Any, out: Any) -> None:
        if rs.view != 0:
            super()._publish_proposal(rs, value, justification, out)
            return
        plan = self.plan
        # X and Y leave the cs' requests out: a c that blamed already neither votes for
        # them nor (in the old node) relayed them; B is fine for everyone
        x, y = own_variants(self, rs, value, 2, drop=plan.cs)
        (b,) = own_variants(self, rs, value, 1, first=2)
        raws = {}
        for name, val in (("x", x), ("y", y), ("b", b)):
            raws[name], _ = self.sign_proposal(rs, val, justification)
        rs.proposed.add(0)
        self._on_proposal(rs, self.decoder.envelope(raws["b"]))
        rs.voted[0] = b.digest
        rs.vote_time[0] = self.now
        late = max(plan.deadline(c) for c in plan.cs) + 1
        at_h = late + plan.rng.randint(0, 2)
        plan.t_commit_h = at_h + 2 * self.delta + 1
        blame = blame_statement(self.market, rs.rid, 0, self.node_id)
        blame_raw = seal(self.node_id, self.signer.sign(blame), blame, [])
        status = statement("status", self.market, rs.rid, 1, b"", -1)  # "I hold no lock"
        status_raw = seal(self.node_id, self.signer.sign(status), status)
        for c in plan.cs:
            # c leaves view 0 only once h has treated B as final (its relay comes too late)
            out.append(Targeted((c,), "blame", blame_raw, plan.t_commit_h + 1 - self.now))
            out.append(Targeted((c,), "status", status_raw, plan.t_commit_h + 2 - self.now))
            at = plan.deadline(c) + 1 - self.now
            if self.bundle:
                stmt = statement("blame", self.market, rs.rid, 7, self.primary(rs.rid, 7))
                evidence = [raws["x"], raws["y"]]
                data = seal(self.node_id, self.signer.sign(stmt), stmt, evidence)
                out.append(Targeted((c,), "blame", data, at))
            else:
                out.append(Targeted((c,), "prop", raws["x"], at))
                out.append(Targeted((c,), "prop", raws["y"], at))
        out.append(Targeted((plan.h,), "prop", raws["b"], at_h - self.now))

    def _try_final(self, rs: _Round, out: Any) -> bool:
        return False  # stay in the round whatever gets decided

    def step(self, event: Any) -> list[Any]:
        plan, out = self.plan, self._rewrite(super().step(event))
        for rs in self.rounds.values():  # vote for whatever a c proposes after view 0
            for view, headers in rs.headers.items():
                for env in headers.values():
                    if view > 0 and env.sender in plan.cs and (view, env.ref) not in self.voted:
                        self.voted.add((view, env.ref))
                        stmt = vote_statement(self.market, rs.rid, view, env.ref)
                        data = seal(self.node_id, self.signer.sign(stmt), stmt, env.raw)
                        out.append(Targeted(plan.cs, "vote", data, 0))
        return out

    def _rewrite(self, actions: list[Any]) -> list[Any]:
        plan, out = self.plan, []
        for action in actions:
            if not isinstance(action, Broadcast):
                out.append(action)
                continue
            env = self.decoder.envelope(action.data)
            others = tuple(m for m in self.membership.node_ids if m != self.node_id)
            to, delay = others, plan.rng.randint(0, self.delta)
            if action.kind in ("vote", "final") and env.view == 0:
                to = (plan.h,)
            elif action.kind in ("blame", "status", "vote", "cert"):
                to = plan.cs
                if action.kind == "status":  # hold the status back until h has committed
                    delay = max(delay, plan.t_commit_h + 1 - self.now)
            out.append(Targeted(to, action.kind, action.data, delay))
        return out

    def _send_status(self, rs: _Round, out: Any) -> None:
        keep, rs.lock = rs.lock, None  # report no lock
        try:
            super()._send_status(rs, out)
        finally:
            rs.lock = keep


def split_market(
    seed: int, n: int, faulty: list[str], cs: tuple[str, ...], h: str, cls: type[Node]
) -> Built:
    """One round of n nodes, the `faulty` ones colluding as `cls`; the cs open first, h
    last (within delta), links between correct nodes random within delta."""
    sc = Scenario(seed=seed, n=n, delta=10, rounds=1, faults=dict.fromkeys(faulty, "tamper"))
    built = build(sc)
    sim = built.sim
    signers, keyring = _market([f"n{i}" for i in range(n)], False)
    plan = Plan(sim, h, cs, random.Random(seed))
    for name in faulty:
        inst = sim.instances[name]
        inst.node = cls(
            signers[name], keyring, inst.node.contracts, delta_ms=sc.delta,
            decoder=inst.node.decoder, plan=plan,
        )  # fmt: skip
    # replace the scenario's opens: the cs at 5, the faulty at 5..15, h at 12..15
    sim._queue = [e for e in sim._queue if e[2] != "open"]
    rng = random.Random(seed + 1)
    for name in sim.instances:
        when = 5 if name in cs else (rng.randint(12, 15) if name == h else rng.randint(5, 15))
        sim.open(when, name, {"round": R0, "deposit": name.encode() * 2, "body": 1})
    built.opens.clear()
    built.opens[R0] = 5
    sim.link = lambda src, dst, data, now: rng.randint(0, sc.delta)
    return built


@pytest.mark.parametrize(
    ("n", "faulty", "cs", "h"),
    [(3, ["n0"], ("n1",), "n2"), (5, ["n0", "n4"], ("n1", "n3"), "n2")],
)
def test_finding1_primary_splitting_three_proposals_cannot_finalise_two_values(
    n: int, faulty: list[str], cs: tuple[str, ...], h: str
) -> None:
    """The old node dropped B at c as a third proposal, so c could not lock on it, refused
    h's status, proposed a fresh C in view 1 and committed it: two finality certificates.
    Now c relays X and Y although it blamed already (h sees them within its window), and
    would keep B's value (named by h's vote) if it did not."""
    failures = []
    for seed in range(60):
        try:
            check(split_market(seed, n, faulty, cs, h, SplitColluder))
        except PropertyViolation as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of 60 timings failed:\n" + "\n".join(failures[:3])


def test_finding1_a_node_that_blamed_still_relays_equivocation_it_learns_later() -> None:
    """c blamed view 0 without evidence; two proposals of the primary arrive afterwards: c
    relays them (a blame with both as evidence) although it has blamed the view already."""
    built = split_market(3, 3, ["n0"], ("n1",), "n2", SplitColluder)
    built.sim.instances["n0"].node.bundle = False  # type: ignore[attr-defined]
    built.sim.trace = []
    built.sim.run(built.horizon)
    c = built.sim.instances["n1"].node
    assert c.stats["equivocation"] >= 1
    assert len([line for line in built.sim.trace if " n1 -> blame" in line]) >= 2


class SyncFlooder(Node):
    """Finding 2: a member publishing 12n+1 copies of its signed `sync` for the next round."""

    def step(self, event: Any) -> list[Any]:
        out = super().step(event)
        if event.__class__.__name__ == "Open" and event.round.seq == 0:
            ahead = RoundId(1, "clear")
            stmt = statement("sync", self.market, ahead, 0, b"")
            copy = seal(self.node_id, self.signer.sign(stmt), stmt)
            out += [Broadcast("sync", copy)] * (12 * self.membership.n + 1)
            for view in range(20):  # and distinct messages: the per-sender quota
                blame = statement("blame", self.market, ahead, view, self.primary(ahead, view))
                out.append(Broadcast("blame", seal(self.node_id, self.signer.sign(blame), blame)))
        return out


def test_finding2_a_flooding_member_cannot_make_the_next_round_recovering() -> None:
    ids = ["n0", "n1", "n2"]
    signers, keyring = _market(ids, False)
    decoder = Decoder()
    sim = Simulator(10, 5, decoder=decoder)
    contracts = {"clear": Tally(), "settle": Tally()}
    for node_id in ids:
        cls = SyncFlooder if node_id == "n2" else Node
        sim.add(node_id, cls(signers[node_id], keyring, contracts, delta_ms=10, decoder=decoder))
    for node_id in ids:
        sim.open(0, node_id, {"round": R0, "body": 1})
        sim.open(60, node_id, {"round": RoundId(1, "clear"), "body": 2})
    sim.run(2000)
    for node_id in ("n0", "n1"):
        inst = sim.instances[node_id]
        node = inst.node
        assert RoundId(1, "clear") in inst.commits, node_id
        assert node.stats["held_duplicate"] >= 12 * 3 or node.stats["held_sync_ignored"] > 0
        assert not node.overflowed
        assert inst.commits[RoundId(1, "clear")][0] - 60 <= 7 * 10 + 2


class LaggardKeeper(Node):
    """Finding 3 (n = 3, f = 1). The view-0 primary shows B to h only; c learns it from h's
    vote and votes too, and exactly at the end of c's 2-delta window it receives a second
    proposal X, so c does not treat B as final while h (whose window ended just before c's
    relay arrives) does, and decides with the colluder's attestation. The colluder never
    votes again and blames with c in every view, so c's views never succeed: only the
    decided h can hand c the result."""

    def __init__(self, *args: Any, plan: Plan, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan

    def _publish_proposal(self, rs: _Round, value: Value, justification: Any, out: Any) -> None:
        if rs.view != 0:
            return  # never lead again
        b, x = own_variants(self, rs, value, 2)
        raw_b, _ = self.sign_proposal(rs, b, justification)
        raw_x, _ = self.sign_proposal(rs, x, justification)
        rs.proposed.add(0)
        self._on_proposal(rs, self.decoder.envelope(raw_b))
        rs.voted[0] = b.digest
        rs.vote_time[0] = self.now
        out.append(Targeted((self.plan.h,), "prop", raw_b, 0))
        sim, c = self.plan.sim, self.plan.cs[0]

        def at_the_end_of_cs_window() -> None:
            crs = sim.instances[c].node.rounds.get(rs.rid)  # type: ignore[attr-defined]
            if crs is not None and 0 in crs.vote_time:
                sim.inject(crs.vote_time[0] + 2 * self.delta, raw_x, self.node_id, [c])

        sim.at(self.now + 2 * self.delta + 1, at_the_end_of_cs_window)

    def _try_final(self, rs: _Round, out: Any) -> bool:
        return False  # stay in the round whatever gets decided

    def step(self, event: Any) -> list[Any]:
        plan, out = self.plan, []
        actions = super().step(event)
        for rs in self.rounds.values():  # blame every view c blames, at once
            for view, blames in list(rs.blames.items()):
                if any(c in blames for c in plan.cs) and view not in rs.blamed:
                    self._blame(rs, view, [], actions)
        for action in actions:
            if not isinstance(action, Broadcast):
                out.append(action)
            elif action.kind == "final":
                out.append(Targeted((plan.h,), "final", action.data, 0))
            elif action.kind in ("blame", "status", "req"):
                out.append(Targeted(plan.cs, action.kind, action.data, 0))
        return out


def test_finding3_a_decided_node_hands_a_lagging_node_the_certificate() -> None:
    """The old decided node ignored c's blames and statuses and c asked for the decision only
    8 delta after a blame, a timer every view entry restarted: c committed far beyond the
    bound (or never). Now h answers c's first blame with its finality certificate."""
    failures = []
    for seed in range(60):
        try:
            check(split_market(seed, 3, ["n0"], ("n1",), "n2", LaggardKeeper))
        except PropertyViolation as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of 60 failed:\n" + "\n".join(failures[:3])


def test_finding4_a_status_whose_lock_was_a_third_proposal_is_accepted_in_time() -> None:
    """The old node refused h's status ("status lock comes without its value") when B had
    reached it as a third proposal, which also stalled view changes far beyond the bound.
    Under the finding-1 attack every status is accepted now and every round commits in time."""
    for seed in range(30):
        built = split_market(seed, 3, ["n0"], ("n1",), "n2", SplitColluder)
        check(built)  # includes every correct node's commit within liveness_bound_ms
        for name in ("n1", "n2"):
            node = built.sim.instances[name].node
            assert node.stats["invalid_status"] == 0, (seed, name, node.last_error)  # type: ignore[attr-defined]


def test_finding5_a_censoring_primary_with_a_colluder_cannot_drop_relayed_requests(
    market,
) -> None:
    """n = 5, f = 2: the view-0 primary leaves out a participant's bid (sent ahead, held by
    every member before it opens) and a correct member's request (it opened first, so the
    others relay it); the colluder votes for everything. Every correct backup relayed both
    and votes no, so no certificate forms without a correct vote: the next primary commits
    a value with both."""
    from tests.consensus.byzantine import Censor, Liar
    from tests.consensus.conftest import auction_bids

    mk = market(5, classes={"n0": Censor, "n4": Liar},
                kwargs={"n0": {"victims": frozenset({"n2", "p0"})}})  # fmt: skip
    bids = auction_bids(mk.ids)
    bid = mk.request("p0", R_CLEAR, {"side": "buy", "wh": 700, "price": 240})
    mk.sim.inject(0, bid, "p0")
    mk.open_all(R_CLEAR, 5, bids, skew={"n2": -4})
    mk.sim.run(100 * mk.delta)
    correct = ["n1", "n2", "n3"]
    digests = {mk.inst(name).commits[R_CLEAR][1] for name in correct}
    assert len(digests) == 1
    commit = next(a for a in mk.inst("n1").actions if a.round == R_CLEAR)
    assert commit.view >= 1
    assert {"n2", "p0"} <= {r.submitter for r in commit.value.requests}
    for name in ("n1", "n3"):
        assert mk.node(name).stats["rejected_proposal"] == 1, name


def test_finding6_a_node_committing_one_value_and_finalising_another_is_flagged() -> None:
    """The old simulator compared commits with commits and finals with finals only."""
    from edge_agent.consensus.node import Commit, Final

    class Flip:
        node_id = "x"

        def step(self, event: Any) -> list[Any]:
            return []

        def next_deadline(self) -> int | None:
            return None

    sim = Simulator(10, 1)
    inst = sim.add("x", Flip())
    value: Any = None
    sim.apply(inst, [Commit(R0, 0, b"B" * 32, value, None)])
    sim.apply(inst, [Final(R0, b"C" * 32, value, None)])  # type: ignore[arg-type]
    assert inst.conflicts == [(R0, b"B" * 32, b"C" * 32)]
