"""Named SDBFT scenarios (M7): the source's two cases, the n = 5, f = 2 equivocation, censorship,
crash and catch-up, rotation and the liveness bound, on the simulator with real P-256 keys."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.consensus.contracts import ClearingContract, DoubleAuction
from edge_agent.consensus.messages import RoundId
from edge_agent.consensus.node import Commit, Final, liveness_bound_ms
from meterchain.market import verify
from meterchain.market.clearing import ClearingResult
from meterchain.market.reference import reference_market, reference_request
from tests.consensus.byzantine import Censor, Equivocator, Liar, Tamperer, tamper_clearing
from tests.consensus.conftest import CLEAR, SETTLE, Market, auction_bids


def commits_of(mk: Market, name: str, rid: RoundId) -> list[Commit]:
    return [a for a in mk.inst(name).actions if isinstance(a, Commit) and a.round == rid]


def finals_of(mk: Market, name: str, rid: RoundId) -> list[Final]:
    return [a for a in mk.inst(name).actions if isinstance(a, Final) and a.round == rid]


def assert_one_final_result(mk: Market, names: list[str], rid: RoundId) -> Commit:
    """Every named node committed exactly once, all the same value, and holds the certificate."""
    commits = [commits_of(mk, name, rid) for name in names]
    assert all(len(c) == 1 for c in commits), {n: c for n, c in zip(names, commits, strict=True)}
    digests = {c[0].digest for c in commits}
    assert len(digests) == 1, digests
    for name in names:
        finals = finals_of(mk, name, rid)
        assert len(finals) == 1 and finals[0].digest in digests
        finals[0].certificate.verify(mk.keyring.membership)
    return commits[0][0]


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_fault_free_round_is_final_in_view_0_with_at_most_3n_publishes(market, n: int) -> None:
    mk = market(n)
    mk.open_all(CLEAR, 0, auction_bids(mk.ids))
    mk.sim.run(40 * mk.delta)
    commit = assert_one_final_result(mk, mk.ids, CLEAR)
    assert commit.view == 0
    assert [r.submitter for r in commit.value.requests] == mk.ids
    assert commit.value.result == DoubleAuction().execute(commit.value.requests)
    assert commit.value.result["price"] is not None
    publishes = sum(mk.sim.publishes.values())
    # n requests, 1 proposal (carrying the primary's vote), n-1 votes, up to n finals
    assert mk.sim.publishes["req"] == n and mk.sim.publishes["prop"] == 1
    assert mk.sim.publishes["vote"] == n - 1
    assert 2 * n + 1 < publishes <= 3 * n
    bound = liveness_bound_ms(mk.delta, 0)
    assert all(mk.inst(i).commits[CLEAR][0] <= bound for i in mk.ids)


def test_lying_backup_does_not_stop_the_round(market) -> None:
    """Source scenario 1a: a backup lies (signs everything, blames an honest primary at once,
    attests finality of anything, claims a lock it cannot prove): the round is still final."""
    mk = market(4, classes={"n1": Liar})
    mk.open_all(CLEAR, 0, auction_bids(mk.ids))
    mk.sim.run(60 * mk.delta)
    correct = ["n0", "n2", "n3"]
    commit = assert_one_final_result(mk, correct, CLEAR)
    assert commit.view == 0, "an honest primary is never replaced by a minority's blame"
    assert commit.value.result == DoubleAuction().execute(commit.value.requests)
    assert mk.node("n2").stats["invalid_status"] >= 1  # the unprovable lock claim was refused


def test_crashed_backup_does_not_stop_the_round(market) -> None:
    """Source scenario 1b: a backup crashes before the round: still final, in view 0."""
    mk = market(4)
    mk.sim.crash(0, "n2")
    mk.open_all(CLEAR, 1, auction_bids(mk.ids))
    mk.sim.run(60 * mk.delta)
    commit = assert_one_final_result(mk, ["n0", "n1", "n3"], CLEAR)
    assert commit.view == 0
    assert "n2" not in [r.submitter for r in commit.value.requests]
    assert mk.inst("n0").commits[CLEAR][0] <= liveness_bound_ms(mk.delta, 1)


class ClearingTamperer(Tamperer):
    """The primary raises its own price and lowers another seller's in the real clearing result."""

    def make_result(self, rid: RoundId, requests: tuple[Any, ...]) -> Any:
        honest = self.contracts[rid.kind].execute(requests)
        return tamper_clearing(honest, self.node_id, "mg4-wind-farm", 50_000)


def test_tampering_primary_is_detected_replaced_and_the_honest_result_is_final(market) -> None:
    """Source scenario 2: the primary raises its own price and lowers another seller's in the real
    Nash-bargaining clearing result; every backup's check fails, they blame it, the next primary
    re-runs the clearing and the honest result becomes final."""
    request = reference_request(12)
    order = ["mg3-solar-park", "mg1-campus", "mg2-hospital", "mg4-wind-farm"]
    contract = ClearingContract(reference_market(), 12)
    mk = market(4, classes={order[0]: ClearingTamperer}, delta=20, node_ids=order)
    bodies = {r.microgrid.id: r.to_dict() for r in request.requests}
    mk.open_all(CLEAR, 0, bodies)
    for inst in mk.sim.instances.values():
        inst.node.contracts["clear"] = contract  # type: ignore[attr-defined]
    mk.sim.run(120 * mk.delta)
    primary, backups = order[0], order[1:]
    commit = assert_one_final_result(mk, backups, CLEAR)
    assert commit.view == 1, "the tampered view-0 proposal must not become final"
    assert mk.node(backups[0]).primary(CLEAR, 1) == "mg1-campus"
    for name in backups:
        assert mk.node(name).stats["rejected_proposal"] == 1, name
    honest = contract.execute(commit.value.requests)
    assert commit.value.result == honest
    assert honest["rejected"] == []
    result = ClearingResult.from_dict(honest["result"])
    sc1, _ = contract.clearing_request(commit.value.requests)
    assert verify.check(sc1, result).accepted
    forged = tamper_clearing(honest, primary, "mg4-wind-farm", 50_000)
    forged_result = ClearingResult.from_dict(forged["result"])
    verdict = verify.check(sc1, forged_result)
    assert not verdict.accepted and verdict.problems

    # the forgery really raised the primary's trade money and lowered the other seller's
    def earned(res: ClearingResult) -> dict[str, int]:
        out: dict[str, int] = {}
        for trade in res.executed[0].trades:
            out[trade.seller] = out.get(trade.seller, 0) + trade.amount
        return out

    own, bad = earned(result), earned(forged_result)
    assert bad[primary] > own[primary] and bad["mg4-wind-farm"] < own["mg4-wind-farm"]


def test_equivocation_n5_f2_example_never_finalises_two_results(market) -> None:
    """SPEC M7 amendment example: n = 5, f = 2. The primary sends X to two honest nodes and Y to
    the third; both faulty nodes sign both, so X and Y both gather 3 signatures. Votes forward
    the proposal, so every honest node sees both within delta, nobody treats either as final,
    the equivocation proof replaces the primary, and exactly one result becomes final."""
    split = [{"n1", "n2", "n4"}, {"n3", "n4"}]
    mk = market(5, classes={"n0": Equivocator, "n4": Liar}, kwargs={"n0": {"split": split}})
    mk.open_all(CLEAR, 0, auction_bids(mk.ids))
    d = mk.delta
    mk.sim.run(2 * d + 1 + 3)  # proposals out at 2 delta + 1, votes one hop later
    qcs = mk.node("n1").rounds[CLEAR].qcs
    view0 = {vd for (view, vd) in qcs if view == 0}
    assert len(view0) == 2, "both X and Y reach a quorum certificate: QCs alone are not enough"
    mk.sim.run(100 * d)
    correct = ["n1", "n2", "n3"]
    commit = assert_one_final_result(mk, correct, CLEAR)
    assert commit.view >= 1
    for name in correct:
        assert mk.node(name).stats["equivocation"] >= 1
        assert all(c.view != 0 for c in commits_of(mk, name, CLEAR))


def test_censored_backup_votes_no_and_a_censoring_primary_is_replaced(market) -> None:
    """A backup whose own request is missing votes no (blames). When a quorum still certifies
    the value it accepts it (it cannot stop a majority); when the censored nodes are needed
    for the quorum, the primary is replaced and the next one includes every request."""
    mk = market(4, classes={"n0": Censor}, kwargs={"n0": {"victims": frozenset({"n1"})}})
    mk.open_all(CLEAR, 0, auction_bids(mk.ids))
    mk.sim.run(60 * mk.delta)
    commit = assert_one_final_result(mk, ["n1", "n2", "n3"], CLEAR)
    assert mk.node("n1").stats["rejected_proposal"] == 1
    assert commit.view == 0 and "n1" not in [r.submitter for r in commit.value.requests]

    mk = market(4, classes={"n0": Censor}, kwargs={"n0": {"victims": frozenset({"n1", "n2"})}})
    mk.open_all(CLEAR, 0, auction_bids(mk.ids))
    mk.sim.run(80 * mk.delta)
    commit = assert_one_final_result(mk, ["n1", "n2", "n3"], CLEAR)
    assert commit.view == 1
    assert {"n1", "n2"} <= {r.submitter for r in commit.value.requests}


def test_crashed_primary_is_replaced_and_catches_up_after_restart(market) -> None:
    """kill -9 the primary before it proposes: the next primary finishes the round within the
    bound; the restarted node recovers from its disk and learns the result with its certificate."""
    mk = market(4)
    mk.open_all(CLEAR, 0, auction_bids(mk.ids))
    mk.sim.crash(0, "n0")  # right after it opened and sent its request, before it proposes
    mk.sim.restart(40 * mk.delta, "n0")
    mk.sim.run(120 * mk.delta)
    commit = assert_one_final_result(mk, ["n1", "n2", "n3"], CLEAR)
    assert commit.view == 1
    assert all(
        mk.inst(i).commits[CLEAR][0] <= liveness_bound_ms(mk.delta, 1) for i in ["n1", "n2", "n3"]
    )
    recovered = commits_of(mk, "n0", CLEAR)
    assert len(recovered) == 1 and recovered[0].view == -1 and recovered[0].digest == commit.digest
    assert finals_of(mk, "n0", CLEAR)[0].digest == commit.digest
    assert mk.inst("n0").restarts == 1


def test_primary_crash_after_proposing_still_commits_and_restart_catches_up(market) -> None:
    mk = market(4)
    mk.open_all(CLEAR, 0, auction_bids(mk.ids))
    # with every request in after 1 ms the primary proposes at once; kill it just after
    mk.sim.crash(2, "n0")
    mk.sim.restart(30 * mk.delta, "n0")
    mk.sim.run(100 * mk.delta)
    commit = assert_one_final_result(mk, ["n1", "n2", "n3"], CLEAR)
    assert commit.view == 0
    assert finals_of(mk, "n0", CLEAR)[0].digest == commit.digest


def test_node_down_for_a_whole_round_catches_up(market) -> None:
    mk = market(4)
    mk.sim.crash(0, "n3")
    mk.open_all(CLEAR, 1, auction_bids(mk.ids))
    mk.open_all(SETTLE, 30 * mk.delta, {i: 5 for i in mk.ids})
    mk.sim.restart(70 * mk.delta, "n3")
    mk.sim.run(140 * mk.delta)
    for rid in (CLEAR, SETTLE):
        commit = assert_one_final_result(mk, ["n0", "n1", "n2"], rid)
        assert finals_of(mk, "n3", rid)[0].digest == commit.digest


def test_primary_rotates_after_every_clearing_and_settlement(market) -> None:
    mk = market(4)
    rounds = [RoundId(s, "clear" if s % 2 == 0 else "settle") for s in range(6)]
    for s, rid in enumerate(rounds):
        body = auction_bids(mk.ids) if rid.kind == "clear" else {i: s for i in mk.ids}
        mk.open_all(rid, 25 * mk.delta * s, body)
    mk.sim.trace = []
    mk.sim.run(25 * mk.delta * 7)
    proposers = [line.split()[1] for line in mk.sim.trace if line.endswith("-> prop *")]
    assert proposers == ["n0", "n1", "n2", "n3", "n0", "n1"]
    for rid in rounds:
        assert assert_one_final_result(mk, mk.ids, rid).view == 0


def test_liveness_bound_with_three_consecutive_crashed_primaries_n7(market) -> None:
    mk = market(7, delta=10)
    for name in ("n0", "n1", "n2"):
        mk.sim.crash(0, name)
    mk.open_all(CLEAR, 1, auction_bids(mk.ids))
    mk.sim.run(200 * mk.delta)
    correct = ["n3", "n4", "n5", "n6"]
    commit = assert_one_final_result(mk, correct, CLEAR)
    assert commit.view == 3
    latest = max(mk.inst(i).commits[CLEAR][0] for i in correct) - 1
    assert latest <= liveness_bound_ms(mk.delta, 3)


def test_twins_of_the_primary_cannot_split_the_correct_nodes() -> None:
    """Twins: two copies of the view-0 primary share its key, each talking to a random half of
    the others in each round, so they propose (and vote) differently; correct nodes agree."""
    from tests.consensus.scenarios import Scenario, build, check

    for seed in range(60):
        check(build(Scenario(seed=seed, n=4, faults={"n0": "twins"}, gaps=[40])))
        check(build(Scenario(seed=seed, n=5, faults={"n0": "twins", "n1": "liar"}, gaps=[0])))
