"""Block formation with reviewing consensus nodes: each re-executes and keeps its own ledger."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ledger"))

from ledger_world import H0, T0, hour_readings, order_terms, two_microgrid_clearing  # noqa: E402

from aggregator.former import BlockFormer, verify_for_ingest  # noqa: E402
from meterchain import codec  # noqa: E402
from meterchain.ledger.block import BlockError  # noqa: E402
from meterchain.ledger.chain import verify_store  # noqa: E402
from meterchain.ledger.readings import HOUR  # noqa: E402
from meterchain.ledger.review import (  # noqa: E402
    BlockReviewer,
    Proposal,
    encode_committed,
    parse_reply,
)
from meterchain.ledger.sandbox import Sandbox  # noqa: E402
from meterchain.ledger.store import LedgerStore, open_store  # noqa: E402
from meterchain.ledger.transactions import Tx  # noqa: E402


@dataclass
class Market:
    sandbox: Sandbox
    former: BlockFormer
    reviewers: list[BlockReviewer]

    @property
    def store(self) -> LedgerStore:
        return self.former.store

    def round(self, now: int, voters: int | None = None) -> tuple[Proposal | None, list[str]]:
        """Propose, collect the reviewers' answers, commit on a quorum; refusal reasons."""
        formation = self.former.propose(now)
        proposal = formation.proposal
        if proposal is None:
            return None, []
        return proposal, self.vote_and_commit(proposal, now, voters)

    def vote_and_commit(self, proposal: Proposal, now: int, voters: int | None = None) -> list[str]:
        votes, refusals = [], []
        for reviewer in self.reviewers[:voters]:
            reply = parse_reply(reviewer.review(proposal.encode(), now))
            if reply.kind == "block-vote":
                votes.append((reply.node_id, reply.signature))
            else:
                refusals.append(reply.reason)
        if len(votes) * 2 > len(self.reviewers):
            block = self.former.commit(proposal, votes)
            for reviewer in self.reviewers[:voters]:
                reviewer.committed(encode_committed(block))
        return refusals


@pytest.fixture
def market(tmp_path: Path):
    sb = Sandbox(market="m1", members=3)
    store = open_store(str(tmp_path / "aggregator.db"))
    regulator = sb.regulator.public_key()
    reviewers = [
        BlockReviewer(open_store(str(tmp_path / f"{n}.db")), n, sb.key(n), regulator=regulator)
        for n in sb.node_ids
    ]
    former = BlockFormer(store, None, proposer="aggregator", settle_grace_s=60)
    m = Market(sb, former, reviewers)
    genesis = former.propose_genesis(
        sb.genesis_tx(T0),
        [sb.participant(p, role, T0) for p, role in
         (("mg1", "microgrid"), ("mg2", "microgrid"), ("grid", "grid"), ("dispatch", "dispatch"))],
        T0,
    )  # fmt: skip
    assert m.vote_and_commit(genesis, T0) == []
    former.state = reviewers[0].state
    yield m
    store.close()
    for r in reviewers:
        r.store.close()


def _ingest(m: Market, readings, now: int) -> None:
    assert m.former.state is not None
    verified = []
    for r in readings:
        got, why = verify_for_ingest(r.cose, m.former.state, now)
        assert why is None, why
        verified.append(got)
    m.store.ingest_readings(verified)


def test_a_market_day_is_formed_reviewed_and_kept_alike_by_every_node(market: Market) -> None:
    m, sb = market, market.sandbox
    for meter, owner, source in (("pv1", "mg1", "pv"), ("ld1", "mg1", "load"),
                                 ("ld2", "mg2", "load"), ("bd2", "mg2", "bidir")):  # fmt: skip
        m.store.submit_tx(sb.meter(meter, owner, source, T0), T0 + 5)
    proposal, refusals = m.round(T0 + 10)
    assert proposal is not None and refusals == []
    assert [t.kind for t in proposal.block.txs] == ["meter"] * 4
    # An order and the consensus agents' committed clearing for H0+1, then two hours of readings.
    request, result = two_microgrid_clearing((H0 + 1) % 24)
    m.store.submit_tx(sb.order(order_terms("o1", H0 + 1, 700_000, T0 + 20)), T0 + 20)
    m.store.submit_tx(sb.clearing(H0 + 1, request, result, round=7), T0 + 21)
    _ingest(m, hour_readings(sb, H0, 1), T0 + 3000)
    proposal, _ = m.round(T0 + 3599)
    assert proposal is not None
    assert [t.kind for t in proposal.block.txs] == ["order", "clearing", "readings"]
    _ingest(m, hour_readings(sb, H0 + 1, 7), (H0 + 2) * HOUR)
    # Right after hour H0+1 ends its readings are batched, but settlement waits the grace
    # period, and certificates count only readings of earlier blocks.
    proposal, _ = m.round((H0 + 2) * HOUR + 5)
    assert proposal is not None
    assert [t.kind for t in proposal.block.txs] == ["readings"]
    proposal, _ = m.round((H0 + 2) * HOUR + 61)
    assert proposal is not None
    assert [t.kind for t in proposal.block.txs] == ["settlement", "cert_issue"]
    assert proposal.block.txs[1].body == {"meter": "pv1", "to_seq": 12, "certs": ["pv1-1"]}
    # At H0+3 the contract client fires o1 and forfeits both defaulters' deposits.
    proposal, _ = m.round((H0 + 3) * HOUR)
    assert proposal is not None
    assert [t.kind for t in proposal.block.txs] == [
        "contract_fire", "deposit_forfeit", "deposit_forfeit",
    ]  # fmt: skip
    assert m.round((H0 + 3) * HOUR + 10) == (None, [])  # nothing left to do
    assert m.store.inbox_readings() == [] and m.store.pending_txs() == []
    head = m.store.head()
    for reviewer in m.reviewers:
        assert reviewer.store.head() == head  # every node holds the same ledger
        verify_store(reviewer.store)
    _, report = verify_store(m.store)
    assert report.readings == 48 and report.blocks == 6


def test_invalid_pending_transactions_are_dropped_with_a_reason(market: Market) -> None:
    m, sb = market, market.sandbox
    forged = Tx.make("participant", {**sb.participant("mg9", "consumer", T0).body,
                                     "regulator_sig": bytes(64)})  # fmt: skip
    good = sb.participant("mg8", "consumer", T0)
    m.store.submit_tx(forged, T0 + 1)
    m.store.submit_tx(good, T0 + 2)
    formation = m.former.propose(T0 + 10)
    assert [(tx.body["id"], why) for tx, why in formation.dropped] == [
        ("mg9", "regulator signature does not verify")
    ]
    assert formation.proposal is not None
    assert [t.body["id"] for t in formation.proposal.block.txs] == ["mg8"]
    assert [t.hash for t in m.store.pending_txs()] == [good.hash]


def test_a_block_needs_more_than_half_of_the_members(market: Market) -> None:
    m, sb = market, market.sandbox
    m.store.submit_tx(sb.participant("mg8", "consumer", T0), T0 + 2)
    formation = m.former.propose(T0 + 10)
    assert formation.proposal is not None
    head = m.store.head()
    reply = parse_reply(m.reviewers[0].review(formation.proposal.encode(), T0 + 10))
    with pytest.raises(BlockError, match=r"1 signature\(s\) on 'block'; more than n/2 = 2 of 3"):
        m.former.commit(formation.proposal, [(reply.node_id, reply.signature)])
    assert m.store.head() == head
    assert m.vote_and_commit(formation.proposal, T0 + 10, voters=2) == []
    assert m.store.head() != head


def test_reviewers_refuse_a_doctored_proposal(market: Market) -> None:
    m, sb = market, market.sandbox
    m.store.submit_tx(sb.meter("pv1", "mg1", "pv", T0), T0 + 1)
    assert m.round(T0 + 10)[1] == []
    _ingest(m, [sb.reading("pv1", s, T0 + 60 * s, 0, 10 * s, "pv") for s in range(1, 5)], T0 + 300)
    proposal = m.former.propose(T0 + 400).proposal
    assert proposal is not None
    # The aggregator (or a man in the middle) swaps one reading's bytes for another's.
    batch = list(proposal.readings[0])
    batch[1] = sb.reading("pv1", 2, T0 + 120, 0, 99_999, "pv")
    doctored = Proposal(proposal.block, {0: tuple(batch)})
    refusals = m.vote_and_commit(doctored, T0 + 400)
    assert refusals == ["block 2: tx 0 (reading batch): Merkle root mismatch"] * 3
    too_early = m.vote_and_commit(proposal, T0 - 1000)
    assert all("ahead of my clock" in r for r in too_early)
    assert m.vote_and_commit(proposal, T0 + 400) == []
    # A re-proposal of readings already committed is refused, not double-counted.
    again = Proposal(
        type(proposal.block).build(
            market="m1", height=3, prev=m.store.head()[1], time=T0 + 500, round=0,
            proposer="aggregator", txs=proposal.block.txs,
        ),
        proposal.readings,
    )  # fmt: skip
    assert all("already committed" in r for r in m.vote_and_commit(again, T0 + 500))


def test_ingest_verifies_against_the_meters_on_the_ledger(market: Market) -> None:
    m, sb = market, market.sandbox
    assert m.former.state is not None
    r = sb.reading("pv1", 1, T0 + 60, 0, 10, "pv")
    got, why = verify_for_ingest(r.cose, m.former.state, T0 + 100)
    assert got is None and why is not None and why.startswith("unknown_meter:")
    m.store.submit_tx(sb.meter("pv1", "mg1", "pv", T0), T0 + 1)
    m.round(T0 + 10)
    got, why = verify_for_ingest(r.cose, m.former.state, T0 + 100)
    assert why is None and got is not None and got.digest == r.digest
    forged = bytearray(r.cose)
    forged[-3] ^= 1
    got, why = verify_for_ingest(bytes(forged), m.former.state, T0 + 100)
    assert got is None and why is not None and why.startswith("bad_signature:")
    assert codec.decode(r.cose, tags=frozenset({18})) is not None  # COSE_Sign1


@pytest.mark.parametrize("method", ["adjust", "price"])
def test_the_weak_centre_cuts_a_congested_hour_before_it_is_settled(
    market: Market, method: str
) -> None:
    """M25 through the former: every reviewer re-runs the flow and settles the cut trades
    ("adjust"), or the notice prices the line for the re-bid and the hour settles as cleared."""
    from meterchain.ledger.transactions import signed
    from meterchain.market import congestion
    from meterchain.market.network import Line, Network

    m, sb = market, market.sandbox
    m.former.congestion_method = method
    for meter, owner, source in (("pv1", "mg1", "pv"), ("ld1", "mg1", "load"),
                                 ("ld2", "mg2", "load"), ("bd2", "mg2", "bidir")):  # fmt: skip
        m.store.submit_tx(sb.meter(meter, owner, source, T0), T0 + 5)
    request, result = two_microgrid_clearing((H0 + 1) % 24)

    def feeder(limit_w: int) -> Network:
        line = Line("sub-far", "sub", "far", 100, limit_w)
        return Network("f", "sub", ("sub", "far"), (line,), (("mg1", "far"), ("mg2", "sub")))

    flow = congestion.check(feeder(10**9), result).loadings[0].flow_w
    network = feeder(abs(flow) - 20_000)
    grid = signed("m1", "grid_network", {"network": network.to_cbor(), "time": T0}, sb.regulator)
    m.store.submit_tx(grid, T0 + 6)
    m.store.submit_tx(sb.clearing(H0 + 1, request, result, round=7), T0 + 21)
    proposal, refusals = m.round(T0 + 30)
    assert proposal is not None and refusals == []
    assert [t.kind for t in proposal.block.txs] == ["meter"] * 4 + [
        "grid_network", "clearing", "congestion",
    ]  # fmt: skip
    record = congestion.Adjustment.from_cbor(proposal.block.txs[-1].body["record"])
    assert record.method == method and "sub-far" in record.reason
    if method == "adjust":
        assert record.total_cut_wh == 20_000 and record.line_prices == ()
    else:
        assert record.cuts == () and [p[0] for p in record.line_prices] == ["sub-far"]
        assert record.charges[0][0] == "mg1" and record.charges[0][1] > 0
    _ingest(m, hour_readings(sb, H0, 1), T0 + 3000)
    _ingest(m, hour_readings(sb, H0 + 1, 7), (H0 + 2) * HOUR)
    assert m.round((H0 + 2) * HOUR + 5)[1] == []
    proposal, refusals = m.round((H0 + 2) * HOUR + 61)
    assert proposal is not None and refusals == []
    settlement = next(t for t in proposal.block.txs if t.kind == "settlement")
    deliveries = codec.decode(settlement.body["result"])["deliveries"]
    kept = [c.kept_wh for c in record.cuts] or [t.energy_wh for t in result.executed[0].trades]
    assert [d[2] for d in deliveries] == kept
    head = m.store.head()
    for reviewer in m.reviewers:
        assert reviewer.store.head() == head
        verify_store(reviewer.store)
