"""Signed checkpoints: incremental verify equals full replay; a forged checkpoint is refused."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from ledger_world import H0, World, build_world, hour_readings

from meterchain import codec
from meterchain.keys import PrivateKey
from meterchain.ledger import chain as chain_module
from meterchain.ledger import checkpoint as cp
from meterchain.ledger.chain import BadCheckpoint, ChainError, latest_checkpoint, verify_store
from meterchain.ledger.cli import main as ledger_main
from meterchain.ledger.readings import HOUR, LedgerReading
from meterchain.ledger.review import BlockReviewer
from meterchain.ledger.store import LedgerStore, open_store
from meterchain.quorum import QuorumCertificate


def _checkpoint_head(world: World, signers: int = 2) -> cp.Checkpoint:
    """Each of `signers` members verifies and signs the head state; the checkpoint is stored."""
    state, report = verify_store(world.store)
    assert state is not None
    sb = world.sandbox
    sigs = [cp.sign_checkpoint(state, report.head, n, sb.key(n)) for n in sb.node_ids[:signers]]
    checkpoint = cp.combine(state, report.head, sigs)
    _store(world.store, checkpoint)
    return checkpoint


def _store(store: LedgerStore, c: cp.Checkpoint) -> None:
    assert store.put_checkpoint(c.height, c.block_hash, c.digest, c.state, _qc(c.qc))


def _qc(qc: QuorumCertificate) -> bytes:
    return codec.encode(qc.to_cbor())


def _extend(world: World) -> None:
    """Two more hours of readings after the checkpoint (seq 13..24)."""
    for i, hour in enumerate((H0 + 3, H0 + 4)):
        world.chain.commit_readings(
            hour_readings(world.sandbox, hour, 13 + 6 * i), (hour + 1) * HOUR + 5
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return build_world(open_store(str(tmp_path / "l.db")))


def test_incremental_verify_equals_full_replay(ledger_url: str) -> None:
    world = build_world(open_store(ledger_url))
    checkpoint = _checkpoint_head(world)
    _extend(world)
    full_state, full = verify_store(world.store)
    inc_state, inc = verify_store(world.store, checkpoint=latest_checkpoint(world.store))
    assert full_state is not None and inc_state is not None
    assert cp.state_bytes(inc_state) == cp.state_bytes(full_state)
    assert (inc.height, inc.head, inc.blocks, inc.transactions) == (
        full.height, full.head, full.blocks, full.transactions,
    )  # fmt: skip
    assert inc.checkpoint == checkpoint.height == 7 and full.checkpoint == -1
    # Only the two blocks after the checkpoint were replayed with their readings.
    assert inc.readings == inc.signatures_checked == 48 < full.readings
    world.store.close()


def test_worker_processes_are_started_for_the_readings_replayed_not_the_ledger(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint leaves a few blocks to replay: their signatures are checked inline."""
    world = build_world(open_store(ledger_url))
    _checkpoint_head(world)
    _extend(world)
    pools: list[int] = []

    class CountedPool(chain_module._SignaturePool):
        def __init__(self, workers: int) -> None:
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(chain_module, "_SignaturePool", CountedPool)
    total = world.store.reading_count()
    assert world.store.reading_count(since=8) == 48 < total
    monkeypatch.setattr(chain_module, "PARALLEL_FROM_READINGS", 49)
    _, inc = verify_store(world.store, checkpoint=latest_checkpoint(world.store))
    assert (inc.signatures_checked, pools) == (48, [])  # inline
    _, full = verify_store(world.store)
    assert (full.signatures_checked, len(pools)) == (total, 1)  # a pool for the full pass
    world.store.close()


def test_state_encoding_round_trips_and_is_canonical(world: World) -> None:
    state, _ = verify_store(world.store)
    assert state is not None
    data = cp.state_bytes(state)
    again = cp.state_from_bytes(data)
    assert cp.state_bytes(again) == data
    assert again.certificates == state.certificates and dict(again.txs) == dict(state.txs)
    assert cp.state_bytes(state.copy()) == data


def _refused(world: World, reason: str) -> BadCheckpoint:
    with pytest.raises(BadCheckpoint, match=reason) as info:
        verify_store(world.store, checkpoint=latest_checkpoint(world.store))
    return info.value


def _rewrite(world: World, column: str, value: object) -> None:
    world.store._execute(f"UPDATE checkpoints SET {column} = ?", (value,))


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at % len(out)] ^= 0x01
    return bytes(out)


def test_tampered_state_bytes_are_refused(world: World) -> None:
    c = _checkpoint_head(world)
    for at in (0, len(c.state) // 2, len(c.state) - 1):
        _rewrite(world, "state", _flip(c.state, at))
        assert _refused(world, "state does not match its digest").height == 7


def test_a_rewritten_state_with_its_own_digest_fails_the_certificate(world: World) -> None:
    c = _checkpoint_head(world)
    state = cp.state_from_bytes(c.state)
    state.banned.add("mg1")  # a consistent, re-hashed lie
    forged = cp.state_bytes(state)
    _rewrite(world, "state", forged)
    _rewrite(world, "digest", hashlib.sha256(forged).digest())
    _refused(world, "certificate")


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda c: {"height": 6}, "another block"),
        (lambda c: {"height": 99}, "beyond the stored ledger"),
        (lambda c: {"hash": _flip(c.block_hash, 3)}, "another block"),
        (lambda c: {"digest": _flip(c.digest, 0)}, "certificate"),
        (lambda c: {"qc": b"\x01"}, "checkpoint"),
        (lambda c: {"height": 2.5}, "height"),
    ],
)
def test_tampered_checkpoint_fields_are_refused(
    world: World, edit: Callable[[cp.Checkpoint], dict], reason: str
) -> None:
    c = _checkpoint_head(world)
    for column, value in edit(c).items():
        _rewrite(world, column, value)
    _refused(world, reason)


def test_a_checkpoint_for_another_block_at_its_height_is_refused(world: World) -> None:
    c = _checkpoint_head(world)
    # Members sign a checkpoint naming a block hash the ledger does not hold at height 7.
    other = _flip(c.block_hash, 5)
    statement = cp.statement("m1", c.height, other, c.digest)
    sb = world.sandbox
    qc = QuorumCertificate.collect(statement, [(n, sb.key(n).sign(statement)) for n in sb.node_ids])
    _rewrite(world, "hash", other)
    _rewrite(world, "qc", _qc(qc))
    _refused(world, "another block")


def _forge_qc(world: World, c: cp.Checkpoint, sigs: list[tuple[str, bytes]]) -> None:
    _rewrite(world, "qc", codec.encode([c.qc.statement, [list(s) for s in sigs]]))


def test_too_few_or_invalid_member_signatures_are_refused(world: World) -> None:
    c = _checkpoint_head(world, signers=3)
    sb = world.sandbox
    st = c.qc.statement
    good = {n: sb.key(n).sign(st) for n in sb.node_ids}
    # n = 3: one valid signature is not more than n/2.
    _forge_qc(world, c, [("node0", good["node0"])])
    _refused(world, r"more than n/2 = 2")
    # A bad signature beside a valid one, a signer twice, an outsider, an unsorted list.
    _forge_qc(world, c, [("node0", good["node0"]), ("node1", _flip(good["node1"], 9))])
    _refused(world, "does not verify")
    _forge_qc(world, c, [("node0", good["node0"]), ("node0", good["node0"])])
    _refused(world, "twice")
    outsider = PrivateKey.generate().sign(st)
    _forge_qc(world, c, [("node0", good["node0"]), ("node9", outsider)])
    _refused(world, "not a member")
    _forge_qc(world, c, [("node1", good["node1"]), ("node0", good["node0"])])
    _refused(world, "out of order")
    # combine refuses to make one from a minority as well.
    state = cp.state_from_bytes(c.state)
    with pytest.raises(cp.CheckpointError, match="more than n/2"):
        cp.combine(state, c.block_hash, [("node2", good["node2"])])
    # ... and the untouched quorum still verifies.
    _forge_qc(world, c, sorted(good.items()))
    verify_store(world.store, checkpoint=latest_checkpoint(world.store))


def test_tampering_before_and_after_the_checkpoint_is_still_found(world: World) -> None:
    _checkpoint_head(world)
    _extend(world)
    store = world.store
    checkpoint = latest_checkpoint(store)
    for sql, height in [
        ("UPDATE txs SET body = body || x'00' WHERE height = 2 AND idx = 0", 2),  # hash link
        ("UPDATE readings SET export_wh = export_wh + 1 WHERE height = 9 AND pos = 3", 9),
        ("UPDATE readings SET seq = seq + 0.5 WHERE height = 9 AND pos = 1", 9),  # mistyped
        ("UPDATE readings SET height = 10 WHERE height = 9 AND pos = 1", 9),  # moved
        ("UPDATE txs SET kind = 'order' WHERE height = 8", 8),
    ]:
        store._begin()
        try:
            store._execute(sql)
            with pytest.raises(ChainError) as info:
                verify_store(store, checkpoint=checkpoint)
            assert info.value.height == height
        finally:
            store._rollback()


def test_cli_sign_combine_and_incremental_verify(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = world.store.url
    sb = world.sandbox
    files = []
    for n in sb.node_ids:
        sb.key(n).save(tmp_path / f"{n}.key")
        out = tmp_path / f"{n}.sig.json"
        args = ["checkpoint", "sign", url, "--node", n, "--key", str(tmp_path / f"{n}.key")]
        assert ledger_main([*args, "--out", str(out)]) == 0
        files.append(str(out))
    assert json.loads(Path(files[0]).read_text())["height"] == 7
    assert ledger_main(["checkpoint", "combine", url, files[0]]) == 2  # one of three
    assert "more than n/2" in capsys.readouterr().err
    assert ledger_main(["checkpoint", "combine", url, *files[:2]]) == 0
    assert "checkpoint at height 7 (stored), signed by node0, node1" in capsys.readouterr().out
    _extend(world)
    assert ledger_main(["verify", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] and doc["checkpoint"] == 7 and doc["height"] == 9
    assert doc["readings"] == 48
    assert ledger_main(["verify", url, "--json", "--full"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == -1
    world.store._execute("UPDATE checkpoints SET digest = ?", (bytes(32),))
    assert ledger_main(["verify", url]) == 1
    assert "block 7: checkpoint at height 7: certificate" in capsys.readouterr().err


def _sealed_copy(world: World, reviewer: BlockReviewer) -> None:
    """Hand every block of the world's ledger to `reviewer` as the aggregator's sealed copies."""
    store = world.store
    head = store.head()
    assert head is not None
    for height in range(head[0] + 1):
        block = store.block(height)
        readings = {
            idx: tuple(LedgerReading(*row) for _, row in store.batch_rows(height, idx))
            for idx, tx in enumerate(block.txs)
            if tx.kind == "readings"
        }
        assert reviewer.sealed(block, readings)
    assert not reviewer.sealed(block, readings)  # held already


def test_members_attest_only_their_own_state_at_checkpoint_heights(
    world: World, tmp_path: Path
) -> None:
    sb = world.sandbox
    node1 = BlockReviewer(open_store(str(tmp_path / "node1.db")), "node1", sb.key("node1"),
                          regulator=sb.regulator.public_key(), checkpoint_interval=4)  # fmt: skip
    _sealed_copy(world, node1)
    state, report = verify_store(world.store, upto=4)
    assert state is not None
    collector = cp.Collector()
    proposal = collector.propose(state, report.head)
    assert node1.attestation == cp.parse_proposal(proposal)  # height 4: the last multiple of 4
    assert collector.add("node1", node1.attest(proposal).encode()) is None  # 1 of 3
    # Another digest, another block, or a height this member did not checkpoint: no signature.
    mine = cp.parse_proposal(proposal)
    for other, why in [
        (replace(mine, digest=bytes(32)), "proposed state digest 0000"),
        (replace(mine, block_hash=bytes(32)), "proposed block 0000"),
        (replace(mine, height=3), "no state of mine at that height"),
    ]:
        with pytest.raises(cp.CheckpointError, match=why):
            node1.attest(other.statement())
    # The aggregator counts a vote only for the very statement it proposed.
    wrong = replace(mine, digest=bytes(32))
    lie = cp.CheckpointVote("node2", wrong, sb.key("node2").sign(wrong.statement()))
    with pytest.raises(cp.CheckpointError, match="node2 signed checkpoint 4 .* not counted"):
        collector.add("node2", lie.encode())
    forged = cp.CheckpointVote("node2", mine, sb.key("node2").sign(wrong.statement()))
    with pytest.raises(cp.CheckpointError, match="signature over checkpoint 4 is invalid"):
        collector.add("node2", forged.encode())
    with pytest.raises(cp.CheckpointError, match="came from 'node0'"):
        collector.add("node0", lie.encode())
    honest = cp.attest(mine, mine, "node0", sb.key("node0"))
    checkpoint = collector.add("node0", honest.encode())
    assert checkpoint is not None and checkpoint.qc.signers == ("node0", "node1")
    assert cp.state_bytes(cp.check(checkpoint, "m1", state.membership)) == cp.state_bytes(state)
    with pytest.raises(cp.CheckpointError, match="no checkpoint open at height 4"):
        collector.add("node2", cp.attest(mine, mine, "node2", sb.key("node2")).encode())
    node1.store.close()


@pytest.mark.parametrize(
    "fields",
    [
        ["m", 4, b"h" * 31, b"d" * 32],  # a hash that is not SHA-256 sized
        ["m", 4, b"h" * 32, "digest"],
        ["m", True, b"h" * 32, b"d" * 32],
        [7, 4, b"h" * 32, b"d" * 32],
    ],
)
def test_malformed_checkpoint_proposals_and_votes_are_refused_alike(fields: list) -> None:
    with pytest.raises(cp.CheckpointError, match=r"^malformed checkpoint proposal: not \["):
        cp.parse_proposal(codec.encode(["checkpoint", *fields]))
    with pytest.raises(cp.CheckpointError, match=r"^malformed checkpoint vote$"):
        cp.CheckpointVote.decode(codec.encode(["checkpoint-vote", *fields, "node1", b"s" * 64]))
    good = cp.CheckpointVote("node1", cp.Attestation("m", 4, b"h" * 32, b"d" * 32), b"s" * 64)
    assert cp.CheckpointVote.decode(good.encode()) == good
