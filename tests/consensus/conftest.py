"""Fixtures for the consensus tests: small simulated markets with real P-256 keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from edge_agent.consensus.contracts import DoubleAuction, Tally
from edge_agent.consensus.messages import Decoder, RoundId, seal, statement
from edge_agent.consensus.node import Commit, Final, Node
from edge_agent.consensus.signing import Keyring, VerificationCache, p256_identities, public_keys
from edge_agent.consensus.sim import Instance, Simulator, membership_for, node_names

CLEAR = RoundId(0, "clear")
SETTLE = RoundId(1, "settle")


@dataclass
class Market:
    """A simulated market: nodes n0..n{n-1} (in rotation order) and submit-only participant p0."""

    sim: Simulator
    ids: list[str]
    signers: dict[str, Any]
    keyring: Keyring
    decoder: Decoder
    contracts: dict[str, Any]
    delta: int

    def node(self, name: str) -> Node:
        return self.sim.instances[name].node  # type: ignore[return-value]

    def inst(self, name: str) -> Instance:
        return self.sim.instances[name]

    def request(self, submitter: str, rid: RoundId, body: Any, deposit: bytes = b"dep-1") -> bytes:
        stmt = statement("req", "m1", rid, 0, deposit, submitter, body)
        return seal(submitter, self.signers[submitter].sign(stmt), stmt)

    def open_all(
        self, rid: RoundId, at: int, bodies: dict[str, Any], skew: dict[str, int] | None = None
    ) -> None:
        for name in self.sim.instances:
            node_id = self.inst(name).node_id
            when = at + (skew or {}).get(name, 0)
            self.sim.open(
                when,
                name,
                {"round": rid, "deposit": b"dep-" + node_id.encode(), "body": bodies[node_id]},
            )


def auction_bids(ids: list[str]) -> dict[str, Any]:
    """Even-indexed nodes sell, odd ones buy, at distinct prices (so trades happen)."""
    bids = {}
    for i, node in enumerate(ids):
        side = "sell" if i % 2 == 0 else "buy"
        price = 100 + 10 * i if side == "sell" else 220 - 5 * i
        bids[node] = {"side": side, "wh": 1000 + 100 * i, "price": price}
    return bids


@pytest.fixture
def market() -> Callable[..., Market]:
    """`market(n, classes={"n0": SomeNodeClass}, delta=10, delay=1)` builds a simulated market.

    `delay` is the fixed one-way delay in ms (or a callable link policy taking the market).
    """

    def build(
        n: int,
        *,
        classes: dict[str, type[Node]] | None = None,
        kwargs: dict[str, dict[str, Any]] | None = None,
        delta: int = 10,
        delay: int | Callable[..., int | None] = 1,
        seed: int = 1,
        node_ids: list[str] | None = None,
    ) -> Market:
        ids = node_ids or node_names(n)
        signers = p256_identities([*ids, "p0"], seed=3)
        keys = public_keys(signers)
        membership = membership_for("m1", {i: keys[i] for i in ids})
        keyring = Keyring(membership, {"p0": keys["p0"]}, cache=VerificationCache())
        decoder = Decoder()
        sim = Simulator(delta, seed, decoder=decoder)
        contracts = {"clear": DoubleAuction(), "settle": Tally()}
        mk = Market(sim, ids, signers, keyring, decoder, contracts, delta)
        for node_id in ids:
            cls = (classes or {}).get(node_id, Node)
            extra = (kwargs or {}).get(node_id, {})

            def make(
                records: list[bytes],
                node_id: str = node_id,
                cls: type[Node] = cls,
                extra: dict[str, Any] = extra,
            ) -> Node:
                return cls(
                    signers[node_id],
                    keyring,
                    contracts,
                    delta_ms=delta,
                    decoder=decoder,
                    records=records,
                    **extra,
                )

            sim.add(node_id, make([]), make)
        if callable(delay):
            sim.link = lambda src, dst, data, now: delay(mk, src, dst, data, now)
        else:
            sim.link = lambda src, dst, data, now: delay
        return mk

    return build


__all__ = ["CLEAR", "SETTLE", "Commit", "Final", "Market", "auction_bids"]
