"""The board app for 10,000 readings on a real collector in a small, fixed heap.

Under the MicroPython unix port (real GC, `-X heapsize`), with broker outages longer than
the spool (thinning), a reconnect every 50 readings and stretches without the edge
agent's acknowledgement (rewinds): it must survive in the heap the README states, keep
its live heap flat and account for every reading.  METERCHAIN_SOAK_READINGS runs a
longer soak.
"""

from __future__ import annotations

import os

from bench.board_heap import SOAK_HEAP_BYTES, soak


def test_ten_thousand_readings_in_a_small_heap_without_growth() -> None:
    readings = int(os.environ.get("METERCHAIN_SOAK_READINGS", "10000"))
    result = soak(readings, SOAK_HEAP_BYTES)
    assert result["ok"], result["error"]
    assert result["readings"] == readings
    assert result["thinned"] > 0 and result["rewinds"] > 0, "outages thinned, silence rewound"
    # A reconnect per chunk of 50 readings, except in the 4 of every 10 chunks the broker is down.
    assert result["connects"] >= readings // 50 * 6 // 10, "a reconnect per chunk"
    # Every reading either reached the agent (freed by its watermark) or was thinned
    # during an outage (the cumulative registers keep its energy in the next one).
    assert result["freed"] + result["thinned"] == readings and result["spooled_at_end"] == 0
    assert result["growth_bytes_per_reading"] <= 0.05, result
    assert result["largest_free_block_min_bytes"] > 0
