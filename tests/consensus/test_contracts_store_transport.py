"""Contracts a round agrees on, the fsynced round log, and the MQTT transport's reconnection."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.consensus.contracts import ClearingContract, DoubleAuction, Tally
from edge_agent.consensus.messages import (
    Decoder,
    Request,
    RoundId,
    blame_statement,
    seal,
    statement,
)
from edge_agent.consensus.node import Broadcast, Commit, Node, Persist
from edge_agent.consensus.signing import Keyring, p256_identities, public_keys
from edge_agent.consensus.sim import membership_for
from edge_agent.consensus.store import RoundLog
from edge_agent.consensus.transport import MqttLink, MqttSettings, NodeRunner, open_store
from meterchain import codec
from meterchain.market.reference import reference_market, reference_request
from meterchain.mqtt_auth import consensus_topic, node_acl

SIGNERS = p256_identities(["s1", "s2", "b1", "b2", "x"], seed=5)
R = RoundId(3, "clear")


def req(who: str, body: Any) -> Request:
    stmt = statement("req", "m1", R, 0, b"dep", who, body)
    return Decoder().request(seal(who, SIGNERS[who].sign(stmt), stmt))


def test_double_auction_matches_best_bids_at_a_uniform_price() -> None:
    requests = [
        req("b1", {"side": "buy", "wh": 3000, "price": 200}),
        req("b2", {"side": "buy", "wh": 2000, "price": 120}),
        req("s1", {"side": "sell", "wh": 2500, "price": 100}),
        req("s2", {"side": "sell", "wh": 4000, "price": 150}),
        req("x", {"side": "sell", "wh": -5, "price": 1}),
    ]
    result = DoubleAuction().execute(requests)
    # b1 takes 2500 from s1 (200 >= 100) and 500 from s2 (200 >= 150); b2 at 120 < 150 stops
    assert result["price"] == (200 + 150) // 2
    assert result["fills"] == [["b1", -3000, -525], ["s1", 2500, 437], ["s2", 500, 87]]
    assert result["rejected"] == ["x"]
    assert sum(amount for _, _, amount in result["fills"]) <= 0  # never pays out more than in
    assert DoubleAuction().check(requests, result)
    assert not DoubleAuction().check(requests, {**result, "price": 176})
    assert DoubleAuction().execute([]) == {"price": None, "fills": [], "rejected": []}
    assert Tally().execute([req("s1", 5), req("s2", 7), req("x", "no")]) == {"count": 3, "sum": 12}


def test_clearing_contract_rejects_bad_bodies_and_verifies_instead_of_comparing() -> None:
    request = reference_request(12)
    contract = ClearingContract(reference_market(), 12)
    ids = list(request.ids)
    signers = p256_identities([*ids, "intruder"], seed=9)

    def signed(who: str, body: Any) -> Request:
        stmt = statement("req", "m1", R, 0, b"dep", who, body)
        return Decoder().request(seal(who, signers[who].sign(stmt), stmt))

    good = [signed(r.microgrid.id, r.to_dict()) for r in request.requests]
    # a microgrid bidding under another's name, and a body that is not a trade request
    impostor = signed("intruder", request.requests[0].to_dict())
    junk = signed("intruder", {"microgrid": 3})
    result = contract.execute([*good, impostor])
    assert result["rejected"] == ["intruder"] and result["result"] is not None
    assert contract.check([*good, impostor], result)
    assert contract.execute([junk]) == {"result": None, "rejected": ["intruder"]}
    # a result that moves one trade's money is refused
    forged = codec.decode(codec.encode(result))
    trade = forged["result"]["executed"][0]["trades"][0]
    trade[3] += 1000
    assert not contract.check([*good, impostor], forged)
    assert not contract.check(good, {"result": None})
    assert not contract.check([*good, impostor], {**result, "rejected": []})
    # the window's first hour may come from the round (rolling clearing, one round per hour)
    by_round = ClearingContract(reference_market(), lambda rid: 12 if rid == R else 0)
    assert by_round.execute(good) == contract.execute(good)


def test_round_log_survives_a_torn_write_and_compacts(tmp_path: Path) -> None:
    log = RoundLog(tmp_path)
    records = [codec.encode({"round": [i % 3, "clear"], "view": i}) for i in range(9)]
    log.append(records[:5])
    log.append(records[5:])
    log.close()
    with open(tmp_path / "consensus.log", "ab") as f:
        f.write(b"\x00\x00\x00\x40\x12\x34")  # a frame header whose payload never made it
    again = RoundLog(tmp_path)
    assert again.load() == records
    assert (tmp_path / "consensus.log").stat().st_size == sum(8 + len(r) for r in records)
    again.compact()
    latest = again.load()
    assert sorted(codec.decode(r)["view"] for r in latest) == [6, 7, 8]
    again.append([records[0]])
    assert again.load()[-1] == records[0]
    again.close()


@pytest.mark.slow
def test_nodes_reconnect_after_a_broker_restart_and_keep_their_place(
    tmp_path: Path, mosquitto_factory
) -> None:
    ids = ["t0", "t1", "t2"]
    users = {i: f"pw-{i}" for i in ids}
    broker = mosquitto_factory(users=users, acl="".join(node_acl("m1", i) for i in ids))
    signers = p256_identities(ids, seed=21)
    membership = membership_for("m1", public_keys(signers))
    commits: dict[tuple[str, int], Commit] = {}
    done = threading.Condition()

    def on_commit(c: Commit, me: str) -> None:
        with done:
            commits[(me, c.round.seq)] = c
            done.notify_all()

    runners = []
    for i in ids:
        store, records = open_store(tmp_path / i)
        node = Node(
            signers[i], Keyring(membership), {"settle": Tally()}, delta_ms=100, records=records
        )
        settings = MqttSettings(
            broker.host,
            broker.port,
            i,
            users[i],
            str(broker.ca_file),
            client_id=f"rc-{i}",
            backoff_min_s=0.05,
            backoff_max_s=0.5,
        )
        runners.append(
            NodeRunner(node, store, settings, on_commit=lambda c, me=i: on_commit(c, me))
        )
    try:
        for r in runners:
            r.start()
        time.sleep(0.3)
        for seq in (0, 1):
            if seq == 1:
                broker.restart()  # every connection drops; the port and sessions stay
                for r in runners:
                    assert r.link.connected.wait(10), "no reconnection"
            for k, r in enumerate(runners):
                r.open_round(RoundId(seq, "settle"), body=10 * seq + k)
            wanted = [(i, seq) for i in ids]
            with done:
                assert done.wait_for(lambda w=wanted: all(k in commits for k in w), 15), commits
            assert len({commits[(i, seq)].digest for i in ids}) == 1
        assert all(r.link.connects >= 2 for r in runners)
        assert all(not r.errors for r in runners)
        assert commits[("t0", 1)].value.result == {"count": 3, "sum": 33}
    finally:
        for r in runners:
            r.stop()


def test_runner_makes_records_durable_before_publishing(tmp_path: Path) -> None:
    """The transport honours the action order: fsync, then publish; a commit is told at once."""
    signers = p256_identities(["a"], seed=2)
    membership = membership_for("m1", public_keys(signers))
    node = Node(signers["a"], Keyring(membership), {"settle": Tally()}, delta_ms=10)
    events: list[str] = []

    class RecordingLog(RoundLog):
        def append(self, records: Any) -> None:
            events.append(f"fsync {len(list(records))}")

    settings = MqttSettings("127.0.0.1", 1, "a", "pw")
    runner = NodeRunner(
        node, RecordingLog(tmp_path), settings, on_commit=lambda c: events.append("commit")
    )
    runner.link.publish = lambda topic, payload: events.append(f"publish {topic}")  # type: ignore[method-assign]
    fake_commit = Commit(RoundId(0, "settle"), 0, b"d" * 32, None, None)  # type: ignore[arg-type]
    runner._execute(
        [
            Persist(RoundId(0, "settle"), b"r1"),
            Persist(RoundId(1, "settle"), b"r2"),
            fake_commit,
            Broadcast("final", b"x"),
            Broadcast("vote", b"y"),
        ]
    )
    assert events == ["commit", "fsync 2", "publish mc/m1/c/a/final", "publish mc/m1/c/a/vote"]


@pytest.mark.slow
def test_finding2_a_member_flooding_syncs_through_the_broker_cannot_stall_the_next_round(
    tmp_path: Path, mosquitto_factory
) -> None:
    """Finding 2 through a real Mosquitto: member f3 publishes 12n+1 copies of its signed
    `sync` for round 1, and more distinct messages for it than the hold quota, before the
    others open it. Held messages are de-duplicated and bounded per sender, so nobody treats
    round 1 as recovering: the two correct members commit it in view 0 (n = 3, f = 1)."""
    ids = ["f1", "f2", "f3"]
    users = {i: f"pw-{i}" for i in ids}
    broker = mosquitto_factory(users=users, acl="".join(node_acl("m1", i) for i in ids))
    signers = p256_identities(ids, seed=23)
    membership = membership_for("m1", public_keys(signers))
    commits: dict[tuple[str, int], Commit] = {}
    done = threading.Condition()

    def settings(i: str) -> MqttSettings:
        return MqttSettings(
            broker.host, broker.port, i, users[i], str(broker.ca_file), client_id=f"fl-{i}"
        )

    def on_commit(c: Commit, me: str) -> None:
        with done:
            commits[(me, c.round.seq)] = c
            done.notify_all()

    runners = []
    for i in ids[:2]:
        store, records = open_store(tmp_path / i)
        node = Node(
            signers[i], Keyring(membership), {"settle": Tally()}, delta_ms=100, records=records
        )
        runners.append(
            NodeRunner(node, store, settings(i), on_commit=lambda c, me=i: on_commit(c, me))
        )
    flooder = MqttLink(settings("f3"), [], lambda topic, payload: None)
    try:
        for r in runners:
            r.start()
        flooder.start()
        assert flooder.connected.wait(10)
        time.sleep(0.3)
        for k, r in enumerate(runners):
            r.open_round(RoundId(0, "settle"), body=k)
        ahead = RoundId(1, "settle")
        stmt = statement("sync", "m1", ahead, 0, b"")
        copy = seal("f3", signers["f3"].sign(stmt), stmt)
        for _ in range(12 * 3 + 1):
            flooder.publish(consensus_topic("m1", "f3", "sync"), copy)
        for view in range(20):
            blame = blame_statement("m1", ahead, view, membership.node_ids[(1 + view) % 3])
            flooder.publish(consensus_topic("m1", "f3", "blame"),
                            seal("f3", signers["f3"].sign(blame), blame, []))  # fmt: skip
        with done:
            assert done.wait_for(lambda: all((i, 0) in commits for i in ids[:2]), 15), commits
        time.sleep(0.5)  # the flood has been delivered and held
        for k, r in enumerate(runners):
            r.open_round(ahead, body=10 + k)
        with done:
            assert done.wait_for(lambda: all((i, 1) in commits for i in ids[:2]), 15), commits
        assert {commits[(i, 1)].view for i in ids[:2]} == {0}
        for r in runners:
            assert not r.node.overflowed and not r.errors
            assert r.node.stats["held_duplicate"] + r.node.stats["held_sync_ignored"] >= 12 * 3
            assert r.node.stats["held_dropped"] >= 20 - 16
    finally:
        flooder.close()
        for r in runners:
            r.stop()


class MissesProposals(Node):
    """A member whose copy of every proposal is lost on the way: it sees the value's signed
    header only (in the others' votes) and must fetch the value by digest."""

    def step(self, event: Any) -> list[Any]:
        data = getattr(event, "data", None)
        if data is not None and self.decoder.envelope(data).tag == "prop":
            self.stats["proposal_lost"] += 1
            return []
        return super().step(event)


def test_a_member_that_missed_the_proposal_fetches_the_value_by_digest_over_the_broker(
    tmp_path: Path, mosquitto_factory
) -> None:
    """Fetch by digest end to end through a real Mosquitto (TLS, ACLs): g3 never gets the
    primary's proposal, only votes carrying its signed header; it asks (`sync` with view and
    digest), a holder answers (`value`, the primary's whole proposal), g3 checks it, votes,
    and the round commits with all three votes (fast) in view 0 -- at g3 by its own rule or,
    if the others' finals come first, from the finality certificate."""
    ids = ["g1", "g2", "g3"]
    users = {i: f"pw-{i}" for i in ids}
    broker = mosquitto_factory(users=users, acl="".join(node_acl("m1", i) for i in ids))
    signers = p256_identities(ids, seed=29)
    membership = membership_for("m1", public_keys(signers))
    commits: dict[str, Commit] = {}
    done = threading.Condition()

    def on_commit(c: Commit, me: str) -> None:
        with done:
            commits[me] = c
            done.notify_all()

    runners = []
    for i in ids:
        store, records = open_store(tmp_path / i)
        cls = MissesProposals if i == "g3" else Node
        node = cls(signers[i], Keyring(membership), {"settle": Tally()}, delta_ms=150)
        settings = MqttSettings(
            broker.host, broker.port, i, users[i], str(broker.ca_file), client_id=f"fe-{i}"
        )
        runners.append(
            NodeRunner(node, store, settings, on_commit=lambda c, me=i: on_commit(c, me))
        )
    try:
        for r in runners:
            r.start()
        time.sleep(0.3)
        for k, r in enumerate(runners):
            r.open_round(RoundId(0, "settle"), body=k)
        with done:
            assert done.wait_for(lambda: len(commits) == 3, 15), commits
        assert len({c.digest for c in commits.values()}) == 1
        assert commits["g1"].view == commits["g2"].view == 0 and commits["g3"].view in (0, -1)
        g3 = runners[2]
        assert g3.node.stats["proposal_lost"] >= 1 and g3.node.stats["fetch"] >= 1
        assert g3.counts["publish_sync"] >= 1 and g3.counts["publish_vote"] == 1
        assert sum(r.counts["publish_value"] for r in runners[:2]) >= 1
        assert commits["g3"].value.result == {"count": 3, "sum": 3}
        for r in runners:
            assert not r.errors
    finally:
        for r in runners:
            r.stop()
