"""`meterchain bench sign`: the board's ES256 signer under real MicroPython vs `ecdsa` on CPython.

What is measured, all in one run:
- `micropython_ms_per_sign`: `mc.p256.sign` (the firmware module, unchanged) under
  the MicroPython WebAssembly port on Node, timed inside MicroPython with
  `time.ticks_us` over rounds of distinct 100-byte messages after the comb table is
  built and a warm-up; the fastest round's average (the machine is shared, other load
  only adds time), with the median round alongside.  The port's tick is 1 ms, so each
  round is long enough (>= 25 signatures) to keep that below a few per cent.
- `micropython_precompute_ms`: building the fixed-base table, once per boot.
- `cpython_ecdsa_ms_per_sign`: the anchor, the pure-Python `ecdsa` package's
  `sign_deterministic` (RFC 6979, SHA-256) on the same messages, same rounds rule.
  Both produce the very same signatures (checked: `signatures_match`).
- `peak_heap_bytes`: the heap one signature needs on MicroPython, measured as the
  growth of `gc.mem_alloc()` across one signature with the collector off.  In this
  port the collector can only run between top-level calls from JavaScript, never inside
  a script, so this is the high-water of `gc.mem_alloc()` during a signature, and it is
  the total of everything the signature allocates: an upper bound on the heap it needs.
  On a board the collector reclaims the short-lived big-int temporaries as it goes,
  so the heap actually needed is the live working set, reported as
  `live_heap_peak_bytes`: the peak of traced memory (tracemalloc) during one signature
  of the same module on CPython, whose int and tuple objects are larger than
  MicroPython's, so it over-estimates the board's figure.
- `table_bytes`: the comb table the signer keeps (payload of one bytearray).
- `unix_port`: the same signer under the MicroPython unix port, which has a real
  collector and a fixed heap (`-X heapsize`): `table_min_heap_bytes` is the smallest
  heap (bisected to 512 B) in which the table is built and 20 signatures made, with the
  table built first as the firmware's main.py does; `sign_live_bytes` what stays live
  besides it; `table_build_free_block_bytes` the largest free block after the build.
  That port is a 64-bit build whose objects are larger than an ESP32's (32-bit words),
  so its figures are upper bounds for a board.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import ecdsa

from hil import micropython

TARGET_MS_PER_SIGN = 8
TARGET_PEAK_HEAP_BYTES = 32768
# A fixed test key (not secret): the signatures are compared across implementations.
_SECRET = 0x7A3C1E5F0B2D4C6E8A9B1C2D3E4F5061728394A5B6C7D8E9F0A1B2C3D4E5F607
_FIRMWARE_LIB = Path(__file__).resolve().parents[1] / "firmware" / "lib"

_MICROPYTHON_SCRIPT = """
import gc, hashlib, json, time
from mc import p256

SECRET = {secret}
ROUNDS = {rounds}
PER_ROUND = {per_round}

def message(i):
    return (hashlib.sha256(str(i).encode()).digest() * 4)[:100]

t0 = time.ticks_us()
table_bytes = p256.precompute()
precompute_us = time.ticks_diff(time.ticks_us(), t0)

messages = [message(i) for i in range(ROUNDS * PER_ROUND)]
for m in messages[:3]:
    p256.sign(SECRET, m)  # warm-up

digest = hashlib.sha256()
round_us = []
for r in range(ROUNDS):
    batch = messages[r * PER_ROUND:(r + 1) * PER_ROUND]
    sigs = []
    t0 = time.ticks_us()
    for m in batch:
        sigs.append(p256.sign(SECRET, m))
    round_us.append(time.ticks_diff(time.ticks_us(), t0))
    for s in sigs:
        digest.update(s)

alloc = []
for m in messages[:5]:
    gc.collect()
    gc.disable()
    base = gc.mem_alloc()
    p256.sign(SECRET, m)
    alloc.append(gc.mem_alloc() - base)
    gc.enable()

print(json.dumps({{
    "precompute_us": precompute_us,
    "table_bytes": table_bytes,
    "round_us": round_us,
    "alloc": alloc,
    "digest": digest.digest().hex(),
}}))
"""


_UNIX_SCRIPT = """
import gc, hashlib, micropython
gc.collect()
base = gc.mem_alloc()
from mc import p256
p256.precompute()
gc.collect()
table = gc.mem_alloc() - base
for i in range(20):
    p256.sign(SECRET, hashlib.sha256(str(i).encode()).digest() * 3)
gc.collect()
print("RESULT", base, table, gc.mem_alloc() - base - table)
micropython.mem_info()
"""


def _unix_probe(heap: int, lib: Path) -> tuple[int, int, int, int] | None:
    result = micropython.run_code(
        f"SECRET = {_SECRET}\n" + _UNIX_SCRIPT, port="unix", heap=heap, timeout=120, libs=[lib]
    )
    lines = result.stdout.splitlines()
    found = [line.split() for line in lines if line.startswith("RESULT ")]
    if result.returncode != 0 or not found:
        return None
    free = [int(line.rsplit(":", 1)[1]) * 32 for line in lines if "max free sz" in line]
    _, base, table, live = found[0]
    return int(base), int(table), int(live), free[0] if free else 0


def _unix_port_heap() -> dict[str, Any]:
    """Smallest heap for table + signatures under the unix port (see the module docstring)."""
    from bench.board import _compile_lib

    with tempfile.TemporaryDirectory(prefix="mc-sign-mpy-") as tmp:
        return _bisect_unix(_compile_lib(Path(tmp)))


def _bisect_unix(lib: Path) -> dict[str, Any]:
    lo, hi = 8 * 1024, 128 * 1024
    best = _unix_probe(hi, lib)
    if best is None:
        raise RuntimeError("the signer fails even in a 128 KB heap on the unix port")
    while hi - lo > 512:
        mid = (lo + hi) // 2
        probe = _unix_probe(mid, lib)
        if probe is None:
            lo = mid
        else:
            hi, best = mid, probe
    base, table, live, free = best
    return {
        "table_min_heap_bytes": hi,
        "runtime_bytes": base,
        "table_heap_bytes": table,
        "sign_live_bytes": live,
        "table_build_free_block_bytes": free,
        "note": "MicroPython unix port, 64-bit: objects larger than an ESP32's; upper bounds",
    }


def _message(i: int) -> bytes:
    return (hashlib.sha256(str(i).encode()).digest() * 4)[:100]


def _run_micropython(rounds: int, per_round: int) -> dict[str, Any]:
    code = _MICROPYTHON_SCRIPT.format(secret=_SECRET, rounds=rounds, per_round=per_round)
    result = micropython.run_code(code).check()
    return json.loads(result.stdout.strip().splitlines()[-1])


def _run_ecdsa(rounds: int, per_round: int) -> tuple[list[float], str]:
    """Seconds per round for `ecdsa.sign_deterministic`, and a digest of all signatures."""
    key = ecdsa.SigningKey.from_secret_exponent(_SECRET, curve=ecdsa.NIST256p)
    messages = [_message(i) for i in range(rounds * per_round)]
    for m in messages[:3]:
        key.sign_deterministic(m, hashfunc=hashlib.sha256)  # warm-up: builds its own tables
    digest = hashlib.sha256()
    times = []
    for r in range(rounds):
        batch = messages[r * per_round : (r + 1) * per_round]
        t0 = time.perf_counter()
        sigs = [key.sign_deterministic(m, hashfunc=hashlib.sha256) for m in batch]
        times.append(time.perf_counter() - t0)
        for s in sigs:
            digest.update(s)
    return times, digest.hexdigest()


def _live_heap_peak(samples: int) -> int:
    """Peak traced bytes during one signature by the firmware module on CPython."""
    if str(_FIRMWARE_LIB) not in sys.path:
        sys.path.insert(0, str(_FIRMWARE_LIB))
    from mc import p256  # the board's module, run on CPython

    p256.precompute()
    messages = [_message(i) for i in range(samples)]
    p256.sign(_SECRET, messages[0])
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    peak = 0
    try:
        for m in messages:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            p256.sign(_SECRET, m)
            peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return peak


def run(quick: bool) -> dict:
    """Measure and return the figures described in the module docstring."""
    rounds, per_round = (4, 25) if quick else (10, 50)
    mp = _run_micropython(rounds, per_round)
    mp_ms = [us / 1000 / per_round for us in mp["round_us"]]
    ecdsa_times, ecdsa_digest = _run_ecdsa(rounds, per_round)
    ecdsa_ms = [t * 1000 / per_round for t in ecdsa_times]
    mp_best = min(mp_ms)
    ecdsa_best = min(ecdsa_ms)
    return {
        "micropython_ms_per_sign": round(mp_best, 3),
        "micropython_ms_per_sign_median": round(statistics.median(mp_ms), 3),
        "micropython_precompute_ms": round(mp["precompute_us"] / 1000, 1),
        "cpython_ecdsa_ms_per_sign": round(ecdsa_best, 3),
        "cpython_ecdsa_ms_per_sign_median": round(statistics.median(ecdsa_ms), 3),
        "ratio": round(mp_best / ecdsa_best, 3),
        "signatures_match": mp["digest"] == ecdsa_digest,
        "signs_timed": rounds * per_round,
        "message_bytes": 100,
        "peak_heap_bytes": max(mp["alloc"]),
        "peak_heap_method": (
            "MicroPython gc.mem_alloc() growth across one sign with gc disabled (max of 5): "
            "the port never collects inside a script, so this is the mem_alloc high-water "
            "and equals everything one sign allocates, an upper bound on the heap it needs"
        ),
        "live_heap_peak_bytes": _live_heap_peak(5 if quick else 20),
        "live_heap_method": (
            "tracemalloc peak during one sign of the same module on CPython (larger objects "
            "than MicroPython's): the live working set a collecting heap must hold"
        ),
        "table_bytes": mp["table_bytes"],
        "target_ms_per_sign": TARGET_MS_PER_SIGN,
        "target_peak_heap_bytes": TARGET_PEAK_HEAP_BYTES,
        "meets_ms_target": mp_best <= TARGET_MS_PER_SIGN,
        "unix_port": _unix_port_heap(),
    }
