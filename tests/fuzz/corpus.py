"""Valid wire inputs of every format, captured from real runs, for the fuzzers to mutate.

A consensus corpus comes from one fault-free SDBFT round among three real
nodes (P-256 keys, the double-auction contract); a ledger corpus from the
shared demo ledger of tests/ledger (every transaction kind, proposals, votes,
committed blocks); a reading corpus from signed readings of the core fixtures.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from edge_agent.consensus.contracts import DoubleAuction, Tally
from edge_agent.consensus.messages import Decoder, RoundId
from edge_agent.consensus.node import Broadcast, Message, Node, Open, Tick
from edge_agent.consensus.signing import Keyring, VerificationCache, p256_identities, public_keys
from edge_agent.consensus.sim import membership_for
from meterchain import codec, reading
from meterchain.keys import PrivateKey
from meterchain.ledger.review import Refusal, Vote, encode_committed, reply_message
from meterchain.ledger.sqlite_store import SQLiteStore
from meterchain.registry import Registry

DELTA = 10
R0 = RoundId(0, "clear")
MEMBERS = ("a", "b", "c")
BIDS = {
    "a": {"side": "sell", "wh": 1000, "price": 100},
    "b": {"side": "buy", "wh": 600, "price": 200},
    "c": {"side": "buy", "wh": 600, "price": 150},
}
METER_KEY = PrivateKey.from_secret(0x5EED_0101)
METER = "mg1-pv-01"
T0 = 1_760_000_000


def examples(default: int) -> int:
    """Examples per fuzz test: `default` in `make test`, MC_FUZZ_SCALE times more on demand."""
    return default * max(1, int(os.environ.get("MC_FUZZ_SCALE", "1")))


@dataclass
class Trio:
    """Three consensus nodes of market m1 and the signers of every identity (incl. p0)."""

    nodes: dict[str, Node]
    signers: dict[str, Any]
    keyring: Keyring


def trio() -> Trio:
    signers = p256_identities([*MEMBERS, "p0"], seed=11)
    keys = public_keys(signers)
    membership = membership_for("m1", {i: keys[i] for i in MEMBERS})
    keyring = Keyring(membership, cache=VerificationCache(), participants={"p0": keys["p0"]})
    contracts = {"clear": DoubleAuction(), "settle": Tally()}
    nodes = {
        i: Node(signers[i], keyring, contracts, delta_ms=DELTA, decoder=Decoder()) for i in MEMBERS
    }
    return Trio(nodes, signers, keyring)


@functools.cache
def consensus_messages() -> tuple[bytes, ...]:
    """Every message of one fault-free round (requests, proposal, votes, finals), in order."""
    t = trio()
    sent: list[bytes] = []
    queue: list[tuple[str, bytes]] = []
    for name, node in t.nodes.items():
        for action in node.step(Open(0, R0, b"dep-" + name.encode(), BIDS[name])):
            if isinstance(action, Broadcast):
                queue.append((name, action.data))
    now = 1
    while now < 20 * DELTA:
        while queue:
            sender, data = queue.pop(0)
            sent.append(data)
            for name, node in t.nodes.items():
                if name != sender:
                    for action in node.step(Message(now, data, sender)):
                        if isinstance(action, Broadcast):
                            queue.append((name, action.data))
        now += 1
        for name, node in t.nodes.items():
            for action in node.step(Tick(now)):
                if isinstance(action, Broadcast):
                    queue.append((name, action.data))
    assert {Decoder().envelope(m).tag for m in sent} >= {"req", "prop", "vote", "final"}
    return tuple(sent)


def registry() -> Registry:
    reg = Registry()
    reg.add(METER, METER_KEY.public_key(), "mg1", "pv")
    return reg


def signed_reading(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "meter_id": METER,
        "seq": 42,
        "time": T0,
        "import_wh": 1_234_567,
        "export_wh": 89_012,
        "power_w": -2_500,
        "flags": 0,
        "source": "pv",
    }
    return reading.sign_reading(METER_KEY, **{**fields, **overrides})


@functools.cache
def ledger_messages() -> dict[str, tuple[bytes, ...]]:
    """Headers, transactions, QCs, proposals, replies and committed blocks of the demo ledger."""
    from tests.ledger.ledger_world import build_world

    world = build_world(SQLiteStore(":memory:"))
    head = world.store.head()
    assert head is not None
    blocks = [world.store.block(h) for h in range(head[0] + 1)]
    proposals = []
    for block in blocks:
        batches = {
            i: [row[-1] for _, row in world.store.batch_rows(block.header.height, i)]
            for i, tx in enumerate(block.txs)
            if tx.kind == "readings"
        }
        header, txs = block.header.encode(), [tx.raw for tx in block.txs]
        proposals.append(codec.encode(["proposal", header, txs, batches]))
    sb = world.sandbox
    replies = []
    for block in blocks[:2]:
        for node in sb.node_ids:
            key = sb.key(node)
            vote = Vote(node, key.sign(block.statement()))
            replies.append(reply_message(vote, block, node, key))
            replies.append(reply_message(Refusal("stale head"), block, node, key))
    return {
        "header": tuple(b.header.encode() for b in blocks),
        "tx": tuple(tx.raw for b in blocks for tx in b.txs),
        "qc": tuple(codec.encode(b.qc.to_cbor()) for b in blocks if b.qc is not None),
        "proposal": tuple(proposals),
        "reply": tuple(replies),
        "committed": tuple(encode_committed(b) for b in blocks),
    }


@functools.cache
def proof_case() -> tuple[dict[str, Any], bytes, Any]:
    """An inclusion proof of a demo-ledger reading, its block's hash and the membership."""
    from meterchain.ledger.proof import build_proof
    from tests.ledger.ledger_world import build_world

    world = build_world(SQLiteStore(":memory:"))
    (digest,) = world.store._execute("SELECT digest FROM readings LIMIT 1")[0]
    doc = build_proof(world.store, bytes(digest))
    height = doc["block"]["height"]
    return doc, world.store.stored_block(height).hash, world.sandbox.membership
