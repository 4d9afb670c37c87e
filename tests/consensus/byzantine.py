"""Byzantine consensus nodes for the simulator: honest bookkeeping underneath, lies on the wire.

Each adversary is a `Node` subclass, so it tracks views and requests like an
honest node, and overrides what it publishes. They sign only with their own
key; the simulator lets them target messages at chosen nodes (`Targeted`),
which is stronger than what a node can do over the real broker.
"""

from __future__ import annotations

import random
from typing import Any

from edge_agent.consensus.contracts import tamper_auction
from edge_agent.consensus.messages import (
    Request,
    RoundId,
    Value,
    final_statement,
    seal,
    statement,
    vote_statement,
)
from edge_agent.consensus.node import Broadcast, Node, _Round
from edge_agent.consensus.sim import Targeted


def corrupt_result(result: Any, beneficiary: str) -> Any:
    """Raise the beneficiary's payment and lower another seller's (auction), else skew the tally."""
    if isinstance(result, dict) and "fills" in result:
        sellers = [s for s, wh, _ in result["fills"] if wh > 0 and s != beneficiary]
        victim = sellers[0] if sellers else "nobody"
        if any(s == beneficiary for s, _, _ in result["fills"]) or sellers:
            return tamper_auction(result, beneficiary, victim, 5000)
        return {**result, "price": (result["price"] or 0) + 1}
    if isinstance(result, dict) and "sum" in result:
        return {**result, "sum": result["sum"] + 1}
    return ["tampered", result]


class Liar(Node):
    """A lying backup: votes for every proposal it sees (in every view), blames every primary
    at once, attests finality of every proposed value, and claims a lock it cannot prove."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lied: set[tuple[RoundId, int, bytes, str]] = set()

    def _advance_once(self, rs: _Round, out: list[Any]) -> None:
        super()._advance_once(rs, out)
        for view, headers in list(rs.headers.items()):
            for env in list(headers.values()):
                vd = env.ref
                if (rs.rid, view, vd, "vote") not in self._lied:
                    self._lied.add((rs.rid, view, vd, "vote"))
                    stmt = vote_statement(self.market, rs.rid, view, vd)
                    out.append(
                        Broadcast("vote", seal(self.node_id, self.signer.sign(stmt), stmt, env.raw))
                    )
                if (rs.rid, 0, vd, "final") not in self._lied:
                    self._lied.add((rs.rid, 0, vd, "final"))
                    stmt = final_statement(self.market, rs.rid, vd)
                    out.append(Broadcast("final", seal(self.node_id, self.signer.sign(stmt), stmt)))
        if rs.rid in self.rounds and not rs.recovering and rs.view not in rs.blamed:
            self._blame(rs, rs.view, [], out)
        key = (rs.rid, rs.view, b"", "status")
        if rs.rid in self.rounds and key not in self._lied:
            self._lied.add(key)
            # a status claiming a lock in a high view without the certificate to prove it
            stmt = statement("status", self.market, rs.rid, rs.view + 1, b"\x07" * 32, rs.view)
            out.append(Broadcast("status", seal(self.node_id, self.signer.sign(stmt), stmt)))


class Tamperer(Node):
    """A dishonest primary: proposes a result that pays itself more and another seller less."""

    def make_result(self, rid: RoundId, requests: tuple[Request, ...]) -> Any:
        honest = super().make_result(rid, requests)
        return corrupt_result(honest, self.node_id)


class Equivocator(Liar):
    """An equivocating primary: signs two different proposals for one view and shows each to a
    different part of the other nodes; as a backup it signs everything (like `Liar`)."""

    def __init__(
        self, *args: Any, seed: int = 0, split: list[set[str]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.split = split

    def _publish_proposal(
        self, rs: _Round, value: Value, justification: Any, out: list[Any]
    ) -> None:
        others = [m for m in self.membership.node_ids if m != self.node_id]
        if self.split is not None:
            part_x, part_y = self.split
        else:
            self.rng.shuffle(others)
            cut = self.rng.randint(1, max(1, len(others) - 1))
            part_x, part_y = set(others[:cut]), set(others[cut:])
        raw_x, _ = self.sign_proposal(rs, value, justification)
        raw_y, _ = self.sign_proposal(rs, self._variant(rs, value), justification)
        rs.proposed.add(rs.view)
        self._on_proposal(rs, self.decoder.envelope(raw_x))
        self._on_proposal(rs, self.decoder.envelope(raw_y))
        rs.voted[rs.view] = value.digest
        rs.vote_time[rs.view] = self.now
        out.append(Targeted(tuple(sorted(part_x)), "prop", raw_x))
        out.append(Targeted(tuple(sorted(part_y)), "prop", raw_y))

    def _variant(self, rs: _Round, value: Value) -> Value:
        """Another value a backup would also accept: drop someone else's request."""
        keep = list(value.requests)
        droppable = [r for r in keep if r.submitter != self.node_id]
        if droppable:
            keep.remove(droppable[-1])
            requests = tuple(keep)
            result = self.contracts[rs.rid.kind].execute(requests)
        else:
            requests = value.requests
            result = corrupt_result(value.result, self.node_id)
        return self.decoder.value(self.market, rs.rid, [[r.raw for r in requests], result])


class Censor(Node):
    """A primary that leaves the requests of `victims` out of its fresh proposals."""

    def __init__(self, *args: Any, victims: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.victims = victims

    def _propose_fresh(self, rs: _Round, justification: Any, out: list[Any]) -> None:
        kept = {s: r for s, r in rs.requests.items() if s not in self.victims}
        everyone, rs.requests = rs.requests, kept
        try:
            super()._propose_fresh(rs, justification, out)
        finally:
            rs.requests = everyone


def tamper_clearing(result: Any, beneficiary: str, victim: str, amount: int) -> Any:
    """Raise what `beneficiary` earns on its trades by `amount` minor units and lower what seller
    `victim` earns by as much; payments are adjusted so they still sum to zero and the buyers'
    books still balance, i.e. the forgery is consistent on its face."""
    value = dict(result)
    res = dict(value["result"])
    hour = dict(res["executed"][0])
    ids = res["microgrids"]
    payments = list(hour["payments"])
    trades = []
    done = {beneficiary: False, victim: False}
    for seller, buyer, wh, money, _price in hour["trades"]:
        if seller in done and not done[seller] and wh > 0:
            delta = amount if seller == beneficiary else -amount
            done[seller] = True
            money += delta
            payments[ids.index(seller)] -= delta  # positive payment = pays
            payments[ids.index(buyer)] += delta
        trades.append([seller, buyer, wh, money, money * 1000 // wh if wh else 0])
    hour["trades"] = trades
    hour["payments"] = payments
    res["executed"] = [hour, *res["executed"][1:]]
    value["result"] = res
    return value
