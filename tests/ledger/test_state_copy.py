"""A state snapshot (`LedgerState.copy`) shares no mutable map with the state it came from."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_world import build_world

from meterchain.ledger.chain import verify_store
from meterchain.ledger.state import History, LedgerState, TxRecord
from meterchain.ledger.store import LedgerStore, open_store

HISTORY_FIELDS = (
    "orders", "clearings", "settlements", "txs", "congestion", "remedies", "reports",
    "decisions", "activity",
)  # fmt: skip


def _view(state: LedgerState) -> dict[str, object]:
    out: dict[str, object] = {name: dict(getattr(state, name)) for name in HISTORY_FIELDS}
    out["snapshots"] = {m: dict(h) for m, h in state.snapshots.items()}
    return out


def _scribble(state: LedgerState, tag: bytes) -> None:
    """Write, overwrite and delete in every history map and in the hour snapshots."""
    for name in HISTORY_FIELDS:
        m = getattr(state, name)
        assert isinstance(m, History), name
        m[tag] = TxRecord(99, 0, "x")
        for key in list(m)[:1]:
            del m[key]
    state.txs[next(iter(state.txs))] = TxRecord(98, 1, "y")
    for hours in state.snapshots.values():
        hours[-1] = (0, 0, 0, 0, 0, 0)
        for h in list(hours)[:1]:
            del hours[h]


def test_copy_and_original_do_not_see_each_others_writes(tmp_path: Path) -> None:
    world = build_world(open_sqlite(tmp_path))
    state, _ = verify_store(world.store)
    assert state is not None and state.snapshots and len(state.txs) > 10
    before = _view(state)
    copy = state.copy()
    assert _view(copy) == before
    _scribble(copy, b"copy")
    assert _view(state) == before  # the original is untouched by the copy's writes
    after_copy = _view(copy)
    _scribble(state, b"orig")
    assert _view(copy) == after_copy  # and the copy by the original's
    world.store.close()


def open_sqlite(tmp_path: Path) -> LedgerStore:
    return open_store(str(tmp_path / "l.db"))


OPS = st.lists(
    st.tuples(st.sampled_from(["set", "del", "copy"]), st.integers(0, 20), st.integers()),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_history_behaves_like_a_dict_through_copies(ops: list[tuple[str, int, int]]) -> None:
    live: list[tuple[History[int, int], dict[int, int]]] = [(History(), {})]
    for op, key, value in ops:
        h, model = live[-1]
        if op == "set":
            h[key] = value
            model[key] = value
        elif op == "del" and key in model:
            del h[key]
            del model[key]
        elif op == "copy":
            live.append((h.copy(), dict(model)))
        for h2, m2 in live:  # every earlier copy still holds exactly its own contents
            assert dict(h2) == m2 and len(h2) == len(m2)
            assert all(h2.get(k) == m2.get(k) and (k in h2) == (k in m2) for k in range(21))
