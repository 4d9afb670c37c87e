"""Ledger rules: quorum, regulator vetoes, certificates, multi-signed orders, membership, exits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_world import H0, T0, World, build_world, hour_readings, order_terms

from meterchain import reading
from meterchain.ledger.block import Block, BlockError
from meterchain.ledger.chain import ChainError, StoreReadings, verify_store
from meterchain.ledger.readings import HOUR
from meterchain.ledger.review import accept_block
from meterchain.ledger.state import membership_fields
from meterchain.ledger.store import LedgerConflict, open_store
from meterchain.ledger.transactions import Tx, TxError, signed
from meterchain.quorum import Member, Membership

T_NEXT = (H0 + 4) * HOUR  # after the world's last block


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(open_store(str(tmp_path / "ledger.db")))
    yield w
    w.store.close()


def _refused(world: World, txs: list[Tx], match: str, time: int = T_NEXT) -> None:
    head = world.store.head()
    with pytest.raises(TxError, match=match):
        world.chain.commit(txs, time)
    assert world.store.head() == head, "a refused block must not be stored"


# --- quorum ------------------------------------------------------------------------


def test_a_block_with_too_few_signatures_is_refused(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    assert chain.state is not None
    block = sb.seal(chain.build([], T_NEXT), signers=["node1"])
    with pytest.raises(BlockError, match=r"1 signature\(s\) on 'block'; more than n/2 = 2 of 3"):
        accept_block(chain.state, block, {}, StoreReadings(world.store))
    # Even if it reached the store behind the aggregator's back, verify names it.
    world.store.append(block)
    with pytest.raises(ChainError, match=r"block 8: quorum certificate: 1 signature\(s\)"):
        verify_store(world.store)


def test_signatures_of_outsiders_or_for_another_block_do_not_count(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    assert chain.state is not None
    block = chain.build([], T_NEXT)
    other = chain.build([], T_NEXT + 1)
    stolen = sb.seal(other).qc
    assert stolen is not None
    with pytest.raises(BlockError, match="certificate certifies"):
        accept_block(chain.state, block.with_qc(stolen), {}, StoreReadings(world.store))
    sb.node_ids.append("mallory")
    outsider = sb.seal(block, signers=["node0", "mallory"])
    with pytest.raises(BlockError, match="'mallory' is not a member"):
        accept_block(chain.state, outsider, {}, StoreReadings(world.store))


def test_a_new_membership_certifies_the_blocks_after_it(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    members = tuple(Member(n, sb.key(n).public_key()) for n in ("node1", "node2", "node3"))
    new = Membership("m1", 2, members).signed_by(sb.regulator)
    chain.commit([Tx.make("membership", membership_fields(new))], T_NEXT)
    old_style = sb.seal(chain.build([], T_NEXT + 1), signers=["node0", "node1"])
    assert chain.state is not None
    with pytest.raises(BlockError, match="'node0' is not a member"):
        accept_block(chain.state, old_style, {}, StoreReadings(world.store))
    chain.commit([], T_NEXT + 2, signers=["node2", "node3"])
    verify_store(world.store)
    forged = Membership("m1", 3, members).signed_by(sb.key("mg1"))
    _refused(
        world, [Tx.make("membership", membership_fields(forged))], "regulator signature",
        T_NEXT + 3,
    )  # fmt: skip


# --- regulator veto (M24) ------------------------------------------------------------


def test_a_veto_is_a_new_record_and_never_rewrites_history(world: World) -> None:
    store, sb = world.store, world.sandbox
    assert world.vetoed_tx is not None and world.veto_tx is not None
    state, _ = verify_store(store)
    assert state is not None
    assert state.orders["o2"].status == "vetoed"
    assert state.txs[world.vetoed_tx.hash].vetoed_by == world.veto_tx.hash
    # The vetoed order is still recorded byte for byte in block 2, next to o1.
    stored = store.stored_block(2)
    assert world.vetoed_tx.raw in [body for _, _, body in stored.txs]
    # The veto carries its published reason and the regulator's signature.
    veto = Tx.decode(store.stored_block(5).txs[0][2])
    assert veto.body["reason"] == "seller line limit exceeded"
    # History cannot be replaced: another block 2 without the order is refused...
    rival = sb.seal(
        Block.build(
            market="m1", height=2, prev=store.stored_block(1).hash, time=T0 + 30,
            round=0, proposer="aggregator", txs=[world.order_tx],
        )
    )  # fmt: skip
    with pytest.raises(LedgerConflict, match="block 2: another block"):
        store.append(rival)
    # ...and a vetoed order is halted: the contract client never fires it.
    fire = Tx.make(
        "contract_fire", {"order": "o2", "delivered_wh": 0, "payment": 0, "refund": 40_000}
    )
    _refused(world, [fire], "order o2 is not open")


def test_vetoes_must_be_signed_reasoned_and_about_an_open_record(world: World) -> None:
    sb = world.sandbox
    assert world.order_tx is not None and world.vetoed_tx is not None
    forged = signed(
        "m1", "veto",
        {"target": world.vetoed_tx.hash, "reason": "x", "time": T_NEXT}, sb.key("mg2"),
    )  # fmt: skip
    _refused(world, [forged], "regulator signature does not verify")
    _refused(world, [sb.veto(world.vetoed_tx.hash, "again", T_NEXT)], "already vetoed")
    _refused(world, [sb.veto(world.order_tx.hash, "late", T_NEXT)], "never modified")
    _refused(world, [sb.veto(bytes(32), "nothing", T_NEXT)], "not a recorded transaction")
    with pytest.raises(TxError, match="'reason' must be a non-empty published reason"):
        sb.veto(world.order_tx.hash, "  ", T_NEXT)


# --- green certificates (M22) ---------------------------------------------------------


def test_a_certificate_is_retired_once_only(world: World) -> None:
    sb = world.sandbox
    again = sb.owner_signed(
        "cert_retire",
        {"certs": ["pv1-1"], "owner": "mg2", "period": 2027, "purpose": "twice", "time": T_NEXT},
        "mg2",
    )
    _refused(world, [again], "certificate pv1-1 was retired by mg2")
    sell = sb.owner_signed(
        "cert_transfer", {"certs": ["pv1-1"], "from": "mg2", "to": "mg1", "time": T_NEXT}, "mg2"
    )
    _refused(world, [sell], "was retired")
    state, _ = verify_store(world.store)
    assert state is not None
    assert state.certificate_balances() == {"mg2": {"held": 0, "retired": 1}}


def test_a_certificate_traces_back_to_signed_readings(world: World) -> None:
    state, _ = verify_store(world.store)
    assert state is not None
    cert = state.certificates.certificates["pv1-1"]
    assert (cert.owner, cert.retired_by, cert.retired_for) == ("mg2", "mg2", 2026)
    source = StoreReadings(world.store)
    registry = state.registry()
    total = 0
    for share in cert.readings:
        found = source.reading(share.digest)
        assert found is not None
        verified = reading.verify(found[0].cose, registry)  # the meter's own signature
        assert (verified.meter_id, verified.seq, verified.renewable) == ("pv1", share.seq, True)
        total += share.energy_wh
    assert total == 1_000_000  # exactly one MWh, every Wh of it from a signed reading
    # Reading 1 only set the baseline; readings 2..11 carry 100 kWh each.
    assert [s.seq for s in cert.readings] == list(range(2, 12))


def test_certificate_issues_must_be_earned_and_counted_once(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    twice = Tx.make("cert_issue", {"meter": "pv1", "to_seq": 12, "certs": ["pv1-2"]})
    _refused(world, [twice], "readings up to seq 12 are counted")
    # 0.4 MWh more plus the 0.1 MWh carried over earn no full certificate yet.
    rs = [
        sb.reading("pv1", 100, (H0 + 4) * HOUR, 0, 1_500_000, "pv"),
        sb.reading("ld1", 100, (H0 + 4) * HOUR, 900_000, 0, "load"),
    ]
    chain.commit_readings(rs, (H0 + 5) * HOUR + 5)
    t = (H0 + 5) * HOUR + 10
    greedy = Tx.make("cert_issue", {"meter": "pv1", "to_seq": 100, "certs": ["pv1-2"]})
    _refused(world, [greedy], r"the readings earn \[\], the issue says \['pv1-2'\]", t)
    missing = Tx.make("cert_issue", {"meter": "pv1", "to_seq": 99, "certs": []})
    _refused(world, [missing], "reading seq 99 is not on the ledger", t)
    not_green = Tx.make("cert_issue", {"meter": "ld1", "to_seq": 100, "certs": []})
    _refused(world, [not_green], "not a renewable source", t)
    # Counting without a certificate yet is allowed and moves the carry on.
    chain.commit([Tx.make("cert_issue", {"meter": "pv1", "to_seq": 100, "certs": []})], t)
    assert chain.state is not None
    assert chain.state.certificates.accounts["pv1"].carry_wh == 500_000


def test_only_the_owner_moves_a_certificate(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    rs = hour_readings(sb, H0 + 4, 100) + hour_readings(sb, H0 + 5, 200)
    chain.commit_readings(rs, (H0 + 6) * HOUR)
    # Registers rose from 1.1 MWh (seq 12) to 3.5 MWh (seq 205): 2.4 MWh + 0.1 carried.
    issue = Tx.make("cert_issue", {"meter": "pv1", "to_seq": 205, "certs": ["pv1-2", "pv1-3"]})
    chain.commit([issue], (H0 + 6) * HOUR + 1)
    theft = signed(
        "m1", "cert_transfer", {"certs": ["pv1-2"], "from": "mg1", "to": "mg2", "time": T_NEXT},
        sb.key("mg2"), field="owner_sig",
    )  # fmt: skip
    _refused(world, [theft], "signature of owner mg1", (H0 + 6) * HOUR + 2)
    not_theirs = sb.owner_signed(
        "cert_transfer", {"certs": ["pv1-2"], "from": "mg2", "to": "mg1", "time": T_NEXT}, "mg2"
    )
    _refused(world, [not_theirs], "'mg2' does not own certificate pv1-2", (H0 + 6) * HOUR + 2)
    verify_store(world.store)


# --- trade orders (M11, M27) and the contract client (M26) ------------------------------


def test_an_order_needs_all_three_party_signatures(world: World) -> None:
    terms = order_terms("o3", H0 + 6, 10_000, T_NEXT)
    _refused(world, [world.sandbox.order(terms, signers=["mg1", "mg2"])], r"missing \['grid'\]")
    forged = world.sandbox.order(terms)
    body = dict(forged.body)
    body["signatures"] = {**body["signatures"], "mg1": body["signatures"]["mg2"]}
    _refused(world, [Tx.make("order", body)], "signature of mg1 does not verify")


def test_a_change_needs_every_original_signer(world: World) -> None:
    sb = world.sandbox
    world.chain.commit([sb.order(order_terms("o3", H0 + 6, 10_000, T_NEXT))], T_NEXT)
    change = {"order": "o3", "version": 1, "energy_wh": 12_000, "price": 850, "delivery": H0 + 6}
    _refused(world, [sb.order_change(change, ["mg1", "mg2"])], "missing", T_NEXT + 1)
    world.chain.commit([sb.order_change(change, ["mg1", "mg2", "grid"])], T_NEXT + 1)
    assert world.chain.state is not None
    assert world.chain.state.orders["o3"].energy_wh == 12_000
    stale = {**change, "price": 900}
    _refused(world, [sb.order_change(stale, ["mg1", "mg2", "grid"])], "version 2", T_NEXT + 2)


def test_the_contract_client_fires_and_forfeits_by_the_rule(world: World) -> None:
    state, _ = verify_store(world.store)
    assert state is not None
    o1 = state.orders["o1"]
    assert o1.status == "fired"
    fired = Tx.decode(world.store.stored_block(6).txs[1][2])
    # mg1 exported 600 kWh of 700 contracted; mg2 imported 450 kWh: 450 kWh delivered.
    assert fired.body == {"order": "o1", "delivered_wh": 450_000, "payment": 360_000,
                          "refund": 200_000}  # fmt: skip
    forfeits = [
        Tx.decode(body).body for kind, _, body in world.store.stored_block(6).txs
        if kind == "deposit_forfeit"
    ]  # fmt: skip
    assert forfeits == [
        {"order": "o1", "party": "mg1", "amount": 285,
         "reason": f"delivered 600000 of 700000 Wh in hour {H0 + 1}"},
        {"order": "o1", "party": "mg2", "amount": 714,
         "reason": f"took 450000 of 700000 Wh in hour {H0 + 1}"},
    ]  # fmt: skip
    # A firing that pays the seller more than the rule gives is refused.
    assert state.orders["o2"].status == "vetoed"


def test_a_participant_with_open_orders_cannot_leave(world: World) -> None:
    sb = world.sandbox
    world.chain.commit([sb.order(order_terms("o3", H0 + 6, 10_000, T_NEXT))], T_NEXT)
    _refused(
        world, [sb.participant_exit("mg2", "voluntary", "moving", T_NEXT + 1)],
        r"open orders \['o3'\]", T_NEXT + 1,
    )  # fmt: skip
    world.chain.commit([sb.participant_exit("mg2", "banned", "wash trading", T_NEXT + 1)],
                       T_NEXT + 1)  # fmt: skip
    _refused(world, [sb.participant("mg2", "microgrid", T_NEXT + 2)], "banned", T_NEXT + 2)
    # Its meters left with it: their readings are no longer accepted.
    late = [sb.reading("ld2", 500, T_NEXT + 5, 9_000_000, 0, "load")]
    with pytest.raises(TxError, match="meter ld2 is not registered"):
        world.chain.commit_readings(late, T_NEXT + 3600)


@pytest.mark.parametrize("name", ["mg9\n", "\nmg9", "mg 9", "", "a" * 65, "mg9\x00", "ü"])
def test_transaction_names_are_matched_whole(name: str) -> None:
    """`^...$` with `match` accepted "mg9\\n": names are matched in full."""
    body = {"id": "mg9", "mode": "voluntary", "reason": "x", "time": T0,
            "regulator_sig": bytes(64)}  # fmt: skip
    assert Tx.make("participant_exit", body).body["id"] == "mg9"
    with pytest.raises(TxError, match="participant_exit: field 'id'"):
        Tx.make("participant_exit", {**body, "id": name})
