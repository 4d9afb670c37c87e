"""`ledger verify` names the first bad block after any stored byte of the ledger is changed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_world import H0, T0, World, build_world

from meterchain import codec
from meterchain.ledger.block import Header
from meterchain.ledger.chain import ChainError, verify_store
from meterchain.ledger.cli import main as ledger_main
from meterchain.ledger.merkle import leaf_hash, root_of_hashes
from meterchain.ledger.sandbox import Chain, Sandbox
from meterchain.ledger.store import LedgerStore, open_store
from meterchain.ledger.transactions import Tx

REPO = Path(__file__).resolve().parents[2]

# Every column of every ledger table, with the column(s) that name a row's block.
TABLES = {
    "blocks": (("height", "hash", "header", "qc"), "height"),
    "txs": (("height", "idx", "kind", "hash", "body"), "height"),
    "readings": (
        (
            "height",
            "idx",
            "pos",
            "digest",
            "meter_id",
            "seq",
            "time",
            "import_wh",
            "export_wh",
            "cose",
        ),
        "height",
    ),  # fmt: skip
}
KEYS = {"blocks": ("height",), "txs": ("height", "idx"), "readings": ("height", "idx", "pos")}


@pytest.fixture
def world(ledger_url: str) -> Iterator[World]:
    w = build_world(open_store(ledger_url))
    yield w
    w.store.close()


def _tampered(value: object, position: int) -> object:
    """`value` with one byte (blob), one character (text) or the number itself changed."""
    if isinstance(value, bytes | memoryview):
        data = bytearray(bytes(value))
        data[position % len(data)] ^= 0x01
        return bytes(data)
    if isinstance(value, str):
        return value[:-1] + chr(ord(value[-1]) ^ 0x01)
    assert isinstance(value, int)
    return value + 1_000_003  # far away, so no unique key collides


def _verify_tampered(store: LedgerStore, table: str, column: str, key: tuple, position: int):
    """Change one stored value inside a transaction, verify, then roll the change back."""
    where = " AND ".join(f"{k} = ?" for k in KEYS[table])
    store._begin()
    try:
        (value,) = store._execute(f"SELECT {column} FROM {table} WHERE {where}", key)[0]
        store._execute(
            f"UPDATE {table} SET {column} = ? WHERE {where}", (_tampered(value, position), *key)
        )
        with pytest.raises(ChainError) as info:
            verify_store(store)
        return info.value
    finally:
        store._rollback()


def _sample_keys(store: LedgerStore, table: str) -> list[tuple]:
    keys = [tuple(r) for r in store._execute(f"SELECT {', '.join(KEYS[table])} FROM {table}")]
    keys.sort()
    # First, last and a few in between: every block and tx kind gets covered across tables.
    picks = sorted({0, len(keys) // 3, len(keys) // 2, 2 * len(keys) // 3, len(keys) - 1})
    return [keys[i] for i in picks] if table == "readings" else keys


def test_untouched_world_verifies(world: World) -> None:
    state, report = verify_store(world.store)
    assert report.blocks == 8 and report.readings == 48
    assert state is not None and state.certificates.certificates["pv1-1"].retired


def test_any_changed_byte_is_named_with_its_block(world: World) -> None:
    store = world.store
    cases = 0
    for table, (columns, _) in TABLES.items():
        for key in _sample_keys(store, table):
            for column in columns:
                positions = (0, 7, -1) if column in ("header", "qc", "body", "cose") else (0,)
                for position in positions:
                    error = _verify_tampered(store, table, column, key, position)
                    assert error.height == key[0], (table, column, key, position, str(error))
                    if table == "readings" and column not in ("height", "idx"):
                        assert f"reading batch {key[1]}" in error.reason, str(error)
                    cases += 1
    assert cases > 150
    verify_store(store)  # every change was rolled back


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_byte_flips_in_blobs_are_named(tmp_path_factory, data) -> None:
    store = _world_cache(tmp_path_factory)
    table, column = data.draw(
        st.sampled_from(
            [("blocks", "header"), ("blocks", "qc"), ("txs", "body"), ("readings", "cose")]
        )
    )
    keys = [tuple(r) for r in store._execute(f"SELECT {', '.join(KEYS[table])} FROM {table}")]
    key = data.draw(st.sampled_from(sorted(keys)))
    position = data.draw(st.integers(0, 10_000))
    error = _verify_tampered(store, table, column, key, position)
    assert error.height == key[0]


_WORLD: dict[str, LedgerStore] = {}


def _world_cache(factory: pytest.TempPathFactory) -> LedgerStore:
    if "sqlite" not in _WORLD:
        _WORLD["sqlite"] = build_world(open_store(str(factory.mktemp("w") / "l.db"))).store
    return _WORLD["sqlite"]


def test_a_consistent_rewrite_up_to_the_header_fails_on_the_quorum_certificate(
    world: World,
) -> None:
    """Rewrite a reading and every hash above it: only the members' signatures give it away."""
    store = world.store
    height, idx = 3, 0
    rows = store.batch_rows(height, idx)
    stored = store.stored_block(height)
    pos_of_pv, original = next((p, r) for p, r in rows if r[1] == "pv1")
    # Validly signed by the meter's key (say, stolen), so only the block certificate is left.
    forged = world.sandbox.reading("pv1", original[2], original[3], 0, 5_000_000, "pv", 3000)
    new_rows = list(rows)
    new_rows[pos_of_pv] = (pos_of_pv, forged.row())
    batch = Tx.decode(stored.txs[idx][2])
    root = root_of_hashes([leaf_hash(r[0]) for _, r in new_rows])
    new_batch = Tx.make("readings", {**batch.body, "root": root})
    header = Header.decode(stored.header_raw)
    new_header = Header(
        header.market, header.height, header.prev,
        root_of_hashes([new_batch.hash]), header.time, header.round, header.proposer,
    )  # fmt: skip
    store._begin()
    try:
        store._execute(
            "UPDATE readings SET digest = ?, export_wh = ?, cose = ? "
            "WHERE height = ? AND idx = ? AND pos = ?",
            (forged.digest, forged.export_wh, forged.cose, height, idx, pos_of_pv),
        )
        store._execute(
            "UPDATE txs SET hash = ?, body = ? WHERE height = ? AND idx = ?",
            (new_batch.hash, new_batch.raw, height, idx),
        )
        store._execute(
            "UPDATE blocks SET hash = ?, header = ? WHERE height = ?",
            (new_header.hash, new_header.encode(), height),
        )
        with pytest.raises(ChainError, match="block 3: quorum certificate: certificate certifies"):
            verify_store(store)
    finally:
        store._rollback()


def test_a_forged_reading_signature_is_named_even_in_a_certified_block(tmp_path: Path) -> None:
    """A colluding quorum can certify a bad reading; the signature check still names it."""
    sb = Sandbox()
    chain = Chain(sb, open_store(str(tmp_path / "l.db")))
    chain.genesis(T0, [sb.participant("mg1", "microgrid", T0)])
    chain.commit([sb.meter("pv1", "mg1", "pv", T0)], T0 + 1)
    good = [sb.reading("pv1", s, T0 + 60 * s, 0, 10 * s, "pv") for s in range(1, 4)]
    cose = bytearray(good[1].cose)
    cose[-1] ^= 0xFF  # the last byte is inside the 64-byte signature
    bad = type(good[1])(
        hashlib.sha256(bytes(cose)).digest(), "pv1", 2, good[1].time, 0, 20, bytes(cose)
    )
    chain.commit_readings([good[0], bad, good[2]], T0 + 3600, signatures=False)
    for workers in (1, 2):  # inline, and in worker processes while the rules replay
        with pytest.raises(
            ChainError, match=r"block 2: reading batch 0 \(hour \d+\): reading 1 \(pv1:2\): ES256"
        ):
            verify_store(chain.store, workers=workers)
    verify_store(chain.store, signatures=False)  # hashes alone cannot see it
    # a later block that breaks a rule does not hide the earlier bad signature
    chain.store._begin()
    chain.store._execute("UPDATE blocks SET qc = x'00' WHERE height = 0")
    with pytest.raises(ChainError, match="block 0: quorum certificate"):
        verify_store(chain.store, workers=2)
    chain.store._rollback()
    chain.commit([sb.meter("pv2", "mg1", "pv", T0 + 3700)], T0 + 3700)
    chain.store._begin()
    chain.store._execute("UPDATE blocks SET qc = x'00' WHERE height = 3")
    with pytest.raises(ChainError, match=r"block 2: .*reading 1 \(pv1:2\): ES256"):
        verify_store(chain.store, workers=2)
    chain.store._rollback()
    chain.store.close()


def test_signatures_checked_in_worker_processes_agree_with_inline(world: World) -> None:
    _, inline = verify_store(world.store, workers=1)
    _, parallel = verify_store(world.store, workers=2)
    assert parallel.signatures_checked == inline.signatures_checked == 48
    assert (parallel.head, parallel.height) == (inline.head, inline.height)


def test_cli_verify_exit_codes(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    url = world.store.url
    assert ledger_main(["verify", url]) == 0
    assert "valid: market m1, 8 blocks" in capsys.readouterr().out
    store = world.store
    store._begin()
    try:
        store._execute(
            "UPDATE readings SET export_wh = export_wh + 1 WHERE height = 4 AND idx = 0 AND pos = 2"
        )
        # Commit through a second connection is not needed: verify here on the same one.
        with pytest.raises(ChainError) as info:
            verify_store(store)
    finally:
        store._rollback()
    assert str(info.value) == (
        f"block 4: reading batch 0 (hour {H0 + 1}): reading 2: stored export_wh does not match "
        "its signed bytes"
    )
    assert ledger_main(["verify", "/nonexistent/ledger.db"]) == 2
    assert "no such ledger file" in capsys.readouterr().err


def test_cli_verify_names_a_tampered_settlement(tmp_path: Path) -> None:
    """End to end through the console script, on a file changed outside MeterChain."""
    db = tmp_path / "ledger.db"
    world = build_world(open_store(str(db)))
    world.store.close()
    ok = _cli("ledger", "verify", str(db), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["valid"] is True
    import sqlite3

    with sqlite3.connect(db) as conn:
        (body,) = conn.execute(
            "SELECT body FROM txs WHERE height = 6 AND kind = 'settlement'"
        ).fetchone()
        value = codec.decode(body)
        settlement = codec.decode(value[1]["result"])
        settlement["entries"][0][2] += 1  # one minor unit more on the first money movement
        value[1]["result"] = codec.encode(settlement)
        conn.execute(
            "UPDATE txs SET body = ? WHERE height = 6 AND kind = 'settlement'",
            (codec.encode(value),),
        )
    bad = _cli("ledger", "verify", str(db))
    assert bad.returncode == 1
    assert (
        f"INVALID: block 6: tx 0 (settlement hour={H0 + 1}): stored hash does not match its bytes"
        in bad.stderr
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterchain.cli", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip


def test_show_summarises(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert ledger_main(["show", world.store.url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["height"] == 7 and info["readings"] == 48
    assert info["transactions"]["veto"] == 1
    assert info["meters"]["pv1"] == {"owner": "mg1", "source": "pv", "active": True}
    assert ledger_main(["show", world.store.url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("market m1: height 7")
    assert "signed node0,node1,node2" in out
