"""A submit-only agent bids through three consensus agents over a real Mosquitto, and its config."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from consensus_site import round_driver, write_site

from edge_agent import config as agent_config
from edge_agent.bid import build_market
from edge_agent.consensus.messages import (
    RoundId,
    Value,
    final_statement,
    seal,
    statement,
    value_digest,
)
from edge_agent.consensus_clearing import clearing_round, start_consensus
from edge_agent.consensus_submit import FinalCollector, RoundWait, start_submitter
from edge_agent.forecast import HourlyProfile
from edge_agent.rounds import RoundOutcome
from hil.broker import MosquittoBroker
from meterchain.errors import ConfigError
from meterchain.keys import PrivateKey
from meterchain.mqtt_auth import node_acl
from meterchain.quorum import Member, Membership

NODES = ("mg1", "mg2", "mg3")
LISTED, UNLISTED = "mg4", "mg5"  # submit-only: mg4 is in the participants file, mg5 is not
NOON = 1_700_049_600  # 2023-11-15T12:00Z
# Generous for a loaded machine: solving four bids must fit well inside delta.
DELTA_S = 0.2

# mg1 has far more sun than it needs; everyone else needs green power it can sell.
PROFILES = {
    "mg1": HourlyProfile((12000,) * 24, (2000,) * 24),
    "mg2": HourlyProfile((500,) * 24, (3000,) * 24),
    "mg3": HourlyProfile((0,) * 24, (2000,) * 24),
    "mg4": HourlyProfile((0,) * 24, (3000,) * 24),
    "mg5": HourlyProfile((0,) * 24, (3000,) * 24),
}


def _participants_toml(keys: dict[str, PrivateKey]) -> str:
    return "".join(
        f'[[participant]]\nid = "{n}"\npublic_key = "{k.public_key().point.hex()}"\n'
        for n, k in keys.items()
    )


def _wait(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_listed_submitter_is_cleared_and_verifies_the_result(
    tmp_path: Path, mosquitto_factory
) -> None:
    everyone = (*NODES, LISTED, UNLISTED)
    keys = {n: PrivateKey.generate() for n in everyone}
    broker: MosquittoBroker = mosquitto_factory(
        users={n: f"pw-{n}" for n in everyone}, acl="".join(node_acl("m1", n) for n in everyone)
    )
    membership = Membership("m1", 1, tuple(Member(n, keys[n].public_key()) for n in NODES))
    (tmp_path / "membership.toml").write_text(membership.signed_by(PrivateKey.generate()).to_toml())
    (tmp_path / "participants.toml").write_text(_participants_toml({LISTED: keys[LISTED]}))
    node_role = 'role = "node"\nmembership = "../membership.toml"\n'
    node_role += 'participants = "../participants.toml"'
    submit_role = 'role = "submitter"\nmembership = "../membership.toml"'
    cfgs = {
        n: agent_config.load(
            write_site(
                tmp_path / n,
                n,
                keys[n],
                broker.url,
                str(broker.ca_file),
                node_role if n in NODES else submit_role,
                delta_s=DELTA_S,
            )
        )
        for n in everyone
    }
    assert cfgs[LISTED].consensus.role == "submitter"

    async def scenario() -> tuple[list[RoundOutcome], dict[str, RoundOutcome]]:
        nodes = {
            n: start_consensus(
                cfgs[n],
                build_market(cfgs[n].market),
                on_primary_change=lambda: None,
            )
            for n in NODES
        }
        subs = {n: start_submitter(cfgs[n]) for n in (LISTED, UNLISTED)}
        try:
            # Fresh nodes, never opened a round: the participants bid first (they must reach
            # the primary before its proposal), and every node holds the bid until it opens.
            sub_tasks = {
                n: asyncio.ensure_future(round_driver(cfgs[n], c, PROFILES[n], NOON).prepare(NOON))
                for n, c in subs.items()
            }
            rid = clearing_round(NOON)

            def held(node: str) -> bool:
                envs = nodes[node].runner.node.held.get(rid, [])
                return LISTED in {e.sender for e in envs}

            def ignored(node: str) -> bool:
                return nodes[node].runner.node.stats["not_member"] >= 1

            for n in NODES:
                await asyncio.to_thread(_wait, lambda n=n: held(n), f"{n} to hold mg4's bid")
                await asyncio.to_thread(_wait, lambda n=n: ignored(n), f"{n} to drop mg5's bid")
            outcomes = await asyncio.gather(
                *(
                    round_driver(cfgs[n], c, PROFILES[n], NOON).prepare(NOON)
                    for n, c in nodes.items()
                )
            )
            return list(outcomes), {n: await t for n, t in sub_tasks.items()}
        finally:
            for clearing in nodes.values():
                clearing.runner.stop()
            for sub in subs.values():
                sub.stop()

    outcomes, submitted = asyncio.run(scenario())
    assert all(not o.error for o in outcomes), [o.error for o in outcomes]
    result = outcomes[0].result
    assert result is not None
    assert all(o.result is not None and o.result.digest == result.digest for o in outcomes)
    # The listed participant's bid is in the committed clearing, and it got the same result.
    assert result.microgrids == (*NODES, LISTED)
    mine = submitted[LISTED]
    assert not mine.error and mine.result is not None
    assert mine.result.digest == result.digest
    executed = result.executed[0]
    assert mine.dispatch == executed.dispatch[result.index_of(LISTED)]
    assert {t.seller for t in executed.trades} == {"mg1"}
    assert LISTED in {t.buyer for t in executed.trades}
    # The unlisted one was ignored: it verified the same final result and found itself left out.
    other = submitted[UNLISTED]
    assert other.result is None and "left out" in other.error
    # (A change of primary is allowed: the solve with four bids may outlast a small delta.)


def _config(tmp_path: Path, consensus: str, extra: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    key = PrivateKey.generate()
    member = PrivateKey.generate()
    membership = Membership("m1", 1, (Member("mg1", member.public_key()),))
    (tmp_path / "membership.toml").write_text(membership.to_toml())
    if extra:
        (tmp_path / "participants.toml").write_text(extra)
    return write_site(
        tmp_path / "mg4", "mg4", key, "mqtt://localhost:1883", "", consensus, delta_s=DELTA_S
    )


def _fails(tmp_path: Path, consensus: str, extra: str = "") -> ConfigError:
    path = _config(tmp_path, consensus, extra)
    path.write_text(path.read_text().replace('ca_file = ""\n', ""))
    with pytest.raises(ConfigError) as info:
        agent_config.load(path)
    return info.value


def test_a_submitter_needs_a_membership_that_does_not_list_it(tmp_path: Path) -> None:
    err = _fails(tmp_path, 'role = "submitter"')
    assert err.key == "consensus.membership" and "submitter" in str(err)
    (tmp_path / "mg4").rename(tmp_path / "old")
    path = _config(tmp_path, 'role = "submitter"\nmembership = "../membership.toml"')
    path.write_text(path.read_text().replace('ca_file = ""\n', ""))
    cfg = agent_config.load(path)
    assert cfg.consensus.role == "submitter" and cfg.consensus.participants is None


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[[participant]]\nid = "mg4"\n', "participant[0].public_key", "missing"),
        ('[[participant]]\nid = "m g"\npublic_key = "04"\n', "participant[0].id", "node id"),
        ('[[participant]]\nid = "mg4"\npublic_key = "04ab"\n', "participant[0].public_key", ""),
        ('[[participant]]\nid = "mg4"\nkey = "04"\n', "participant[0].key", "unknown key"),
        ('participants = []\n', "participants", "unknown key"),
        ("participant = 3\n", "participant", "array of tables"),
    ],
)
def test_a_bad_participants_file_names_file_and_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    err = _fails(
        tmp_path,
        'role = "node"\nmembership = "../membership.toml"\nparticipants = "../participants.toml"',
        text,
    )
    assert err.key == key and problem in str(err)
    assert Path(err.path).resolve() == (tmp_path / "participants.toml").resolve()


def test_participants_are_checked_against_the_membership_and_the_role(tmp_path: Path) -> None:
    node = 'role = "node"\nmembership = "../membership.toml"\nparticipants = "../participants.toml"'
    twice = PrivateKey.generate().public_key().point.hex()
    err = _fails(
        tmp_path,
        node,
        f'[[participant]]\nid = "mg5"\npublic_key = "{twice}"\n' * 2,
    )
    assert err.key == "participant[1].id" and "twice" in str(err)
    err = _fails(
        tmp_path / "b",
        'role = "submitter"\nmembership = "../membership.toml"\n'
        'participants = "../participants.toml"',
        f'[[participant]]\nid = "mg5"\npublic_key = "{twice}"\n',
    )
    assert err.key == "consensus.participants" and "node" in str(err)
    err = _fails(tmp_path / "c", node.replace("participants.toml", "missing.toml"))
    assert err.key == "consensus.participants"


def test_participants_may_not_be_members(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        'role = "node"\nmembership = "../membership.toml"\nparticipants = "../participants.toml"',
    )
    member = Membership.load(tmp_path / "membership.toml").members[0]
    (tmp_path / "participants.toml").write_text(
        f'[[participant]]\nid = "mg1"\npublic_key = "{member.public_key.point.hex()}"\n'
    )
    # mg4 lists itself as mg1's sibling: make it a member so the membership check passes
    own = PrivateKey.load(tmp_path / "mg4" / "node.key").public_key()
    (tmp_path / "membership.toml").write_text(
        Membership("m1", 1, (member, Member("mg4", own))).to_toml()
    )
    path.write_text(path.read_text().replace('ca_file = ""\n', ""))
    with pytest.raises(ConfigError) as info:
        agent_config.load(path)
    assert info.value.key == "consensus.participants" and "'mg1' is a member" in str(info.value)


def _finals_setup() -> tuple[dict[str, PrivateKey], Membership, RoundId, bytes, list]:
    keys = {n: PrivateKey.generate() for n in (*NODES, LISTED)}
    membership = Membership("m1", 1, tuple(Member(n, keys[n].public_key()) for n in NODES))
    rid = clearing_round(NOON)
    stmt = statement("req", "m1", rid, 0, b"d", LISTED, {"bid": 1})
    req = seal(LISTED, keys[LISTED].sign(stmt), stmt)
    value_cbor = [[req], {"result": None, "rejected": []}]
    vd = value_digest("m1", rid, [req], value_cbor[1])
    return keys, membership, rid, vd, value_cbor


def _final(key: PrivateKey, sender: str, rid: RoundId, vd: bytes, attachment: object) -> bytes:
    stmt = final_statement("m1", rid, vd)
    return seal(sender, key.sign(stmt), stmt, attachment)


def test_a_result_counts_only_with_a_finality_certificate_of_members() -> None:
    keys, membership, rid, vd, value_cbor = _finals_setup()
    collector = FinalCollector(membership)

    async def scenario() -> Value | None:
        loop = asyncio.get_running_loop()
        wait = RoundWait(loop.create_future(), loop)
        pending = {rid: wait}
        # the primary's final carries the value; alone it is no certificate (q = 2 of 3)
        primary = _final(keys["mg1"], "mg1", rid, vd, [value_cbor, None, None])
        collector.feed(pending, primary, "mg1")
        # a participant is no member; a member's final signed with another key is forged
        collector.feed(pending, _final(keys[LISTED], LISTED, rid, vd, None), LISTED)
        collector.feed(pending, _final(keys[LISTED], "mg2", rid, vd, None), "mg2")
        # a final relayed under another sender's topic is refused
        collector.feed(pending, _final(keys["mg3"], "mg3", rid, vd, None), "mg2")
        await asyncio.sleep(0.05)
        assert not wait.future.done()
        collector.feed(pending, _final(keys["mg3"], "mg3", rid, vd, None), "mg3")
        return await asyncio.wait_for(wait.future, 5)

    value = asyncio.run(scenario())
    assert value is not None and value.digest == vd
    assert len(collector.rejected) == 3, collector.rejected
    assert "not a member" in collector.rejected[0] and "does not verify" in collector.rejected[1]
