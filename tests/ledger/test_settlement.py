"""Committed clearings and settlements on the ledger: certified, re-executed, conserved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_world import H0, World, build_world, two_microgrid_clearing

from meterchain import codec
from meterchain.ledger.chain import ChainError, verify_store
from meterchain.ledger.readings import HOUR
from meterchain.ledger.settle import settlement_tx, value_digest
from meterchain.ledger.store import open_store
from meterchain.ledger.transactions import Tx, TxError
from meterchain.market.clearing import ClearingRequest
from meterchain.market.settlement import MeteredHour, settle

T_NEXT = (H0 + 4) * HOUR


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(open_store(str(tmp_path / "ledger.db")))
    yield w
    w.store.close()


def _settlement(world: World) -> Tx:
    stored = world.store.stored_block(6)
    return Tx.decode(next(body for kind, _, body in stored.txs if kind == "settlement"))


def test_recorded_settlement_is_the_contract_on_metered_readings(world: World) -> None:
    request, result = two_microgrid_clearing((H0 + 1) % 24)
    tx = _settlement(world)
    metered = [MeteredHour(*row) for row in codec.decode(tx.body["metered"])]
    # mg1: pv1 exported 600 kWh, ld1 drew 150 kWh; mg2: ld2 400 kWh, PCC meter 50 in / 10 out.
    assert [m.to_list() for m in metered] == [
        ["mg1", 600_000, 14_395, 150_000, 0, 0],
        ["mg2", 0, 105_850, 400_000, 50_000, 10_000],
    ]
    expected = settle(request, result, metered)
    assert codec.decode(tx.body["result"]) == expected.to_dict()
    assert sum(expected.balances().values()) == 0  # money is conserved
    assert tx.body["clearing"] == world.clearing_tx.hash if world.clearing_tx else False


def test_a_certified_but_wrong_settlement_is_named(world: World) -> None:
    """Even a block the members signed cannot carry a settlement the readings do not give."""
    chain, sb = world.chain, world.sandbox
    state = chain.state
    assert state is not None
    # Delivery hour H0+3 is cleared and metered, then settled with a doctored result.
    request, result = two_microgrid_clearing((H0 + 5) % 24)
    chain.commit([sb.clearing(H0 + 5, request, result, round=9)], (H0 + 4) * HOUR + 1)
    chain.commit_readings(_hour(world, H0 + 5), (H0 + 6) * HOUR + 1)
    good = settlement_tx(chain.state, H0 + 5)
    doctored = codec.decode(good.body["result"])
    doctored["entries"][1][2] += 100
    bad = Tx.make("settlement", {**good.body, "result": codec.encode(doctored)})
    with pytest.raises(TxError, match=f"re-executed settlement of hour {H0 + 5} differs"):
        chain.commit([bad], (H0 + 6) * HOUR + 2)
    world.store.append(sb.seal(chain.build([bad], (H0 + 6) * HOUR + 2)))
    with pytest.raises(
        ChainError,
        match=rf"block 10: tx 0 \(settlement hour={H0 + 5}\): re-executed settlement of hour",
    ):
        verify_store(world.store)


def test_metered_values_must_be_the_ledgers(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    request, result = two_microgrid_clearing((H0 + 5) % 24)
    chain.commit([sb.clearing(H0 + 5, request, result, round=9)], (H0 + 4) * HOUR + 1)
    assert chain.state is not None
    early = settlement_tx(chain.state, H0 + 5)
    with pytest.raises(TxError, match="cannot be settled before it has ended"):
        chain.commit([early], (H0 + 5) * HOUR + 100)
    chain.commit_readings(_hour(world, H0 + 5), (H0 + 6) * HOUR + 1)
    good = settlement_tx(chain.state, H0 + 5)
    rows = codec.decode(good.body["metered"])
    rows[0][1] += 1000  # claim 1 kWh more green generation
    bad = Tx.make("settlement", {**good.body, "metered": codec.encode(rows)})
    with pytest.raises(TxError, match="metered values of hour .* differ"):
        chain.commit([bad], (H0 + 6) * HOUR + 2)
    chain.commit([good], (H0 + 6) * HOUR + 2)
    with pytest.raises(TxError, match="replay of the transaction in block 10"):
        chain.commit([good], (H0 + 6) * HOUR + 3)
    with pytest.raises(TxError, match="already settled"):
        chain.commit([bad], (H0 + 6) * HOUR + 3)
    verify_store(world.store)


def test_clearing_needs_a_quorum_over_exactly_its_value(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    request, result = two_microgrid_clearing((H0 + 5) % 24)
    t = (H0 + 5) * HOUR - 10  # during hour H0+4, the world's blocks end early in it
    with pytest.raises(TxError, match=r"clearing QC: 1 signature\(s\) on 'vote'"):
        chain.commit([sb.clearing(H0 + 5, request, result, signers=["node0"])], t)
    genuine = sb.clearing(H0 + 5, request, result)
    other_request, other_result = two_microgrid_clearing((H0 + 6) % 24)
    swapped = Tx.make(
        "clearing",
        {**genuine.body, "result": other_result.to_cbor(), "request": other_request.to_cbor()},
    )
    with pytest.raises(TxError, match="the certified value is not this clearing result"):
        chain.commit([swapped], t)
    wrong_request = Tx.make("clearing", {**genuine.body, "request": other_request.to_cbor()})
    with pytest.raises(TxError, match="computed for another request"):
        chain.commit([wrong_request], t)
    other_round = Tx.make("clearing", {**genuine.body, "round": 2})
    with pytest.raises(TxError, match="clearing QC is for round"):
        chain.commit([other_round], t)
    other_view = Tx.make("clearing", {**genuine.body, "view": 3})
    with pytest.raises(TxError, match="clearing QC is for view 0, not 3"):
        chain.commit([other_view], t)
    with pytest.raises(TxError, match="its clearing comes too late"):
        chain.commit([genuine], (H0 + 6) * HOUR)
    chain.commit([genuine], t)
    # A node that caught up through a finality certificate records it with view -1.
    final_request, final_result = two_microgrid_clearing((H0 + 6) % 24)
    chain.commit([sb.clearing(H0 + 6, final_request, final_result, round=8, final=True)], t)
    with pytest.raises(TxError, match="already has a committed clearing"):
        chain.commit([sb.clearing(H0 + 5, request, result, round=3)], t + 1)
    verify_store(world.store)


def test_a_vetoed_clearing_is_never_settled(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    request, result = two_microgrid_clearing((H0 + 5) % 24)
    clearing = sb.clearing(H0 + 5, request, result)
    chain.commit([clearing], (H0 + 5) * HOUR - 10)
    chain.commit([sb.veto(clearing.hash, "line 3 overload in hour 5", (H0 + 5) * HOUR - 5)],
                 (H0 + 5) * HOUR - 5)  # fmt: skip
    chain.commit_readings(_hour(world, H0 + 5), (H0 + 6) * HOUR + 1)
    assert chain.state is not None
    with pytest.raises(TxError, match="was vetoed"):
        chain.commit([settlement_tx(chain.state, H0 + 5)], (H0 + 6) * HOUR + 2)


def test_value_digest_matches_the_consensus_wire_format() -> None:
    """The ledger checks clearing QCs with the SDBFT formulas, byte for byte."""
    from edge_agent.consensus import messages

    request: ClearingRequest = two_microgrid_clearing(1)[0]
    rid = messages.RoundId(4, "clear")
    raws: list[bytes] = []
    result = {"x": 1}
    assert value_digest("m1", rid.to_cbor(), raws, result) == messages.value_digest(
        "m1", rid, [], result
    )
    assert codec.encode(["vote", "m1", [4, "clear"], 2, b"d" * 32]) == messages.vote_statement(
        "m1", rid, 2, b"d" * 32
    )
    assert request.digest == codec.digest(request.to_dict())


def _hour(world: World, hour: int):
    from ledger_world import hour_readings

    return hour_readings(world.sandbox, hour, 1000 + 10 * (hour - H0))
