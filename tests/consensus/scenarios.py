"""Builds simulated markets from a seed and checks safety, liveness and catch-up on them.

A `Scenario` lists n, delta, the rounds and who is faulty how; `build` wires
real `Node`s (or Byzantine ones: the adaptive `adversary.Coalition`, and the
older single-trick liars, tamperers and equivocators) into a `Simulator`
whose correct-to-correct delays an adversarial scheduler picks within delta;
`check` states the properties over every record type: no node running the
honest code commits or finalises two different values for a round and no two
such nodes disagree, no two finality certificates for different values can
be assembled from everything ever published, every correct node commits
every round within `liveness_bound_ms`, and every node that is up at the end
has caught up on every round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from edge_agent.consensus.contracts import DoubleAuction, Tally
from edge_agent.consensus.messages import Decoder, RoundId, seal, statement
from edge_agent.consensus.node import Node, liveness_bound_ms
from edge_agent.consensus.signing import (
    Keyring,
    VerificationCache,
    hash_identities,
    p256_identities,
    public_keys,
)
from edge_agent.consensus.sim import Instance, Simulator, membership_for, node_names
from tests.consensus.adversary import ByzantineNode, Coalition, ScheduledLink, Strategy
from tests.consensus.byzantine import Equivocator, Liar, Tamperer

FAULTS = ("byzantine", "liar", "tamper", "equivocate", "crash", "restart", "lossy", "twins")
BYZANTINE = ("byzantine", "liar", "tamper", "equivocate")
PARTICIPANT = "p0"  # a submit-only microgrid: signs requests, never votes
_MARKETS: dict[tuple[tuple[str, ...], bool], tuple[dict[str, Any], Keyring]] = {}


@dataclass
class Scenario:
    seed: int
    n: int
    delta: int = 10
    rounds: int = 2
    faults: dict[str, str] = field(default_factory=dict)  # node id -> kind in FAULTS
    gaps: list[int] = field(default_factory=list)  # ms between round opens
    replays: int = 0
    loss: float = 0.0
    extreme_delays: bool = False  # every delay is 0 or exactly delta: hits timer boundaries
    real_signatures: bool = False
    link_mode: str = "uniform"  # the scheduler of correct-to-correct delays (ScheduledLink)

    @property
    def faulty(self) -> int:
        return len(self.faults)

    def describe(self) -> str:
        return (
            f"seed={self.seed} n={self.n} delta={self.delta} rounds={self.rounds} "
            f"faults={self.faults} gaps={self.gaps} replays={self.replays} loss={self.loss} "
            f"extreme_delays={self.extreme_delays} real_signatures={self.real_signatures} "
            f"link_mode={self.link_mode}"
        )


def random_scenario(seed: int, *, real_signatures: bool = False) -> Scenario:
    rng = random.Random(seed)
    n = rng.choices([3, 4, 5, 7], weights=[3, 3, 3, 2])[0]
    budget = (n - 1) // 2
    count = rng.randint(0, budget)
    ids = node_names(n)
    faulty_ids = rng.sample(ids, count)
    # the adaptive coalition in most schedules; the older fault kinds keep their share
    kinds = rng.choices(FAULTS, weights=[10, 1, 1, 1, 1, 1, 1, 1], k=count)
    faults = dict(zip(faulty_ids, kinds, strict=True))
    rounds = 2
    delta = rng.choice([4, 10, 25])
    gaps = [rng.randint(0, 15 * delta) for _ in range(rounds - 1)]
    return Scenario(
        seed=seed,
        n=n,
        delta=delta,
        rounds=rounds,
        faults=faults,
        gaps=gaps,
        replays=rng.choice([0, 0, 5, 20]),
        loss=rng.choice([0.2, 0.5, 1.0]),
        extreme_delays=rng.random() < 0.4,
        real_signatures=real_signatures,
        link_mode=rng.choice(ScheduledLink.MODES),
    )


def _market(ids: list[str], real: bool) -> tuple[dict[str, Any], Keyring]:
    """Identities and keyring for n nodes, built once per size and scheme and reused.

    Keys (P-256 ones especially) are pre-generated; the keyring's verification
    cache is a memo of a pure function, so sharing it between schedules cannot
    change an outcome.
    """
    key = (tuple(ids), real)
    if key not in _MARKETS:
        everyone = [*ids, PARTICIPANT]
        signers: dict[str, Any] = (
            p256_identities(everyone, seed=7) if real else hash_identities(everyone, seed=7)
        )
        keys = public_keys(signers)
        membership = membership_for("m1", {i: keys[i] for i in ids})
        keyring = Keyring(membership, {PARTICIPANT: keys[PARTICIPANT]}, cache=VerificationCache())
        _MARKETS[key] = (signers, keyring)
    return _MARKETS[key]


def round_id(r: int) -> RoundId:
    return RoundId(r, "clear" if r % 2 == 0 else "settle")


def bid(node_index: int, r: int, rng: random.Random) -> Any:
    if round_id(r).kind == "settle":
        return rng.randint(0, 1000)
    side = "sell" if node_index % 2 == 0 else "buy"
    return {"side": side, "wh": rng.randint(1, 40) * 100, "price": rng.randint(50, 250)}


@dataclass
class Built:
    scenario: Scenario
    sim: Simulator
    opens: dict[RoundId, int]  # first correct open of each round
    checked: list[str]  # instances whose decisions must agree
    correct: list[str]  # instances that must meet the liveness bound
    caught_up: list[str]  # instances that must know every final result by the end
    horizon: int
    keyring: Keyring


def build(sc: Scenario) -> Built:
    ids = node_names(sc.n)
    signers, keyring = _market(ids, sc.real_signatures)
    decoder = Decoder()
    sim = Simulator(sc.delta, sc.seed, decoder=decoder)
    contracts = {"clear": DoubleAuction(), "settle": Tally()}
    rng = random.Random(sc.seed * 7919 + 1)
    adversary_rng = random.Random(sc.seed * 104_729 + 3)
    coalition = Coalition(adversary_rng, Strategy.draw(adversary_rng), sim)

    def factory(node_id: str, kind: str | None) -> Any:
        cls: Any = {
            "liar": Liar,
            "tamper": Tamperer,
            "equivocate": Equivocator,
            "byzantine": ByzantineNode,
        }.get(kind or "", Node)
        extra: dict[str, Any] = {"seed": sc.seed} if cls is Equivocator else {}
        if cls is ByzantineNode:
            extra = {"coalition": coalition}

        def make(records: list[bytes]) -> Node:
            return cls(
                signers[node_id],
                keyring,
                contracts,
                delta_ms=sc.delta,
                decoder=decoder,
                records=records,
                **extra,
            )

        return make

    checked, correct = [], []
    for node_id in ids:
        kind = sc.faults.get(node_id)
        make = factory(node_id, kind)
        sim.add(node_id, make([]), make)
        if kind is None:
            correct.append(node_id)
        if kind in (None, "crash", "restart"):
            # Every node running the honest code on every message it receives must agree,
            # including ones that crashed (and restarted from their disk). A node that
            # loses messages is faulty (omission): its 2-delta rule may miss the evidence,
            # so only what it learns from finality certificates is promised (see the FC
            # check). Twins are one faulty node run twice with one key.
            checked.append(node_id)
        if kind == "twins":
            sim.add(node_id + "'", make([]), make)

    twins = {node for node, kind in sc.faults.items() if kind == "twins"}
    byzantine = {node for node, kind in sc.faults.items() if kind in BYZANTINE}
    victims = [i for i in ids if i not in sc.faults] or ids
    scheduler = ScheduledLink(
        sim, random.Random(sc.seed * 31 + 7), sc.link_mode, adversary_rng.choice(victims)
    )
    coalition.victim = scheduler.victim  # the slow links and the isolation hit one node
    lossy = {node for node, kind in sc.faults.items() if kind == "lossy"}
    partitions: dict[tuple[str, int], set[str]] = {}

    def partition(instance: str, seq: int) -> set[str]:
        """Which node ids a twin instance talks to in round `seq` (chosen once per round)."""
        key = (instance, seq)
        if key not in partitions:
            local = random.Random(f"{sc.seed}/{instance}/{seq}")
            others = [i for i in ids if i not in twins]
            partitions[key] = {i for i in others if local.random() < 0.5}
        return partitions[key]

    def link(src: Instance, dst: Instance, data: bytes, now: int) -> int | None:
        if sc.extreme_delays:
            delay = sc.delta if sim.rng.random() < 0.5 else 0
        else:
            delay = scheduler(src, dst, data, now)
        if src.node_id in byzantine and sim.rng.random() < 0.3:
            delay = sim.rng.randint(0, 4 * sc.delta)  # a faulty sender picks its own moment
        if dst.node_id in lossy and sim.rng.random() < sc.loss:
            return None
        if twins and (src.node_id in twins or dst.node_id in twins):
            seq = decoder.envelope(data).round.seq
            if src.node_id in twins and dst.node_id not in partition(src.name, seq):
                return None
            if dst.node_id in twins and src.node_id not in partition(dst.name, seq):
                return None
        return delay

    sim.link = link

    # rounds: every node opens within delta of the first; the participant submits too
    opens: dict[RoundId, int] = {}
    t = 5
    for r in range(sc.rounds):
        rid = round_id(r)
        opens[rid] = t
        for index, node_id in enumerate(ids):
            when = t + rng.randint(0, sc.delta)
            deposit = bytes([index + 1]) * 8
            fields = {"round": rid, "deposit": deposit, "body": bid(index, r, rng)}
            sim.open(when, node_id, fields)
            if node_id in twins:
                sim.open(when, node_id + "'", fields)
        body = bid(sc.n, r, rng)
        stmt = statement("req", "m1", rid, 0, b"\xee" * 8, PARTICIPANT, body)
        raw = seal(PARTICIPANT, signers[PARTICIPANT].sign(stmt), stmt)
        sim.inject(t + rng.randint(0, sc.delta), raw, PARTICIPANT)
        if r < len(sc.gaps):
            t += sc.gaps[r]

    last_open = t
    bound = liveness_bound_ms(sc.delta, sc.faulty)
    horizon = last_open + bound + 60 * sc.delta
    for node_id, kind in sc.faults.items():
        if kind in ("crash", "restart"):
            down = rng.randint(0, last_open + bound)
            sim.crash(down, node_id)
            if kind == "restart":
                sim.restart(down + rng.randint(1, 20 * sc.delta), node_id)
    sim.keep_history = True  # the finality-certificate check reads every publish
    if sc.replays:
        for _ in range(sc.replays):
            when = rng.randint(0, horizon - 30 * sc.delta)

            def replay(when: int = when) -> None:
                if sim.history:
                    data, sender = sim.history[sim.rng.randrange(len(sim.history))]
                    target = sim.rng.choice(list(sim.instances))
                    sim.inject(when + sim.rng.randint(0, sc.delta), data, sender, [target])

            sim.at(when, replay)
    caught_up = [
        name
        for name in checked
        if sc.faults.get(name.rstrip("'")) in (None, "crash", "restart")
        or (sc.faults.get(name) == "lossy" and sc.loss < 1.0)
    ]
    return Built(sc, sim, opens, checked, correct, caught_up, horizon, keyring)


class PropertyViolation(AssertionError):
    """A simulated schedule broke safety, liveness or catch-up; the message has the seed."""


def check(built: Built) -> dict[str, Any]:
    sc, sim = built.scenario, built.sim
    sim.run(built.horizon)
    problems: list[str] = []
    bound = liveness_bound_ms(sc.delta, sc.faulty)
    for rid, opened in built.opens.items():
        decided: dict[bytes, list[str]] = {}
        for name in built.checked:
            inst = sim.instances[name]
            for book in (inst.commits, inst.finals):
                if rid in book:
                    decided.setdefault(book[rid][1], []).append(name)
            if inst.conflicts:
                problems.append(f"{name} decided twice differently: {inst.conflicts}")
        if len(decided) > 1:
            seen = ", ".join(f"{d.hex()[:8]}: {sorted(set(v))}" for d, v in decided.items())
            problems.append(f"SAFETY {rid}: {seen}")
        for name in built.correct:
            inst = sim.instances[name]
            commit = inst.commits.get(rid)
            if commit is None:
                problems.append(f"LIVENESS {rid}: correct {name} never committed")
            elif commit[0] - opened > bound:
                problems.append(
                    f"LIVENESS {rid}: {name} committed {commit[0] - opened} ms after open, "
                    f"bound {bound} ms"
                )
        for name in built.caught_up:
            inst = sim.instances[name]
            if inst.up and rid not in inst.finals:
                problems.append(f"CATCH-UP {rid}: {name} (up at the end) has no final result")
    problems += _certificate_conflicts(built)
    if problems:
        raise PropertyViolation(f"{sc.describe()}\n  " + "\n  ".join(problems))
    latencies = [
        sim.instances[name].commits[rid][0] - opened
        for rid, opened in built.opens.items()
        for name in built.correct
    ]
    return {"max_latency": max(latencies, default=0), "publishes": sum(sim.publishes.values())}


def _certificate_conflicts(built: Built) -> list[str]:
    """Two values of one round that each gather q valid `final` signatures from everything
    ever published (by anyone, faulty members included): two finality certificates."""
    keyring, decoder = built.keyring, built.sim.decoder
    signers: dict[tuple[RoundId, bytes], set[str]] = {}
    for data, _ in built.sim.history:
        env = decoder.envelope(data)
        if env.tag != "final" or not isinstance(env.ref, bytes):
            continue
        if keyring.is_member(env.sender) and keyring.verify(
            env.sender, env.statement, env.signature
        ):
            signers.setdefault((env.round, env.ref), set()).add(env.sender)
    certified: dict[RoundId, list[bytes]] = {}
    for (rid, digest), who in signers.items():
        if len(who) >= keyring.membership.quorum:
            certified.setdefault(rid, []).append(digest)
    return [
        f"SAFETY {rid}: finality certificates for {[d.hex()[:8] for d in digests]}"
        for rid, digests in certified.items()
        if len(digests) > 1
    ]


def run_seed(seed: int, *, real_signatures: bool = False) -> dict[str, Any]:
    return check(build(random_scenario(seed, real_signatures=real_signatures)))
