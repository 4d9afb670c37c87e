"""The fuzz stage: every decoder and `Node.step` fed arbitrary, mutated and member-signed input.

Only the package's own errors (`MeterChainError` and subclasses) may come out of
a decoder, and `Node.step` must absorb every received message without raising.
Sizes are bounded for `make test` (about half a minute); MC_FUZZ_SCALE=N runs
N times as many cases. Byte mutations are seeded (reproducible); the
structured cases are derandomised Hypothesis searches.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.consensus.messages import TAGS, Decoder, RoundId, statement
from edge_agent.consensus.node import Message, Node, Open, Tick
from meterchain import codec, reading
from meterchain.errors import CodecError, MeterChainError
from meterchain.ledger.block import Header
from meterchain.ledger.proof import check_proof
from meterchain.ledger.readings import columns, parse
from meterchain.ledger.review import Proposal, decode_committed, parse_reply
from meterchain.ledger.transactions import Tx
from meterchain.market.clearing import ClearingRequest, ClearingResult
from meterchain.quorum import QuorumCertificate
from tests.fuzz import corpus

REGISTRY = corpus.registry()


def _qc(data: bytes) -> Any:
    qc = QuorumCertificate.from_cbor(codec.decode(data))
    return qc.fields()


def _consensus(data: bytes) -> Any:
    decoder = Decoder()
    env = decoder.envelope(data)
    if env.tag == "req":
        decoder.request(data)
    if env.tag == "prop":
        decoder.proposal(data)
    return env


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "codec.decode": codec.decode,
    "reading.verify": lambda d: reading.verify(d, REGISTRY, now=corpus.T0),
    "ledger.readings.parse": parse,
    "ledger.readings.columns": columns,
    "Tx.decode": Tx.decode,
    "Header.decode": Header.decode,
    "QuorumCertificate": _qc,
    "Proposal.decode": Proposal.decode,
    "parse_reply": parse_reply,
    "decode_committed": decode_committed,
    "consensus envelope": _consensus,
    "ClearingRequest.from_cbor": ClearingRequest.from_cbor,
    "ClearingResult.from_cbor": ClearingResult.from_cbor,
}


def _seeds() -> list[bytes]:
    ledger = corpus.ledger_messages()
    return [
        *corpus.consensus_messages(),
        *(m for group in ledger.values() for m in group),
        corpus.signed_reading(),
        corpus.signed_reading(flags=reading.FLAG_CLOCK_NOT_SYNCED, time=0),
    ]


# CBOR heads an attacker likes: shared values (28/29), bignums, undefined, simple values,
# indefinite lengths, huge declared lengths, deep nesting.
EVIL = [
    b"\xd8\x1c", b"\xd8\x1d\x00", b"\xc2\x49" + b"\x01" * 9, b"\xf7", b"\xf0", b"\xf8\xff",
    b"\x9f", b"\xbf", b"\xff", b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x9b" + b"\xff" * 8,
    b"\x81" * 64, b"\xd2", b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xa1\x81\x00\x00",
]  # fmt: skip


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    """One to four random edits: bit flips, byte sets, inserts, cuts, splices, evil heads."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out) + 1)
        op = rng.randrange(8)
        if op == 0 and out:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[pos % len(out)] = rng.randrange(256)
        elif op == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 9))
        elif op == 3:
            del out[pos : pos + rng.randint(1, 32)]
        elif op == 4:
            other = rng.choice(seeds)
            cut = rng.randrange(len(other) + 1)
            out[pos:] = other[cut:]
        elif op == 5:
            out[pos:pos] = rng.choice(EVIL)
        elif op == 6:
            out = out[:pos]
        else:
            out[pos : pos + 1] = rng.choice(EVIL)
    return bytes(out)


def only_our_errors(name: str, decoder: Callable[[bytes], Any], data: bytes) -> None:
    try:
        decoder(data)
    except MeterChainError:
        pass
    except Exception as exc:  # noqa: BLE001 - the assertion is that nothing else escapes
        raise AssertionError(f"{name} raised {exc!r} on {data.hex()}") from exc


def test_mutated_inputs_raise_only_meterchain_errors() -> None:
    rng = random.Random(20261202)
    seeds = _seeds()
    cases = corpus.examples(6000)
    for _ in range(cases):
        data = mutate(rng, rng.choice(seeds), seeds)
        for name, decoder in DECODERS.items():
            only_our_errors(name, decoder, data)


@settings(max_examples=corpus.examples(400), derandomize=True, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_meterchain_errors(data: bytes) -> None:
    for name, decoder in DECODERS.items():
        only_our_errors(name, decoder, data)


# CBOR values the wire formats can carry, including the awkward ones: the largest and
# smallest integers, empty and long strings, floats, nested containers.
SCALARS = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, 2**63, 2**64 - 1, -(2**64), 10**18, 2**31]),
    st.binary(max_size=80),
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "mg9\n", "a" * 65, "prop", "vote", "m1", "a", "b", "c", "p0"]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(0, 100)), children, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=corpus.examples(400), derandomize=True, deadline=None)
@given(VALUES)
def test_arbitrary_cbor_values_raise_only_meterchain_errors(value: Any) -> None:
    data = codec.encode(value)
    try:
        assert codec.encode(codec.decode(data)) == data
    except CodecError as exc:
        assert "NaN or infinite" in str(exc), exc
    for name, decoder in DECODERS.items():
        only_our_errors(name, decoder, data)
    try:
        QuorumCertificate.from_cbor(value)
    except MeterChainError:
        pass


# --- Node.step with member-signed input -----------------------------------------------------


@pytest.fixture(scope="module")
def node_under_attack() -> tuple[Node, corpus.Trio]:
    """Node b of a trio, its round open, fed the honest requests: ready to be attacked."""
    trio = corpus.trio()
    node = trio.nodes["b"]
    node.step(Open(0, corpus.R0, b"dep-b", corpus.BIDS["b"]))
    return node, trio


def _resign(trio: corpus.Trio, fields: list[Any], attachment: Any, sender: str) -> bytes:
    stmt = codec.encode(fields)
    return codec.encode([stmt, sender, trio.signers[sender].sign(stmt), attachment])


def _step(node: Node, data: bytes, sender: str | None, now: int) -> None:
    try:
        node.step(Message(now, data, sender))
        node.step(Tick(now + 1))
    except Exception as exc:
        raise AssertionError(f"Node.step raised {exc!r} on {data.hex()}") from exc


def test_node_step_absorbs_mutated_messages(node_under_attack) -> None:
    node, _ = node_under_attack
    rng = random.Random(7)
    seeds = list(corpus.consensus_messages())
    for i in range(corpus.examples(4000)):
        _step(node, mutate(rng, rng.choice(seeds), seeds), rng.choice(["a", "c", None]), i)


@settings(
    max_examples=corpus.examples(500),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.integers(0, 8),
    st.integers(0, 5),
    VALUES,
    st.sampled_from(["a", "c", "p0"]),
    st.booleans(),
)
def test_node_step_absorbs_member_signed_garbage(
    node_under_attack, which: int, field: int, value: Any, sender: str, in_attachment: bool
) -> None:
    """A member (or the submit-only participant) signs any fields or attachment it likes."""
    node, trio = node_under_attack
    template = corpus.consensus_messages()[which % len(corpus.consensus_messages())]
    stmt, _, _, attachment = codec.decode(template)
    fields = codec.decode(stmt)
    if in_attachment:
        if isinstance(attachment, list) and attachment:
            attachment = list(attachment)
            attachment[field % len(attachment)] = value
        else:
            attachment = value
    else:
        fields[field % len(fields)] = value
    _step(node, _resign(trio, fields, attachment, sender), sender, 100 + field)


@settings(max_examples=corpus.examples(300), derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    st.sampled_from(TAGS),
    st.integers(0, 3),
    st.integers(0, 2**64 - 1),
    VALUES,
    st.lists(VALUES, max_size=3),
    VALUES,
)
def test_node_step_absorbs_member_signed_statements(
    node_under_attack, tag: str, seq: int, view: int, ref: Any, extra: list[Any], attachment: Any
) -> None:
    node, trio = node_under_attack
    stmt = statement(tag, "m1", RoundId(seq, "clear"), view, ref, *extra)
    data = codec.encode([stmt, "c", trio.signers["c"].sign(stmt), attachment])
    _step(node, data, "c", 200 + seq)


def _json_paths(doc: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(doc, dict):
        return [path] + [p for k, v in doc.items() for p in _json_paths(v, (*path, k))]
    if isinstance(doc, list):
        return [path] + [p for i, v in enumerate(doc) for p in _json_paths(v, (*path, i))]
    return [path]


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=20), st.sampled_from(["00", "ff" * 32, "zz", ""])),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=6), c,
                                                                 max_size=4)),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=corpus.examples(300), derandomize=True, deadline=None)
@given(st.data())
def test_check_proof_raises_only_meterchain_errors(data: st.DataObject) -> None:
    """`ledger check-proof` reads a JSON file from anyone: any value anywhere in it."""
    good, header_hash, membership = corpus.proof_case()
    assert check_proof(good, header_hash=header_hash, membership=membership).seq >= 1
    doc = json.loads(json.dumps(good))
    path = data.draw(st.sampled_from(_json_paths(doc)))
    value = data.draw(JSON_VALUES)
    if path:
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = value
    else:
        doc = value
    for anchors in ({"header_hash": header_hash}, {"membership": membership}):
        try:
            check_proof(doc, **anchors)
        except MeterChainError:
            pass
        except Exception as exc:
            raise AssertionError(f"check_proof raised {exc!r} on {path} = {value!r}") from exc
