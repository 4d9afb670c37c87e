"""Reading inclusion proofs: built from the ledger, checked without it (M10)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_world import World, build_world

from meterchain.ledger.cli import main as ledger_main
from meterchain.ledger.merkle import ProofError
from meterchain.ledger.proof import build_proof, check_proof, resolve_reading
from meterchain.ledger.store import open_store


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(open_store(str(tmp_path / "ledger.db")))
    yield w
    w.store.close()


def _flip_hex(text: str, at: int) -> str:
    data = bytearray(bytes.fromhex(text))
    data[at % len(data)] ^= 1
    return data.hex()


def test_every_committed_reading_has_a_proof_that_checks(world: World) -> None:
    membership = world.sandbox.membership
    for rs in world.readings.values():
        for r in rs:
            proof = json.loads(json.dumps(build_proof(world.store, r.digest)))
            result = check_proof(
                proof, membership=membership, meter_key=world.sandbox.key(r.meter_id).public_key()
            )
            assert (result.meter_id, result.seq) == (r.meter_id, r.seq)
            assert result.anchored_by == ("quorum-certificate", "meter-key")
            assert result.header_hash == world.store.stored_block(result.height).hash


def test_a_changed_proof_is_refused(world: World) -> None:
    r = world.readings[max(world.readings)][5]
    proof = build_proof(world.store, r.digest)
    head = bytes.fromhex(proof["block"]["hash"])
    check_proof(proof, header_hash=head)
    for section, key in (
        ("reading", "cose"), ("reading", "digest"), ("batch", "tx"), ("block", "header"),
    ):  # fmt: skip
        bad = json.loads(json.dumps(proof))
        bad[section][key] = _flip_hex(bad[section][key], 9)
        with pytest.raises(ProofError):
            check_proof(bad, header_hash=head)
    bad = json.loads(json.dumps(proof))
    bad["batch"]["proof"]["path"][0] = _flip_hex(bad["batch"]["proof"]["path"][0], 0)
    with pytest.raises(ProofError, match="not in the batch"):
        check_proof(bad, header_hash=head)
    bad = json.loads(json.dumps(proof))
    bad["block"]["qc"] = _flip_hex(bad["block"]["qc"], -5)
    with pytest.raises(ProofError, match="quorum certificate"):
        check_proof(bad, membership=world.sandbox.membership)
    with pytest.raises(ProofError, match="trusted header"):
        check_proof(proof)
    with pytest.raises(ProofError, match="not the trusted header"):
        check_proof(proof, header_hash=bytes(32))
    other_meter = world.sandbox.key("ld2" if r.meter_id != "ld2" else "ld1").public_key()
    with pytest.raises(ProofError, match="reading signature"):
        check_proof(proof, header_hash=head, meter_key=other_meter)


def test_cli_prove_and_check_proof(world: World, tmp_path: Path, capsys) -> None:
    r = world.readings[min(world.readings)][0]
    out = tmp_path / "proof.json"
    assert ledger_main(["prove", world.store.url, f"{r.meter_id}:{r.seq}", "--out", str(out)]) == 0
    membership_file = tmp_path / "membership.toml"
    membership_file.write_text(world.sandbox.membership.to_toml())
    regulator = world.sandbox.regulator.public_key().point.hex()
    args = ["check-proof", str(out), "--membership", str(membership_file)]
    assert ledger_main([*args, "--regulator", regulator]) == 0
    assert f"valid: reading {r.meter_id}:{r.seq} is in block 3" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    doc["reading"]["cose"] = _flip_hex(doc["reading"]["cose"], 20)
    out.write_text(json.dumps(doc))
    assert ledger_main(args) == 1
    assert "INVALID proof: reading digest does not match" in capsys.readouterr().err
    assert ledger_main(["prove", world.store.url, "pv1:999"]) == 2
    assert "no reading pv1:999" in capsys.readouterr().err
    assert resolve_reading(world.store, r.digest.hex()) == r.digest
