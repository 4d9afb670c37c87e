"""The board app's heap on a real collector: a soak under the MicroPython unix port, and the
smallest heap it survives in (bisection).

`soak(readings, heap_bytes)` runs the unchanged firmware App (fake HAL, virtual time)
for `readings` readings in a heap of `heap_bytes`, with broker outages longer than the
spool (thinning), reconnects, and stretches where the edge agent acknowledges nothing
(rewinds after `broker.ack_timeout_s`).  After every chunk of readings it collects and
records the live heap and the largest free block.  The firmware is loaded from mpy-cross
`.mpy` files, what `meterchain board deploy` installs (the bytecode lives in the heap);
the bytecode is measured on its own, and the heap less the bytecode approximates frozen
firmware (bytecode in flash): the unix port cannot freeze modules into a prebuilt
binary.  The test harness (mcfakes) is measured and left out of the board figures.

`python -m bench.board_heap [--readings N] [--mpy]` bisects the smallest heap in which
the soak completes and prints one JSON document.  It is not run in CI (each probe is a
full soak); the figures go into the README, and a CI test runs one soak at the heap
stated there.

The unix port on this machine is a 64-bit build: its objects (words, block size 32 B)
are larger than an ESP32's (32-bit words, 16 B blocks), so every figure here is an upper
bound for the board.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.board import _compile_lib, make_board
from hil import micropython

BLOCK_BYTES = 32  # the 64-bit unix port's GC block (ESP32: 16)
# The smallest heap the 10,000-reading soak survived in (`python -m bench.board_heap
# --step 2048`: 160 KB with the harness, of which 38 KB are mcfakes) plus 10 KB of margin
# for run-to-run differences (reconnect jitter); CI runs the 10,000-reading soak in it.
SOAK_HEAP_BYTES = 170 * 1024

SOAK_CONFIG: dict[str, Any] = {
    "meter_id": "soak-meter-01",
    "market": "bench",
    "source": "load",
    "console_readings": False,
    "meter": {"type": "sdm630"},
    "broker": {"host": "broker.test", "tls": False, "ack_timeout_s": 60},
    "spool": {"max_records": 128, "batch": 4},
}

# Runs under MicroPython.  Each chunk of 50 readings is one App.run(cycles=50), which
# ends with a drain and a clean disconnect: a reconnect per chunk.  Phases of 10 chunks:
# 3-6 broker down (200 readings > the 128-record spool: thinning), 8 no acknowledgement.
_SOAK = """
import gc, sys, json, micropython
from array import array

N = int(sys.argv[1])
CHUNK = 50
chunks = (N + CHUNK - 1) // CHUNK
live = array("I", [0] * chunks)
free = array("I", [0] * chunks)
gc.collect()
runtime = gc.mem_alloc()
import mcfakes  # the test harness (and mc.flash, mc.meters.s0): not on a board
gc.collect()
base = gc.mem_alloc()
from mc import p256
p256.precompute()  # first, as main.py does
gc.collect()
table = gc.mem_alloc() - base
from mc import app
import mc.meters.sdm, mc.config, mc.keystore
gc.collect()
code = gc.mem_alloc() - base - table
broker = mcfakes.FakeBroker(keep=False)
board = mcfakes.FakeBoard(broker=broker, echo=False)
board.keep_console = False
a = app.boot(board)
if a is None:
    sys.exit(2)
for i in range(chunks):
    phase = i % 10
    if phase == 3:
        broker.stop()
    elif phase == 7:
        broker.start()
    broker.agent = phase != 8
    a.run(cycles=CHUNK)
    gc.collect()
    live[i] = gc.mem_alloc()
    free[i] = gc.mem_free()
    print("CHUNK", i)
    micropython.mem_info()
print(json.dumps({"runtime": runtime, "base": base, "code": code, "live": list(live),
                  "free": list(free), "readings": a.readings, "published": a.uplink.published,
                  "freed": a.uplink.freed, "dropped": a.spool.dropped,
                  "connects": a.uplink.connects, "rewinds": a.uplink.rewinds,
                  "spooled": len(a.spool)}))
"""


def soak(readings: int, heap_bytes: int, *, timeout: float = 900) -> dict[str, Any]:
    """One soak (see the module docstring); `ok` False when it ran out of heap."""
    with tempfile.TemporaryDirectory(prefix="mc-soak-") as tmp:
        folder = Path(tmp) / "flash"
        make_board(folder, SOAK_CONFIG)
        script = Path(tmp) / "soak.py"
        script.write_text(_SOAK)
        libs = [_compile_lib(Path(tmp) / "lib")]
        result = micropython.run(
            script, [str(readings)], libs=libs, fs_dir=folder, heap=heap_bytes, port="unix",
            timeout=timeout,
        )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {"ok": False, "heap_bytes": heap_bytes,
                "error": (result.stdout + result.stderr).strip()[-400:]}
    raw = json.loads(lines[-1])
    largest = [int(line.rsplit(":", 1)[1]) * BLOCK_BYTES for line in lines if "max free sz" in line]
    live = raw["live"]
    half = len(live) // 2
    # Growth of the live heap from the first half of the run to the second, per reading.
    growth = (max(live[half:]) - max(live[:half])) / max((len(live) - half) * 50, 1) if half else 0
    code = raw["code"]
    return {
        "ok": True,
        "heap_bytes": heap_bytes,
        "readings": raw["readings"],
        "published": raw["published"],
        "freed": raw["freed"],
        "thinned": raw["dropped"],
        "connects": raw["connects"],
        "rewinds": raw["rewinds"],
        "spooled_at_end": raw["spooled"],
        "runtime_bytes": raw["runtime"],
        "harness_bytes": raw["base"] - raw["runtime"],
        "code_bytes": code,
        "live_max_bytes": max(live),
        "live_min_bytes": min(live),
        "data_max_bytes": max(live) - raw["base"] - code,
        "largest_free_block_min_bytes": min(largest) if largest else None,
        "largest_free_block_last_bytes": largest[-1] if largest else None,
        "growth_bytes_per_reading": round(growth, 3),
    }


def smallest_heap(readings: int, *, lo: int = 32 * 1024, hi: int = 384 * 1024,
                  step: int = 1024) -> dict[str, Any]:
    """Bisect the smallest heap (to `step` bytes) in which the soak completes."""
    best = soak(readings, hi)
    if not best["ok"]:
        raise RuntimeError(f"the soak fails even in {hi} bytes: {best['error']}")
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        probe = soak(readings, mid)
        if probe["ok"]:
            hi, best = mid, probe
        else:
            lo = mid
    return best


def board_estimates(result: dict[str, Any]) -> dict[str, int]:
    """Heap a board needs: the smallest soak heap less the test harness (not on a board);
    frozen firmware also keeps the bytecode out of the heap."""
    mpy = int(result["heap_bytes"]) - int(result["harness_bytes"])
    return {"mpy_bytes": mpy, "frozen_bytes": mpy - int(result["code_bytes"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.board_heap", description=__doc__)
    parser.add_argument("--readings", type=int, default=10000)
    parser.add_argument("--step", type=int, default=1024, help="bisection resolution, bytes")
    ns = parser.parse_args(argv)
    result = smallest_heap(ns.readings, step=ns.step)
    result["board_estimate"] = board_estimates(result)
    result["note"] = ("64-bit unix port: upper bounds for a 32-bit ESP32; frozen = .mpy minus "
                      "the bytecode the heap holds")
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
