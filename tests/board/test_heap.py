"""The firmware app's heap under real MicroPython: within the 48 KB target and not growing."""

from __future__ import annotations

from bench.board import TARGET_BYTES, measure_heap


def test_app_loop_heap_is_bounded_and_steady() -> None:
    # Enough cycles that a one-off allocation (a dict resize, one retained message: 64 bytes)
    # does not read as a per-cycle leak; a real leak of 8 bytes a cycle still shows.
    cycles = 40
    heap = measure_heap(cycles)
    assert heap["acked"] == cycles, "the loop really ran: every reading published and acknowledged"
    # The app's live data (buffers, index, config, the signer's 16 KB comb table) is what a
    # board with frozen firmware spends; code comes on top when loaded from .mpy files.
    assert heap["data_bytes"] <= TARGET_BYTES, heap
    assert heap["code_bytes"] < heap["code_bytes_at_import"], "boot-only modules are dropped"
    assert heap["data_leak_bytes_per_cycle"] <= 8, heap
