"""The state machine driven by hand, message by message (etcd-raft style): exact actions out."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.consensus.contracts import DoubleAuction, Tally
from edge_agent.consensus.messages import (
    Decoder,
    MessageError,
    RoundId,
    header,
    seal,
    statement,
    vote_statement,
)
from edge_agent.consensus.node import (
    LOOKAHEAD_ROUNDS,
    PRE_OPEN_PER_SENDER,
    PRE_OPEN_ROUNDS_PER_MEMBER,
    Broadcast,
    Commit,
    ConsensusError,
    Final,
    Message,
    Node,
    Open,
    Persist,
    Tick,
)
from edge_agent.consensus.signing import Keyring, VerificationCache, p256_identities, public_keys
from edge_agent.consensus.sim import membership_for
from meterchain import codec
from meterchain.keys import PrivateKey

D = 10
R0 = RoundId(0, "clear")


@pytest.fixture
def trio() -> tuple[dict[str, Node], dict[str, Any]]:
    signers = p256_identities(["a", "b", "c", "outsider"], seed=11)
    keys = public_keys(signers)
    membership = membership_for("m1", {i: keys[i] for i in ("a", "b", "c")})
    keyring = Keyring(membership, cache=VerificationCache())
    contracts = {"clear": DoubleAuction(), "settle": Tally()}
    nodes = {
        i: Node(signers[i], keyring, contracts, delta_ms=D, decoder=Decoder())
        for i in ("a", "b", "c")
    }
    return nodes, signers


def kinds(actions: list[Any]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Broadcast):
            out.append(a.kind)
        else:
            out.append(type(a).__name__)
    return out


def sent(actions: list[Any], kind: str) -> bytes:
    (data,) = [a.data for a in actions if isinstance(a, Broadcast) and a.kind == kind]
    return data


BIDS = {
    "a": {"side": "sell", "wh": 1000, "price": 100},
    "b": {"side": "buy", "wh": 600, "price": 200},
    "c": {"side": "buy", "wh": 600, "price": 150},
}


def test_a_fault_free_round_step_by_step(trio) -> None:
    nodes, _ = trio
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    assert a.primary(R0, 0) == "a" and a.primary(RoundId(1, "settle"), 0) == "b"

    reqs = {}
    for name, node in nodes.items():
        actions = node.step(Open(0, R0, b"dep-" + name.encode(), BIDS[name]))
        assert kinds(actions) == ["req"], "a request is not an acknowledgement: no disk write"
        reqs[name] = sent(actions, "req")
    # the primary waits for every member's request (or 2 delta + 1), then proposes
    assert a.step(Message(1, reqs["b"], "b")) == []
    assert a.next_deadline() == 2 * D + 1
    actions = a.step(Message(2, reqs["c"], "c"))
    assert kinds(actions) == ["Persist", "prop"]
    prop = sent(actions, "prop")
    vd = Decoder().proposal(prop).digest

    # a backup persists its vote before the vote goes out; the vote names the primary's
    # signed header, never the value
    b.step(Message(2, reqs["a"], "a"))
    b.step(Message(2, reqs["c"], "c"))
    actions = b.step(Message(3, prop, "a"))
    assert kinds(actions) == ["Persist", "vote"]
    record = codec.decode(actions[0].record)  # type: ignore[union-attr]
    assert record["votes"] == [[0, vd]] and record["round"] == [0, "clear"]
    vote_b = sent(actions, "vote")
    vote_env = Decoder().envelope(vote_b)
    assert vote_env.statement == vote_statement("m1", R0, 0, vd)
    assert vote_env.attachment == header(Decoder().envelope(prop))
    assert len(vote_b) < len(prop) // 2

    # c learns the proposal only from b's vote (the primary's copy never arrived): it holds
    # the signed header without the value, so it fetches the value by (view, digest)
    c.step(Message(3, reqs["a"], "a"))
    c.step(Message(3, reqs["b"], "b"))
    actions = c.step(Message(4, vote_b, "b"))
    assert kinds(actions) == ["sync"]
    ask = sent(actions, "sync")
    assert (Decoder().envelope(ask).view, Decoder().envelope(ask).ref) == (0, vd)
    assert c.next_deadline() == 4 + 3 * D + 1, "asked again strictly after 3 delta"
    # any holder answers with the primary's whole proposal; c checks it and votes
    actions = b.step(Message(5, ask, "c"))
    assert kinds(actions) == ["value"]
    answer = sent(actions, "value")
    assert Decoder().envelope(answer).attachment == prop
    actions = c.step(Message(6, answer, "b"))
    assert kinds(actions) == ["Persist", "vote"]
    vote_c = sent(actions, "vote")
    assert b.step(Message(7, vote_c, "c")) == []
    # a repeated question (a replay, or a faulty member's) waits: one answer batch per delta
    assert b.step(Message(8, ask, "c")) == []
    assert b.next_deadline() == 5 + D
    assert kinds(b.step(Tick(5 + D))) == ["value"]

    # final only after 2 delta from its own vote, every member's vote in hand (fast path)
    assert b.next_deadline() == 3 + 2 * D + 1
    assert b.step(Tick(3 + 2 * D)) == []
    actions = b.step(Tick(3 + 2 * D + 1))
    # the attestation needs no disk write first: after a restart a node is passive in
    # this round and attests again only from a finality certificate
    assert kinds(actions) == ["Commit", "final"]
    commit = actions[0]
    assert isinstance(commit, Commit) and commit.view == 0 and commit.digest == vd
    assert commit.value.result == DoubleAuction().execute(commit.value.requests)
    assert commit.certificate is not None and set(commit.certificate.signers) == {"a", "b"}

    # the primary commits on its own clock, then two finals make a finality certificate
    assert a.step(Message(4, vote_b, "b")) == []
    assert a.step(Message(7, vote_c, "c")) == []
    actions = a.step(Tick(2 + 2 * D + 1))
    assert kinds(actions) == ["Commit", "final"]
    final_a = sent(actions, "final")
    att = Decoder().envelope(final_a).attachment
    assert att is not None and att[1] is not None, "the primary's final carries the QC"
    assert att[0] is None, "and no value: no submit-only participant needs it here"
    assert c.step(Message(24, final_a, "a")) == []
    # c's own window ends at 6 + 2 delta: it commits, attests, and with a's attestation
    # holds a finality certificate at once
    actions = c.step(Tick(6 + 2 * D + 1))
    assert kinds(actions) == ["Persist", "Commit", "final", "Final"]  # the decision is stored
    b_final = [x for x in b.step(Message(26, final_a, "a")) if isinstance(x, Final)]
    assert b_final and b_final[0].certificate.signers == ("a", "b")
    assert R0 not in b.rounds and R0 in b.decided


def test_without_every_members_vote_a_node_forwards_the_certificate_and_commits_later(
    trio,
) -> None:
    """Fast commit needs all n votes: with only a quorum (c silent) b forwards the QC with
    the signed header at the end of its window and commits strictly after one delta more."""
    nodes, _ = trio
    a, b = nodes["a"], nodes["b"]
    reqs = {name: sent(node.step(Open(0, R0, b"dep", BIDS[name])), "req")
            for name, node in nodes.items()}  # fmt: skip
    a.step(Message(1, reqs["b"], "b"))
    prop = sent(a.step(Message(1, reqs["c"], "c")), "prop")
    b.step(Message(1, reqs["a"], "a"))
    b.step(Message(1, reqs["c"], "c"))
    assert kinds(b.step(Message(2, prop, "a"))) == ["Persist", "vote"]
    actions = b.step(Tick(2 + 2 * D + 1))
    assert kinds(actions) == ["cert"], "two votes of three: no fast commit"
    qc_cbor, signed = Decoder().envelope(sent(actions, "cert")).attachment
    assert signed == header(Decoder().envelope(prop))
    assert b.next_deadline() == 2 + 3 * D + 2
    assert kinds(b.step(Tick(2 + 3 * D + 2))) == ["Commit", "final"]


def test_bad_input_is_dropped_and_counted(trio) -> None:
    nodes, signers = trio
    b = nodes["b"]
    b.step(Open(0, R0, b"dep", BIDS["b"]))
    stmt = statement("req", "m1", R0, 0, b"dep", "a", BIDS["a"])
    good = seal("a", signers["a"].sign(stmt), stmt)
    outer = codec.decode(good)
    forged = codec.encode([outer[0], "a", bytes(64), None])
    assert b.step(Message(1, forged, "a")) == []
    assert b.stats["bad_signature"] == 1
    outsider_stmt = statement("req", "m1", R0, 0, b"dep", "outsider", {"x": 1})
    outsider = seal("outsider", signers["outsider"].sign(outsider_stmt), outsider_stmt)
    b.step(Message(1, outsider, "outsider"))
    assert b.stats["not_member"] == 1
    b.step(Message(1, b"\xff\x00garbage", "a"))
    assert b.stats["malformed"] == 1
    other = statement("req", "m2", R0, 0, b"dep", "a", BIDS["a"])
    b.step(Message(1, seal("a", signers["a"].sign(other), other), "a"))
    assert b.stats["other_market"] == 1
    # published under another node's topic: the transport's sender disagrees with the signer
    b.step(Message(1, good, "c"))
    assert b.stats["sender_mismatch"] == 1
    # a replay from another round kind with the same sequence number is ignored
    settle = statement("req", "m1", RoundId(0, "settle"), 0, b"dep", "a", 5)
    b.step(Message(1, seal("a", signers["a"].sign(settle), settle), "a"))
    assert b.stats["other_round"] == 1
    # a vote whose view field is not an integer never reaches the state machine
    with pytest.raises(MessageError):
        Decoder().envelope(
            codec.encode([codec.encode(["vote", "m1", [0, "clear"], "x", b""]), "a", b"", None])
        )


def test_non_canonical_cbor_is_refused() -> None:
    stmt = statement("sync", "m1", R0, 0, b"")
    wire = seal("a", b"\x01" * 64, stmt)
    assert wire[0] == 0x84
    long_form = b"\x98\x04" + wire[1:]  # the same array with a non-shortest length
    with pytest.raises(MessageError, match="canonical"):
        Decoder().envelope(long_form)


def test_restart_from_persisted_records_recovers_and_asks_for_the_decision(trio) -> None:
    nodes, signers = trio
    a = nodes["a"]
    disk: dict[RoundId, bytes] = {}
    actions = a.step(Open(0, R0, b"dep", BIDS["a"]))
    for other in ("b", "c"):
        reqs = sent(nodes[other].step(Open(0, R0, b"dep", BIDS[other])), "req")
        actions += a.step(Message(1, reqs, other))
    assert kinds(actions) == ["req", "Persist", "prop"], "the proposal (our vote) is on disk first"
    for action in actions:
        if isinstance(action, Persist):
            disk[action.round] = action.record
    assert codec.decode(disk[R0])["votes"][0][0] == 0
    again = Node(signers["a"], a.keyring, a.contracts, delta_ms=D, records=list(disk.values()))
    assert again.rounds[R0].recovering
    actions = again.step(Tick(5))
    assert kinds(actions) == ["sync"], "a recovering node does not vote: it asks for the result"
    with pytest.raises(ConsensusError, match="unreadable consensus record"):
        Node(signers["a"], a.keyring, a.contracts, delta_ms=D, records=[b"\x00not cbor"])


def test_misuse_is_a_specific_error(trio) -> None:
    nodes, signers = trio
    with pytest.raises(ConsensusError, match="no contract for round kind 'auction'"):
        nodes["a"].step(Open(0, RoundId(0, "auction")))
    with pytest.raises(ConsensusError, match="not in the membership"):
        Node(signers["outsider"], nodes["a"].keyring, {}, delta_ms=D)
    with pytest.raises(ConsensusError, match="delta_ms"):
        Node(signers["a"], nodes["a"].keyring, {}, delta_ms=1)
    nodes["a"].step(Open(0, R0))
    with pytest.raises(ConsensusError, match="already open"):
        nodes["a"].step(Open(0, RoundId(0, "settle")))


def test_keyring_caches_p256_checks() -> None:
    key = PrivateKey.from_secret(12345)
    membership = membership_for("m1", {"a": key.public_key()})
    keyring = Keyring(membership)
    sig = key.sign(b"msg")
    assert keyring.verify("a", b"msg", sig) and keyring.verify("a", b"msg", sig)
    assert not keyring.verify("a", b"other", sig)
    assert not keyring.verify("nobody", b"msg", sig)
    assert keyring.cache.hits >= 1


@pytest.fixture
def fresh() -> tuple[dict[str, Node], dict[str, Any]]:
    """Three fresh members and a listed submit-only participant "p"."""
    signers = p256_identities(["a", "b", "c", "p"], seed=12)
    keys = public_keys(signers)
    membership = membership_for("m1", {i: keys[i] for i in ("a", "b", "c")})
    keyring = Keyring(membership, {"p": keys["p"]}, cache=VerificationCache())
    contracts = {"clear": DoubleAuction(), "settle": Tally()}
    nodes = {
        i: Node(signers[i], keyring, contracts, delta_ms=D, decoder=Decoder())
        for i in ("a", "b", "c")
    }
    return nodes, signers


def signed_request(signers: dict[str, Any], who: str, rid: RoundId, body: Any) -> bytes:
    stmt = statement("req", "m1", rid, 0, b"dep-" + who.encode(), who, body)
    return seal(who, signers[who].sign(stmt), stmt)


def test_a_fresh_node_holds_requests_for_the_round_it_is_about_to_open(fresh) -> None:
    nodes, signers = fresh
    far = RoundId(1000, "clear")  # far beyond 0: a real market's rounds follow the clock
    b = nodes["b"]
    assert b.primary(far, 0) == "b"
    bid_p = {"side": "buy", "wh": 300, "price": 180}
    # the participant bids ahead of the nodes; a and c open first (their clocks run ahead)
    for_b = [(signed_request(signers, "p", far, bid_p), "p")]
    for name in ("a", "c"):
        for_b.append((sent(nodes[name].step(Open(0, far, b"dep", BIDS[name])), "req"), name))
    for data, sender in for_b:
        assert b.step(Message(1, data, sender)) == [], "not open yet: held, nothing to do"
    assert {e.sender for e in b.held[far]} == {"p", "a", "c"}
    assert b.stats["out_of_window"] == 0 and b.stats["held_dropped"] == 0
    # on opening, the held requests are replayed: the primary holds every member's
    # request at once and proposes over all of them, the participant's included
    actions = b.step(Open(2, far, b"dep", BIDS["b"]))
    assert kinds(actions) == ["Persist", "req", "prop"]
    assert set(b.rounds[far].requests) == {"a", "b", "c", "p"}
    value = Decoder().proposal(sent(actions, "prop")).value
    assert value is not None
    assert {r.submitter for r in value.requests} == {"a", "b", "c", "p"}
    assert far not in b.held and not b.rounds[far].recovering


def test_the_pre_open_buffer_is_bounded_and_counts_its_drops(fresh) -> None:
    nodes, signers = fresh
    b = nodes["b"]
    bid = {"side": "buy", "wh": 1, "price": 1}
    # one sender may start holding at most 2 * lookahead + 1 rounds before any Open; what
    # it sends beyond is its own loss (counted), not a reason to distrust the round
    for seq in range(10, 10 + PRE_OPEN_PER_SENDER + 2):
        b.step(Message(0, signed_request(signers, "p", RoundId(seq, "clear"), bid), "p"))
    assert len(b.held) == PRE_OPEN_PER_SENDER and b.stats["held_dropped"] == 2
    dropped = RoundId(10 + PRE_OPEN_PER_SENDER, "clear")
    assert not b.overflowed
    actions = b.step(Open(1, dropped, b"dep", BIDS["b"]))
    assert not b.rounds[dropped].recovering and "req" in kinds(actions)
    # rounds outside the window around the first open are let go (and counted)
    window = range(dropped.seq - LOOKAHEAD_ROUNDS, dropped.seq + LOOKAHEAD_ROUNDS + 1)
    assert all(r.seq in window for r in b.held)
    assert b.stats["out_of_window"] == PRE_OPEN_PER_SENDER - len(b.held)
    # once anchored, the window applies again
    b.step(Message(2, signed_request(signers, "p", RoundId(500, "clear"), bid), "p"))
    assert b.stats["out_of_window"] == PRE_OPEN_PER_SENDER - len(b.held) + 1
    # the rounds in all are bounded too: once every sender filled its share, a further
    # round cannot be held and is marked lost (it finishes through a certificate)
    c = nodes["c"]
    seq = 100
    for who in ("a", "b", "p"):
        for _ in range(PRE_OPEN_PER_SENDER):
            c.step(Message(0, signed_request(signers, who, RoundId(seq, "clear"), bid), who))
            seq += 1
    assert len(c.held) == PRE_OPEN_ROUNDS_PER_MEMBER * 3
    # a copy of a held message is not held twice
    again = signed_request(signers, "a", RoundId(100, "clear"), bid)
    c.step(Message(0, again, "a"))
    assert c.stats["held_duplicate"] == 1
    stmt = statement("sync", "m1", RoundId(seq, "clear"), 0, b"")
    c.step(Message(0, seal("a", signers["a"].sign(stmt), stmt), "a"))
    assert c.stats["held_sync_ignored"] == 1, "a sync cannot be answered before the round opens"
    extra = signed_request(signers, "a", RoundId(seq + 1, "clear"), bid)
    before = c.stats["held_dropped"]
    c.step(Message(0, extra, "a"))
    assert c.stats["held_dropped"] == before + 1 and not c.overflowed, "a's own share is full"


def test_a_member_relays_what_it_held_and_votes_no_when_a_relayed_bid_is_left_out(fresh) -> None:
    nodes, signers = fresh
    a, b = nodes["a"], nodes["b"]
    bid_p = signed_request(signers, "p", R0, {"side": "buy", "wh": 300, "price": 180})
    # b holds the participant's bid before it opens: its own request relays it
    assert b.step(Message(0, bid_p, "p")) == []
    actions = b.step(Open(1, R0, b"dep-b", BIDS["b"]))
    relayed = Decoder().envelope(sent(actions, "req"))
    assert relayed.attachment == [bid_p]
    assert b.rounds[R0].relayed == frozenset({"p"})
    # a (the primary) learns the bid from b's relay alone
    a_req = sent(a.step(Open(1, R0, b"dep-a", BIDS["a"])), "req")
    a.step(Message(2, sent(actions, "req"), "b"))
    b.step(Message(2, a_req, "a"))
    assert "p" in a.rounds[R0].requests
    # a proposal that leaves the relayed bid out gets b's no
    c_req = sent(nodes["c"].step(Open(1, R0, b"dep-c", BIDS["c"])), "req")
    b.step(Message(2, c_req, "c"))
    rs = b.rounds[R0]

    def proposal_over(submitters: tuple[str, ...]) -> Any:
        requests = tuple(rs.requests[s] for s in submitters)
        result = DoubleAuction().execute(requests)
        value = b.decoder.value("m1", R0, [[r.raw for r in requests], result])
        return a.decoder.proposal(a.sign_proposal(a.rounds[R0], value, None)[0])

    assert b._judge(rs, proposal_over(("a", "b", "c"))) == "censored"
    assert b._judge(rs, proposal_over(("a", "b", "c", "p"))) == "ok"


def test_malformed_relays_are_refused_and_counted(fresh) -> None:
    nodes, signers = fresh
    a = nodes["a"]
    a.step(Open(0, R0, b"dep-a", BIDS["a"]))
    stmt = statement("req", "m1", R0, 0, b"dep-b", "b", BIDS["b"])
    sig = signers["b"].sign(stmt)
    a.step(Message(1, seal("b", sig, stmt, {"not": "a list"}), "b"))
    assert a.stats["invalid_req"] == 1 and "relayed requests" in a.last_error
    other_round = signed_request(signers, "p", RoundId(7, "clear"), 1)
    forged = codec.encode([codec.decode(signed_request(signers, "p", R0, 1))[0], "p",
                           bytes(64), None])  # fmt: skip
    a.step(Message(2, seal("b", sig, stmt, [other_round, forged, b"junk"]), "b"))
    assert "p" not in a.rounds[R0].requests, "nothing of another round or forged is taken"
    assert a.stats["bad_signature"] >= 1 and a.stats["malformed"] >= 1
    assert "b" in a.rounds[R0].requests  # b's own request stands
