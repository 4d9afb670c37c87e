"""Exhaustive mode: every combination of a bounded adversary's choices for n = 3, one view change.

Members n0, n1, n2 (in rotation order) run one round; n0 is faulty and the
view-0 primary, n1 the (correct) view-1 primary; n1 opens at 0, n2 at delta.
n0 signs four proposals for view 0: A and B hold every request, X and Y leave
out n1's and n2's (a correct node that gets one of them votes no). Enumerated,
every combination of, for each correct node separately:

- what it gets from n0 in view 0: nothing, A, B, X then Y, A then X, or X and
  Y bundled into one blame as evidence (6 options),
- when: delta after n0 proposes, one millisecond before the node's proposal
  deadline, or one after it (3),
- n0's blame of view 0: none, or arriving one millisecond after the latest
  moment a correct node could treat a value as final (2);

and globally n0's view-1 status (its true lock, or none, arriving with that
late blame) and the delay of every message between n1 and n2 (1 ms or exactly
delta): (6 x 3 x 2)^2 x 2 x 2 = 5,184 schedules, each checked like the random
ones (agreement across commits and finals, one finality certificate from
everything published, every correct node within `liveness_bound_ms`,
catch-up). The review's finding 1 is one of these points.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edge_agent.consensus.contracts import Tally
from edge_agent.consensus.messages import Decoder, RoundId, Value, seal, statement
from edge_agent.consensus.node import Broadcast, Node, _Round, liveness_bound_ms
from edge_agent.consensus.sim import Simulator, Targeted, node_names
from tests.consensus.scenarios import Built, Scenario, _market

DELTA = 4
ROUND = RoundId(0, "settle")
CORRECT = ("n1", "n2")
VIEWS = ("none", "A", "B", "XY", "AX", "bundle")
MOMENTS = ("early", "deadline-1", "deadline+1")
OPENS = {"n0": 0, "n1": 0, "n2": DELTA}
DEADLINE = {n: OPENS[n] + 4 * DELTA + 2 for n in OPENS}
LATE = max(DEADLINE.values()) + 2 * DELTA + 3  # after any correct 2-delta window of view 0


@dataclass(frozen=True)
class Choice:
    """One point of the enumerated space."""

    n1_gets: str
    n1_at: str
    n1_blamed: bool
    n2_gets: str
    n2_at: str
    n2_blamed: bool
    status_lock: bool
    link: int

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.__dict__.items())


def choices() -> Iterator[Choice]:
    per_node = list(itertools.product(VIEWS, MOMENTS, (False, True)))
    for one, two, lock, link in itertools.product(per_node, per_node, (False, True), (1, DELTA)):
        yield Choice(*one, *two, lock, link)


class ScriptedPrimary(Node):
    """n0: in view 0 exactly what the `Choice` says, afterwards the honest code (with the
    status it is told to report)."""

    def __init__(self, *args: Any, choice: Choice, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.choice = choice

    def _variant(self, rs: _Round, value: Value, i: int, drop: tuple[str, ...]) -> Value:
        stmt = statement("req", self.market, rs.rid, 0, bytes([i]) * 8, self.node_id, i)
        mine = self.decoder.request(seal(self.node_id, self.signer.sign(stmt), stmt))
        reqs = {r.submitter: r for r in value.requests if r.submitter not in drop}
        reqs[self.node_id] = mine
        ordered = tuple(reqs[s] for s in sorted(reqs))
        result = self.make_result(rs.rid, ordered)
        return self.decoder.value(self.market, rs.rid, [[r.raw for r in ordered], result])

    def _publish_proposal(self, rs: _Round, value: Value, justification: Any, out: Any) -> None:
        if rs.view != 0:
            super()._publish_proposal(rs, value, justification, out)
            return
        ch = self.choice
        raws = {}
        for i, (name, drop) in enumerate((("A", ()), ("B", ()), ("X", CORRECT), ("Y", CORRECT))):
            raws[name], _ = self.sign_proposal(rs, self._variant(rs, value, i + 1, drop), None)
            self._on_proposal(rs, self.decoder.envelope(raws[name]))
        rs.proposed.add(0)
        rs.voted[0] = self.decoder.envelope(raws["A"]).ref
        rs.vote_time[0] = self.now
        blame = statement("blame", self.market, rs.rid, 0, self.node_id)
        blame_raw = seal(self.node_id, self.signer.sign(blame), blame, [])
        for node in CORRECT:
            gets, at, blamed = (
                getattr(ch, f"{node}_gets"),
                getattr(ch, f"{node}_at"),
                getattr(ch, f"{node}_blamed"),
            )
            when = {"early": self.now + self.delta, "deadline-1": DEADLINE[node] - 1,
                    "deadline+1": DEADLINE[node] + 1}[at]  # fmt: skip
            delay = max(0, when - self.now)
            if gets == "bundle":
                data = seal(self.node_id, self.signer.sign(blame), blame, [raws["X"], raws["Y"]])
                out.append(Targeted((node,), "blame", data, delay))
            elif gets != "none":
                for name in gets:
                    out.append(Targeted((node,), "prop", raws[name], delay))
            if blamed:
                out.append(Targeted((node,), "blame", blame_raw, LATE - self.now))

    def step(self, event: Any) -> list[Any]:
        out = []
        for action in super().step(event):
            if isinstance(action, Broadcast):
                view = self.decoder.envelope(action.data).view
                if action.kind in ("vote", "blame", "cert", "final") and view == 0:
                    continue  # view 0 is scripted
                if action.kind == "status":  # held back like the late blame
                    out.append(Targeted(CORRECT, "status", action.data, max(0, LATE - self.now)))
                    continue
            out.append(action)
        return out

    def _send_status(self, rs: _Round, out: Any) -> None:
        keep = rs.lock
        if not self.choice.status_lock:
            rs.lock = None
        try:
            super()._send_status(rs, out)
        finally:
            rs.lock = keep


def build_choice(choice: Choice) -> Built:
    ids = node_names(3)
    signers, keyring = _market(ids, False)
    decoder = Decoder()
    sim = Simulator(DELTA, 0, decoder=decoder)
    contracts = {"clear": Tally(), "settle": Tally()}
    for node_id in ids:
        if node_id == "n0":
            node: Node = ScriptedPrimary(
                signers[node_id], keyring, contracts, delta_ms=DELTA, decoder=decoder,
                choice=choice,
            )  # fmt: skip
        else:
            node = Node(signers[node_id], keyring, contracts, delta_ms=DELTA, decoder=decoder)
        sim.add(node_id, node)
        sim.open(OPENS[node_id], node_id, {"round": ROUND, "body": 1})
    sim.link = lambda src, dst, data, now: choice.link
    sim.keep_history = True
    horizon = DELTA + liveness_bound_ms(DELTA, 1) + 60 * DELTA
    sc = Scenario(seed=0, n=3, delta=DELTA, rounds=1, faults={"n0": "byzantine"})
    return Built(sc, sim, {ROUND: 0}, ["n1", "n2"], ["n1", "n2"], ["n1", "n2"], horizon, keyring)
