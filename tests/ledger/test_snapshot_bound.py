"""The hour snapshots a state keeps are bounded by the hours still open, and dropping the
others changes no energy that a settlement or a contract can still ask for."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from ledger_world import build_world

from meterchain.ledger.state import SNAPSHOT_WINDOW_HOURS, Clearing, History, LedgerState
from meterchain.ledger.store import open_store


def _state(tmp_path: Path) -> LedgerState:
    world = build_world(open_store(str(tmp_path / "l.db")))
    state = world.chain.state
    assert state is not None
    return state.copy()


def _closed_state(tmp_path: Path) -> LedgerState:
    """A state with every order fired and every clearing settled: nothing open."""
    state = _state(tmp_path)
    for o in list(state.orders.values()):
        state.orders[o.id] = replace(o, status="fired")
    for h in list(state.clearings):
        state.settlements.setdefault(h, b"s")
    return state


def _random_snapshots(state: LedgerState, hours: int, seed: int) -> None:
    """Every meter with increasing registers at a random half of `hours` hours."""
    rng = random.Random(seed)
    for meter_id in state.meters:
        snaps: History[int, tuple[int, int, int, int, int, int]] = History()
        seq, imp, exp = 0, 0, 0
        for h in sorted(rng.sample(range(hours), hours // 2)):
            first = (seq + 1, imp + rng.randrange(50), exp + rng.randrange(50))
            seq = first[0] + 5
            imp, exp = first[1] + rng.randrange(900), first[2] + rng.randrange(900)
            snaps[h] = (*first, seq, imp, exp)
        state.snapshots[meter_id] = snaps


def _energies(state: LedgerState, hours: range) -> dict[tuple[str, int], tuple[int, int]]:
    return {(m, h): state.meter_energy(m, h) for m in state.snapshots for h in hours}


def test_only_readable_hours_survive_and_their_energy_is_unchanged(tmp_path: Path) -> None:
    state = _state(tmp_path)
    _random_snapshots(state, 400, seed=18)
    # The floor is the lowest of: the block's hour (390), an unsettled clearing (300),
    # an open order's delivery hour (250; a fired one at 100 no longer counts).
    state.clearings[300] = Clearing(300, 1, b"", b"", b"c300")
    state.clearings[120] = Clearing(120, 1, b"", b"", b"c120")
    state.settlements[120] = b"s120"
    order = next(iter(state.orders.values()))
    state.orders["open"] = replace(order, id="open", delivery=250, status="open")
    state.orders["done"] = replace(order, id="done", delivery=100, status="fired")
    for o in list(state.orders.values()):
        if o.id not in ("open", "done"):
            state.orders[o.id] = replace(o, status="fired")
    state.latest_hour = 390  # the remedies' window reaches back to 318: above the order's 250
    readable = range(250, 420)
    before = _energies(state, readable)
    kept_before = {m: sorted(h for h in hs if h >= 250) for m, hs in state.snapshots.items()}
    state._drop_unreadable_snapshots(390)
    assert _energies(state, readable) == before
    for m, hours in state.snapshots.items():
        below = sorted(h for h in hours if h < 250)
        assert len(below) == 1  # the start of the meter's next energy
        assert sorted(h for h in hours if h >= 250) == kept_before[m]
    # Once the order fires and the clearing is settled, the remedies' window is the floor:
    # hour 300's remedies may still read its energy.
    state.orders["open"] = replace(state.orders["open"], status="fired")
    state.settlements[300] = b"s300"
    later = _energies(state, range(390 - SNAPSHOT_WINDOW_HOURS, 420))
    state._drop_unreadable_snapshots(390)
    assert _energies(state, range(390 - SNAPSHOT_WINDOW_HOURS, 420)) == later
    floor = 390 - SNAPSHOT_WINDOW_HOURS
    assert all(len([h for h in hs if h < floor]) == 1 for hs in state.snapshots.values())


def test_a_settled_hours_remedy_reads_the_same_energy_after_a_new_day(tmp_path: Path) -> None:
    """A remedy (M21) of a settled hour re-reads its metered energy for SNAPSHOT_WINDOW_HOURS."""
    state = _closed_state(tmp_path)
    _random_snapshots(state, 24 * 10, seed=21)
    state.latest_hour = 24 * 10 - 1
    settled = state.latest_hour - SNAPSHOT_WINDOW_HOURS + 1  # settled, remedies still due
    state.clearings[settled] = Clearing(settled, 1, b"", b"", b"c")
    state.settlements[settled] = b"s"
    before = _energies(state, range(settled, settled + 1))
    state._drop_unreadable_snapshots(state.latest_hour)
    assert _energies(state, range(settled, settled + 1)) == before


def test_a_year_of_readings_keeps_a_state_of_days_not_of_the_year(tmp_path: Path) -> None:
    """Readings alone (no clearing, no order): a meter keeps the hours since the block's hour."""
    state = _closed_state(tmp_path)
    _random_snapshots(state, 24 * 365, seed=7)
    state.latest_hour = 24 * 365 - 24
    state._drop_unreadable_snapshots(24 * 365 - 24)
    assert max(len(hs) for hs in state.snapshots.values()) <= SNAPSHOT_WINDOW_HOURS + 25
