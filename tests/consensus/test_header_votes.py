"""Votes carry the primary's signed header, never the value: the attack this opens, as a
named regression, and the fetch by digest under faulty answerers.

The counterexample (n = 5, f = 2): the faulty view-0 primary P shows its proposal B (with
the value) to the correct h alone, its colluder B2 votes B towards h alone, so h holds the
QC {P, B2, h}; the correct x and y see only B's signed header (in h's vote), blame before
their fetch of the value comes back, and enter view 1 without a lock. Under the old fast
rule (QC and no blame within 2 delta; one delta before the status) h commits B and B2,
the view-1 primary, leads x and y to a fresh C with their lock-less statuses: two values.
The fast rule now also needs every member's vote, and a status waits 2 delta, so h
forwards the QC with the header instead and x and y lock B before their statuses.
"""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.consensus.contracts import Tally
from edge_agent.consensus.messages import (
    Decoder,
    Envelope,
    RoundId,
    Value,
    blame_statement,
    header,
    seal,
    statement,
)
from edge_agent.consensus.node import (
    Broadcast,
    Message,
    Node,
    Open,
    Tick,
    _Round,
    liveness_bound_ms,
)
from edge_agent.consensus.sim import Simulator, Targeted, node_names
from meterchain import codec
from tests.consensus.scenarios import Built, PropertyViolation, Scenario, _market, check
from tests.consensus.test_findings import own_variants

DELTA = 10
R0 = RoundId(0, "settle")
P, B2, H, X, Y = node_names(5)  # rotation: P leads view 0, B2 view 1
T_H = 3 * DELTA + 1  # when h gets B: its 2-delta window ends just before x's blame reaches it


class OldFastRule(Node):
    """The correct node with the fast rule and status wait of value-carrying votes: commit
    2 delta after the vote on a QC held by then and no blame seen by then; one delta between
    leaving a view and the status. A test double only: it shows why both changed."""

    def _commit_duty(self, rs: _Round, out: list[Any]) -> None:
        v = rs.view
        if rs.committed is not None or v not in rs.voted or len(rs.headers.get(v, {})) > 1:
            return
        vd, window_end = rs.voted[v], rs.vote_time[v] + 2 * self.delta
        qc_at, blame_at = rs.qc_time.get((v, vd)), rs.blame_first.get(v)
        if qc_at is not None and qc_at <= window_end and (blame_at or window_end + 1) > window_end:
            if self.now > window_end:
                self._commit(rs, v, vd, out)
            return
        super()._commit_duty(rs, out)

    def _check_vcc(self, rs: _Round, out: list[Any]) -> None:
        waiting = rs.waiting
        super()._check_vcc(rs, out)
        if rs.waiting and not waiting:
            rs.wait_until -= self.delta


class Withholder(Node):
    """P: proposes B (its own request signed another way) with the value to h alone, at
    T_H, and to its colluder; blames view 0 towards x and y at once; otherwise silent."""

    def _publish_proposal(self, rs: _Round, value: Value, justification: Any, out: Any) -> None:
        (b,) = own_variants(self, rs, value, 1)
        raw, _ = self.sign_proposal(rs, b, justification)
        rs.proposed.add(rs.view)
        self._on_proposal(rs, self.decoder.envelope(raw))
        rs.voted[rs.view], rs.vote_time[rs.view] = b.digest, self.now
        out.append(Targeted((B2,), "prop", raw, 0))
        out.append(Targeted((H,), "prop", raw, T_H - self.now))
        stmt = blame_statement(self.market, rs.rid, 0, self.node_id)
        out.append(Targeted((X, Y), "blame", seal(self.node_id, self.signer.sign(stmt), stmt), 0))

    def step(self, event: Any) -> list[Any]:
        return [a for a in super().step(event) if not isinstance(a, Broadcast) or a.kind == "req"]


class Colluder(Node):
    """B2: votes B towards h alone and is otherwise silent in view 0, never commits; as the
    view-1 primary it ignores h's status and reports no lock of its own."""

    def _commit_duty(self, rs: _Round, out: list[Any]) -> None:
        return

    def _on_status(self, rs: _Round, env: Envelope) -> None:
        if env.sender != H:
            super()._on_status(rs, env)

    def _send_status(self, rs: _Round, out: Any) -> None:
        keep, rs.lock = rs.lock, None
        try:
            super()._send_status(rs, out)
        finally:
            rs.lock = keep

    def step(self, event: Any) -> list[Any]:
        out: list[Any] = []
        for action in super().step(event):
            if isinstance(action, Broadcast) and action.kind != "req":
                env = self.decoder.envelope(action.data)
                if env.view == 0 and action.kind != "status":
                    if action.kind == "vote":
                        out.append(Targeted((H,), "vote", action.data, 0))
                    continue
            out.append(action)
        return out


def withheld_value_market(correct: type[Node]) -> Built:
    """The counterexample: every correct-to-correct message takes exactly delta."""
    ids = node_names(5)
    signers, keyring = _market(ids, False)
    decoder = Decoder()
    sim = Simulator(DELTA, 0, decoder=decoder)
    contracts = {"clear": Tally(), "settle": Tally()}
    classes = {P: Withholder, B2: Colluder}
    for node_id in ids:
        cls = classes.get(node_id, correct)
        sim.add(node_id, cls(signers[node_id], keyring, contracts, delta_ms=DELTA, decoder=decoder))
        sim.open(0, node_id, {"round": R0, "body": 1})
    sim.link = lambda src, dst, data, now: DELTA
    sim.keep_history = True
    horizon = liveness_bound_ms(DELTA, 2) + 60 * DELTA
    sc = Scenario(seed=0, n=5, delta=DELTA, rounds=1, faults={P: "byzantine", B2: "byzantine"})
    correct_ids = [H, X, Y]
    return Built(sc, sim, {R0: 0}, correct_ids, correct_ids, correct_ids, horizon, keyring)


def test_withheld_value_breaks_the_old_fast_rule_with_header_only_votes() -> None:
    """The demonstration: header-only votes with the old rules commit two values."""
    with pytest.raises(PropertyViolation, match="SAFETY"):
        check(withheld_value_market(OldFastRule))


def test_withheld_value_every_correct_node_commits_b() -> None:
    built = withheld_value_market(Node)
    check(built)
    sim = built.sim
    x = sim.instances[X].node
    b_digest = sim.instances[H].commits[R0][1]
    assert {sim.instances[n].commits[R0][1] for n in (H, X, Y)} == {b_digest}
    assert x.stats["fetch"] >= 1, "x saw B's header only (in h's vote) and fetched the value"
    assert sim.publishes["cert"] >= 1, "h forwarded the QC with the signed header"
    assert sim.instances[H].commits[R0][0] > T_H + 2 * DELTA + 1, "no fast commit for h"


class WrongAnswers(Node):
    """A faulty member that answers every fetch at once with the right header and a value
    that does not hash to it ("corrupt"), or never answers ("silent"). (The adversary's
    coalition also answers with another proposal of the view: `adversary.py`.)"""

    def __init__(self, *args: Any, tamper: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper

    def step(self, event: Any) -> list[Any]:
        out = [
            a for a in super().step(event) if not (isinstance(a, Broadcast) and a.kind == "value")
        ]
        data = getattr(event, "data", None)
        if data is None or self.tamper == "silent":
            return out
        env = self.decoder.envelope(data)
        if env.tag != "sync" or not env.ref or env.round not in self.rounds:
            return out
        rs = self.rounds[env.round]
        for prop in list(rs.bodies.values()):
            raw = prop.env.raw
            if self.tamper == "corrupt":
                stmt, sender, sig, (value, vote, just) = codec.decode(raw)
                raw = codec.encode([stmt, sender, sig, [[value[0], {"sum": -1}], vote, just]])
            answer = statement("value", self.market, rs.rid, env.view, env.ref)
            sealed = seal(self.node_id, self.signer.sign(answer), answer, raw)
            out.append(Targeted((env.sender,), "value", sealed, 0))
        return out


@pytest.mark.parametrize("tamper", ["silent", "corrupt"])
def test_a_fetch_answered_wrongly_or_not_at_all_is_still_served_by_a_correct_holder(
    tamper: str,
) -> None:
    """n = 3: c gets the proposal's header only (in b's vote) and fetches; the faulty a (the
    primary) answers first with a body that does not hash to the header, or not at all; the
    correct b's answer arrives and c votes; the round commits everywhere."""
    ids = node_names(3)
    signers, keyring = _market(ids, False)
    decoder = Decoder()
    sim = Simulator(DELTA, 0, decoder=decoder)
    contracts = {"clear": Tally(), "settle": Tally()}

    class PrimaryToB(WrongAnswers):
        def step(self, event: Any) -> list[Any]:
            out = []
            for a in super().step(event):
                if isinstance(a, Broadcast) and a.kind == "prop":
                    a = Targeted(("n1",), "prop", a.data, 0)  # the value to b only
                out.append(a)
            return out

    for node_id in ids:
        if node_id == "n0":
            node: Node = PrimaryToB(
                signers[node_id], keyring, contracts, delta_ms=DELTA, decoder=decoder,
                tamper=tamper,
            )  # fmt: skip
        else:
            node = Node(signers[node_id], keyring, contracts, delta_ms=DELTA, decoder=decoder)
        sim.add(node_id, node)
        sim.open(0, node_id, {"round": R0, "body": 1})
    sim.link = lambda src, dst, data, now: DELTA
    sim.keep_history = True
    sc = Scenario(seed=0, n=3, delta=DELTA, rounds=1, faults={"n0": "byzantine"})
    horizon = liveness_bound_ms(DELTA, 1) + 60 * DELTA
    check(Built(sc, sim, {R0: 0}, ["n1", "n2"], ["n1", "n2"], ["n1", "n2"], horizon, keyring))
    c = sim.instances["n2"].node
    assert c.stats["fetch"] == 1
    assert c.stats["invalid_prop"] == (1 if tamper == "corrupt" else 0)
    assert sim.instances["n2"].commits[R0][1] == sim.instances["n1"].commits[R0][1]


def test_headers_without_values_stay_two_per_view_and_are_never_voted_for() -> None:
    """A primary that signs five proposals for one view and sends their headers only: the
    backup asks for the first one's value, keeps two headers (the proof of equivocation)
    and no body, counts the other three, never votes, and relays the proof once."""
    ids = node_names(3)
    signers, keyring = _market(ids, False)
    contracts = {"clear": Tally(), "settle": Tally()}
    a, b = (Node(signers[i], keyring, contracts, delta_ms=DELTA) for i in ("n0", "n1"))
    reqs = {}
    for name, node in (("n0", a), ("n1", b)):
        (req,) = [x for x in node.step(Open(0, R0, b"dep", 1)) if isinstance(x, Broadcast)]
        reqs[name] = req.data
    b.step(Message(1, reqs["n0"], "n0"))
    proposal = [x for x in a.step(Tick(2 * DELTA + 1)) if isinstance(x, Broadcast)]
    value = a.decoder.proposal(proposal[0].data).value
    assert value is not None
    variants = own_variants(a, a.rounds[R0], value, 5)
    headers = [header(a.decoder.envelope(a.sign_proposal(a.rounds[R0], v, None)[0]))
               for v in variants]  # fmt: skip
    out: list[Any] = []
    for i, raw in enumerate(headers):
        out += b.step(Message(2 * DELTA + 2 + i, raw, "n0"))
    rs = b.rounds[R0]
    assert len(rs.headers[0]) == 2 and not rs.bodies and 0 not in rs.voted
    assert b.stats["variant_dropped"] == 3 and b.stats["fetch"] == 1
    blames = [x for x in out if isinstance(x, Broadcast) and x.kind == "blame"]
    assert len(blames) == 1
    assert sorted(b.decoder.envelope(blames[0].data).attachment) == sorted(headers[:2])
