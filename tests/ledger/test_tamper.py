"""Tamper campaign over the demo ledger: every table, column and structural edit is detected.

Value edits (one byte, one character, one number) of every column are in
test_verify.py; here every column also gets a value of another type, and the
structure is edited: rows deleted, swapped, the top blocks truncated (detected
against a pinned head: a block hash, a minimum height, or a head certificate
signed by more than n/2 members), a block row deleted with its body left
orphaned. Each edit is made inside a transaction, verified, and rolled back.
The closing assertion is a 100 % detection rate; the counts are printed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ledger_world import build_world

from meterchain import codec
from meterchain.ledger.chain import ChainError, check_head, verify_store
from meterchain.ledger.cli import main as ledger_main
from meterchain.ledger.store import LedgerStore, open_store
from meterchain.quorum import QuorumCertificate

COLUMNS = {
    "blocks": ("height", "hash", "header", "qc"),
    "txs": ("height", "idx", "kind", "hash", "body"),
    "readings": ("height", "idx", "pos", "digest", "meter_id", "seq", "time", "import_wh",
                 "export_wh", "cose"),
}  # fmt: skip
KEYS = {"blocks": ("height",), "txs": ("height", "idx"), "readings": ("height", "idx", "pos")}

Edit = Callable[[LedgerStore], None]


class _NoChange(Exception):
    """The edit would leave every stored byte as it was."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LedgerStore]:
    world = build_world(open_store(str(tmp_path_factory.mktemp("tamper") / "ledger.db")))
    yield world.store
    world.store.close()


def _where(table: str) -> str:
    return " AND ".join(f"{k} = ?" for k in KEYS[table])


def _keys(store: LedgerStore, table: str) -> list[tuple]:
    return sorted(tuple(r) for r in store._execute(f"SELECT {', '.join(KEYS[table])} FROM {table}"))


def _pins(store: LedgerStore) -> dict[str, dict]:
    head = store.head()
    assert head is not None
    qc = QuorumCertificate.from_cbor(codec.decode(store.stored_block(head[0]).qc_raw))
    return {
        "head": {"head": head[1]},
        "min_height": {"min_height": head[0]},
        "signed_head": {"signed_head": qc},
    }


def _detected(store: LedgerStore, edit: Edit, pin: dict) -> bool | None:
    """Apply `edit` in a transaction, verify (with the pin), roll back; True if refused.

    None when the database itself refuses the edit (a REAL in SQLite's INTEGER PRIMARY
    KEY) or it changes nothing: nothing an attacker can store, nothing to detect.
    """
    store._begin()
    try:
        try:
            edit(store)
        except (sqlite3.IntegrityError, _NoChange):
            return None
        try:
            state, report = verify_store(store)
            check_head(store, state, report, **pin)
        except ChainError:
            return True
        return False
    finally:
        store._rollback()


def _retyped(value: object) -> object:
    """A value of another storage class: REAL for an integer, TEXT for a blob, BLOB for text."""
    if isinstance(value, int):
        return value + 0.5
    if isinstance(value, bytes):
        return value.hex()
    return str(value).encode()


def _set(table: str, column: str, key: tuple, value: object) -> Edit:
    return lambda s: s._execute(f"UPDATE {table} SET {column} = ? WHERE {_where(table)}",
                                (value, *key))  # fmt: skip


def _delete(table: str, key: tuple) -> Edit:
    return lambda s: s._execute(f"DELETE FROM {table} WHERE {_where(table)}", key)


def _truncate(height: int) -> Edit:
    def edit(s: LedgerStore) -> None:
        for table in ("readings", "txs", "blocks"):
            s._execute(f"DELETE FROM {table} WHERE height >= ?", (height,))

    return edit


def _swap(table: str, column: str, a: tuple, b: tuple) -> Edit:
    def edit(s: LedgerStore) -> None:
        where = _where(table)
        (va,) = s._execute(f"SELECT {column} FROM {table} WHERE {where}", a)[0]
        (vb,) = s._execute(f"SELECT {column} FROM {table} WHERE {where}", b)[0]
        if va == vb:
            raise _NoChange  # swapping equal values edits nothing
        if column in KEYS[table]:  # move a out of the way so the key stays unique
            s._execute(f"UPDATE {table} SET {column} = -1 WHERE {where}", a)
            s._execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (va, *b))
            s._execute(f"UPDATE {table} SET {column} = ? WHERE {column} = -1", (vb,))
        else:
            s._execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (vb, *a))
            s._execute(f"UPDATE {table} SET {column} = ? WHERE {where}", (va, *b))

    return edit


def test_every_structural_and_type_edit_is_detected(
    store: LedgerStore, capsys: pytest.CaptureFixture[str]
) -> None:
    verify_store(store)
    pins = _pins(store)
    head_height = store.head()[0]  # type: ignore[index]
    cases: dict[str, list[bool]] = {}

    refused_by_the_database = 0  # or no change at all

    def case(kind: str, edit: Edit, pin: dict | None = None) -> None:
        nonlocal refused_by_the_database
        outcome = _detected(store, edit, pin or {})
        if outcome is None:
            refused_by_the_database += 1
        else:
            cases.setdefault(kind, []).append(outcome)

    readings = _keys(store, "readings")
    batches = [[k for k in readings if k[:2] == b] for b in sorted({r[:2] for r in readings})]
    sampled = {
        "blocks": _keys(store, "blocks"),
        "txs": _keys(store, "txs"),
        # first and last of every batch: every batch, both ends of its Merkle tree
        "readings": sorted({min(batch) for batch in batches} | {max(batch) for batch in batches}),
    }
    for table, keys in sampled.items():
        for key in keys:
            for column in COLUMNS[table]:
                where = _where(table)
                (value,) = store._execute(f"SELECT {column} FROM {table} WHERE {where}", key)[0]
                case(f"retype {table}.{column}", _set(table, column, key, _retyped(value)))
            case(f"delete {table} row", _delete(table, key))
    # swaps: neighbouring rows of the same block (order matters) and of different blocks
    for table, column in (("readings", "pos"), ("readings", "cose"), ("txs", "idx"),
                          ("txs", "body"), ("blocks", "header"), ("blocks", "qc")):  # fmt: skip
        keys = sampled[table]
        for a, b in zip(keys, keys[1:], strict=False):
            case(f"swap {table}.{column}", _swap(table, column, a, b))
    # a certificate whose signatures are not byte strings (a traceback in ledger verify once)
    for value in (5, 2**64 - 1, -1, None, [], "sig"):
        def forged_qc(s: LedgerStore, value: object = value) -> None:
            statement, sigs = codec.decode(s.stored_block(head_height).qc_raw)
            raw = codec.encode([statement, [[node, value] for node, _ in sigs]])
            s._execute("UPDATE blocks SET qc = ? WHERE height = ?", (raw, head_height))

        case("QC with non-bytes signatures", forged_qc)
    # truncation: the top blocks go, rows and all; only a pinned head can tell
    for height in range(1, head_height + 1):
        for name, pin in pins.items():
            case(f"truncate to {height} blocks, pinned {name}", _truncate(height), pin)
        # ... or only the block row goes, leaving its transactions and readings orphaned
        case("delete a block row, body left", _delete("blocks", (height,)))
    detected = sum(sum(v) for v in cases.values())
    total = sum(len(v) for v in cases.values())
    missed = sorted(kind for kind, v in cases.items() if not all(v))
    with capsys.disabled():
        print(
            f"\ntamper campaign: {detected}/{total} edits detected ({len(cases)} kinds; "
            f"{refused_by_the_database} more refused by SQLite itself or no-ops)"
        )
    assert not missed, missed
    assert total > 250
    verify_store(store)  # every edit was rolled back


def test_cli_reports_the_head_and_refuses_a_stale_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = build_world(open_store(str(tmp_path / "ledger.db"))).store
    assert ledger_main(["verify", store.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    head = store.head()
    assert head is not None and (doc["height"], doc["head"]) == (head[0], head[1].hex())
    signed = doc["head_certificate"]
    (tmp_path / "head.hex").write_text(signed + "\n")
    pinned = ["--head", doc["head"], "--signed-head", str(tmp_path / "head.hex")]
    assert ledger_main(["verify", store.url, *pinned]) == 0
    assert f"head {head[0]} {head[1].hex()}" in capsys.readouterr().out
    # the top block goes: still a valid chain, but not the head the members signed
    store._begin()
    _truncate(head[0])(store)
    store._commit()
    assert ledger_main(["verify", store.url]) == 0
    capsys.readouterr()
    for args in (["--head", doc["head"]], ["--min-height", str(head[0])],
                 ["--signed-head", signed]):  # fmt: skip
        assert ledger_main(["verify", store.url, *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"INVALID: block {head[0]}: ") and "ledger" in err, err
    assert ledger_main(["verify", store.url, "--signed-head", "ab"]) == 2
    assert "--signed-head" in capsys.readouterr().err
    store.close()
