"""`meterchain bench ingest-e2e`: signed readings of 10,000 meters via TLS Mosquitto into the agent.

Everything real: a Mosquitto broker with TLS and passwords (hil.broker), the
agent as its own process (`meterchain agent run` with its ingest worker
processes, `Plan.ingest_workers`; SQLite WAL with synchronous=FULL,
acknowledgement after commit), and meter fleets in processes of their own
that behave like boards towards the end-to-end acknowledgement: QoS 1
publishes, each meter subscribed to its own acknowledgement topic, keeping
what it produced until the agent's retained watermark on
`mc/<market>/ack/<meter_id>` covers it, and resending above the watermark
(at most a board's in-flight window ahead of it) when it has not moved for
`Plan.ack_timeout_s`. Readings are signed before the clock starts (a board
signs on its own CPU), and the fleets write pre-encoded MQTT packets many
per TLS record (`FleetLink`), so the load generator takes little of the
cores it shares with what it measures.

Two phases: `sustained` offers the target rate for `sustain_s`; `overload`
offers twice that for `overload_s`, then production stops and the run waits
until every meter is acknowledged. Figures:
- `committed_per_second`: readings the agent committed per second over the
  sustained phase (after a warm-up), from its metrics;
  `acknowledged_per_second` the same from the fleets' view of the
  watermarks (a board frees only on these); `lag_at_end_of_sustained` is
  what was offered but not yet acknowledged. An agent that keeps up commits
  what is offered, so these read the offered rate, not the agent's ceiling;
- `committed_per_second_overload`: the same over the overload phase, when
  more is offered than the agent takes (its queue never runs dry): the
  agent's capacity;
- `meets_target`: the sustained phase kept up (the target rate offered, and
  less than KEEP_UP_LAG_S of it unacknowledged at the end), the capacity is
  at least the target, and nothing was lost;
- `lost` / `zero_lost`: readings a board was acknowledged (so could free)
  that are not in the agent's database, plus holes in what it holds (its
  sequence guard must hold exactly 1..n per meter); `pending_on_boards_at_end`
  is what the boards still hold when the drain time ran out (kept, not lost);
  `resent` counts what they sent again (the broker dropped it, or the agent
  held it above a gap); `broker_drop_notices` counts Mosquitto's "being
  dropped" log lines (a full queue);
- `cpu_cores_sustained`: cores kept busy over the sustained phase by the
  agent (with its workers), the broker, the fleets, everything else on the
  machine, and idle: where the cores go at the ceiling;
- `scrape_bytes` / `scrape_seconds`: one /metrics scrape with every meter known.

Anchor (same run): bare OpenSSL ECDSA verification of the same readings on
one thread; `ratio_to_raw_verify` = committed_per_second / anchor,
`capacity_ratio_to_raw_verify` = committed_per_second_overload / anchor. Target:
10,000 readings/s sustained, zero lost at 2x. The machine is shared while
this runs (see `load_average` and `cpu_cores_sustained["other"]`), so
figures vary between runs; README's performance table has the measurements.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.ingest import prepare_anchor, raw_verify_seconds
from edge_agent.config import DEFAULT_INGEST_WORKERS
from edge_agent.energy import HOUR_S, hour_start
from hil.broker import MosquittoBroker, free_port
from meterchain import codec
from meterchain.errors import CodecError
from meterchain.keys import PrivateKey
from meterchain.mqtt_wire import mqtt_str, next_packet, packet
from meterchain.reading import sign_reading
from meterchain.registry import Registry, entry_text, make_meter
from meterchain.sequence import window_seqs

TARGET_READINGS_PER_SECOND = 10_000
MARKET = "m1"
NODE = "mg1"
ACK_TIMEOUT_S = 30.0  # boards resend the unacknowledged after this (firmware: 5..86400 s, 120)
FLEETS = 2  # meter fleet processes (each one MQTT connection, like a gateway of boards)
_WARMUP_S = 3
# Kept up: at most this much of the offered input unacknowledged at the sustained phase's
# end. An agent 1 % slower than 10,000/s ends the 60 s phase 6,000 readings (0.6 s) behind.
KEEP_UP_LAG_S = 0.5
_KEEPALIVE_S = 60
BOARD_WINDOW = 8  # QoS 1 publishes a board keeps in flight (firmware broker.inflight default)


def _meter_id(i: int) -> str:
    return f"{NODE}-m{i:05d}"


def _key(i: int) -> PrivateKey:
    return PrivateKey.from_secret(0xE2E + 104_729 * i)


@dataclass(frozen=True)
class Plan:
    meters: int
    rate: int  # offered readings/s in the sustained phase (twice this in the overload)
    sustain_s: float
    overload_s: float
    drain_s: float
    t0: int  # time of each meter's reading 0 (Unix s)
    ingest_workers: int = DEFAULT_INGEST_WORKERS  # the agent's broker.ingest_workers
    ack_timeout_s: float = ACK_TIMEOUT_S
    broker_inflight: int = 1000  # Mosquitto's max_inflight_messages
    broker_queue: int = 100_000  # Mosquitto's max_queued_messages (it drops beyond, silently)
    # The agent is frozen (SIGSTOP, with its workers) for this long as the overload starts:
    # a stalled disk or a starved CPU, while the readings pile up at the broker.
    agent_stall_s: float = 0.0

    def per_meter(self) -> int:
        total = self.rate * self.sustain_s + 2 * self.rate * self.overload_s
        return int(total // self.meters) + 1


# -- the meter fleets (child processes) ---------------------------------------------


class FleetLink:
    """A lean MQTT 3.1.1 client over TLS for the load generator, speaking what boards speak.

    QoS 1 PUBLISH packets are encoded here and written many per TLS record,
    and incoming packets are parsed out of large reads, so a fleet of
    thousands of meters costs the shared cores little next to the agent it
    measures. Boards' behaviour is kept by `Fleet`: QoS 1 publishes, readings
    kept until the agent's watermark covers them, resent above it.
    One thread only (the fleet's loop): writes are blocking, reads polled.
    """

    def __init__(self, broker: dict[str, Any], client_id: str) -> None:
        context = ssl.create_default_context(cafile=broker["ca"])
        raw = socket.create_connection((broker["host"], broker["port"]), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=broker["host"])
        self.sock.settimeout(None)
        self.rx = bytearray()
        self.tx: list[bytes] = []
        self.pid = 0
        body = (
            mqtt_str(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", _KEEPALIVE_S)
            + mqtt_str(client_id.encode()) + mqtt_str(broker["user"].encode())
            + mqtt_str(broker["password"].encode())
        )  # fmt: skip
        self.sock.sendall(packet(0x10, body))
        head, payload = self._read_packet()
        if head != 0x20 or payload[1] != 0:
            raise RuntimeError(f"broker refused the fleet: CONNACK {payload.hex()}")

    def _next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def subscribe(self, topics: list[str], batch: int = 500) -> None:
        """Subscribe QoS 1 to `topics` (in batches) and wait for every SUBACK."""
        waiting = set()
        for i in range(0, len(topics), batch):
            pid = self._next_pid()
            body = struct.pack("!H", pid) + b"".join(
                mqtt_str(t.encode()) + b"\x01" for t in topics[i : i + batch]
            )
            self.sock.sendall(packet(0x82, body))
            waiting.add(pid)
        while waiting:
            head, payload = self._read_packet()
            if head == 0x90:
                if 0x80 in payload[2:]:
                    raise RuntimeError("broker refused a fleet subscription")
                waiting.discard(struct.unpack_from("!H", payload)[0])

    def publish(self, topic: bytes, payload: bytes) -> None:
        """Queue a QoS 1 PUBLISH (written at the next `flush`)."""
        self.tx.append(
            packet(0x32, mqtt_str(topic) + struct.pack("!H", self._next_pid()) + payload)
        )

    def ping(self) -> None:
        self.tx.append(b"\xc0\x00")

    def flush(self) -> None:
        if self.tx:
            data = b"".join(self.tx)
            self.tx.clear()
            self.sock.sendall(data)

    def poll(self) -> list[tuple[bytes, bytes]]:
        """The application messages that arrived (topic, payload); QoS 1 ones are PUBACKed."""
        while self.sock.pending() or select.select([self.sock], [], [], 0)[0]:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise RuntimeError("the broker closed the fleet's connection")
            self.rx += chunk
        messages = []
        while (parsed := _parse(self.rx)) is not None:
            head, payload, used = parsed
            del self.rx[:used]
            if head & 0xF0 == 0x30:
                (n,) = struct.unpack_from("!H", payload)
                topic, rest = payload[2 : 2 + n], payload[2 + n :]
                if head & 0x06:  # QoS 1: the packet id, then the payload
                    self.tx.append(b"\x40\x02" + rest[:2])
                    rest = rest[2:]
                messages.append((bytes(topic), bytes(rest)))
        return messages

    def _read_packet(self) -> tuple[int, bytes]:
        while (parsed := _parse(self.rx)) is None:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise RuntimeError("the broker closed the fleet's connection")
            self.rx += chunk
        head, payload, used = parsed
        del self.rx[:used]
        return head, payload

    def close(self) -> None:
        try:
            self.flush()
            self.sock.sendall(b"\xe0\x00")
        finally:
            self.sock.close()


def _parse(buf: bytearray) -> tuple[int, bytes, int] | None:
    """(first byte, body, bytes used) of the first whole packet in `buf`, or None."""
    found = next_packet(buf)
    if found is None:
        return None
    head, start, end = found
    return head, bytes(buf[start:end]), end


class Fleet:
    """Meters `ids` behind one MQTT connection, acting as boards towards the acknowledgement."""

    def __init__(self, ids: list[int], plan: Plan, broker: dict[str, Any]) -> None:
        self.plan = plan
        self.ids = ids
        self.names = [_meter_id(i) for i in ids]
        self.topics = [f"mc/{MARKET}/r/{name}".encode() for name in self.names]
        self.index = {f"mc/{MARKET}/ack/{name}".encode(): k for k, name in enumerate(self.names)}
        n = plan.per_meter()
        self.signed = [
            [
                sign_reading(
                    _key(i), _meter_id(i), s + 1, plan.t0 + 10 * s, 1000 + 3 * s, 0, 400, 0, "load"
                )
                for s in range(n)
            ]
            for i in ids
        ]
        self.produced = [0] * len(ids)  # readings 1..produced exist
        self.watermark = [0] * len(ids)
        self.progress = [0.0] * len(ids)  # when the watermark last moved (or a rewind)
        self.resent = 0
        self.published = 0
        # Resending after a rewind: up to where (a board resends its spool through its
        # in-flight window, not all at once).
        self.cursor = [0] * len(ids)
        self.resending: set[int] = set()
        self.link = FleetLink(broker, f"fleet-{ids[0]}")
        # Each board subscribes to its own acknowledgement topic only.
        self.link.subscribe([f"mc/{MARKET}/ack/{name}" for name in self.names])
        self.last_ping = time.monotonic()

    def _service(self) -> None:
        """Take the acknowledgements that arrived, resend, keep alive, write what is queued."""
        now = time.monotonic()
        for topic, payload in self.link.poll():
            k = self.index.get(topic)
            if k is None:
                continue
            try:
                ack = codec.decode(payload)
            except CodecError:
                continue
            watermark = ack.get(2) if isinstance(ack, Mapping) else None
            if type(watermark) is int and self.watermark[k] < watermark <= self.produced[k]:
                self.watermark[k] = watermark
                self.progress[k] = now
        self._resend()
        if now - self.last_ping > _KEEPALIVE_S / 3:
            self.link.ping()
            self.last_ping = now
        self.link.flush()

    def _publish(self, k: int, seq: int) -> None:
        self.link.publish(self.topics[k], self.signed[k][seq - 1])
        self.published += 1

    def _rewind_stuck(self) -> None:
        """Meters whose watermark has not moved for the ack timeout start again above it."""
        now = time.monotonic()
        for k in range(len(self.ids)):
            stuck = now - self.progress[k] > self.plan.ack_timeout_s
            if stuck and self.watermark[k] < self.produced[k]:
                self.progress[k] = now
                self.cursor[k] = self.watermark[k]
                self.resending.add(k)

    def _resend(self) -> None:
        """Resend above the watermark, at most a board's in-flight window ahead of it."""
        for k in list(self.resending):
            low, high = self.watermark[k], self.produced[k]
            if low >= high:
                self.resending.discard(k)
                continue
            top = min(high, low + BOARD_WINDOW)
            for seq in range(max(self.cursor[k], low) + 1, top + 1):
                self._publish(k, seq)
                self.resent += 1
            self.cursor[k] = max(self.cursor[k], top)

    def acknowledged(self) -> int:
        return sum(self.watermark)

    def run(self, start_at: float) -> dict[str, Any]:
        plan = self.plan
        share = len(self.ids) / plan.meters
        phases = [
            (plan.sustain_s, plan.rate * share),
            (plan.overload_s, 2 * plan.rate * share),
        ]
        while time.time() < start_at:
            time.sleep(0.001)
        begin = time.monotonic()
        timeline: list[tuple[float, int, int]] = []  # (s since start, produced, acknowledged)
        made = 0
        next_tick = 0.0
        phase_start = 0.0
        made_by_phase: list[int] = []  # produced by the end of each phase
        for duration, rate in phases:
            made_before = made
            while (elapsed := time.monotonic() - begin) < phase_start + duration:
                due = made_before + int(rate * (elapsed - phase_start))
                while made < due:
                    k = made % len(self.ids)
                    if self.produced[k] >= len(self.signed[k]):
                        break
                    self.produced[k] += 1
                    if self.watermark[k] == self.produced[k] - 1:
                        self.progress[k] = time.monotonic()
                    self._publish(k, self.produced[k])
                    made += 1
                self._service()
                if elapsed >= next_tick:
                    timeline.append((elapsed, made, self.acknowledged()))
                    self._rewind_stuck()
                    next_tick += 0.5
                time.sleep(0.002)
            made_by_phase.append(made)
            phase_start += duration
        deadline = time.monotonic() + plan.drain_s
        while self.acknowledged() < made and time.monotonic() < deadline:
            self._service()
            if time.monotonic() - begin >= next_tick:
                timeline.append((time.monotonic() - begin, made, self.acknowledged()))
                self._rewind_stuck()
                next_tick += 0.5
            time.sleep(0.01)
        timeline.append((time.monotonic() - begin, made, self.acknowledged()))
        self.link.close()
        return {
            "meters": list(zip(self.names, self.produced, self.watermark, strict=True)),
            "made": made,
            "made_sustained": made_by_phase[0],
            "acknowledged": self.acknowledged(),
            "published": self.published,
            "resent": self.resent,
            "timeline": timeline,
        }


def _fleet_main(
    ids: list[int], plan: Plan, broker: dict[str, Any], ready: Any, go: Any, results: Any
) -> None:
    try:
        fleet = Fleet(ids, plan, broker)
        ready.put(True)
        results.put(fleet.run(go.get()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        ready.put(False)
        results.put({"error": repr(exc)})


# -- the site: broker, agent ---------------------------------------------------------


def _write_site(
    root: Path, broker: MosquittoBroker, meters: int, metrics_port: int, ingest_workers: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    PrivateKey.from_secret(0x5EED).save(root / "node.key")
    secret = root / "broker.pass"
    secret.write_text("agent-pw\n")
    secret.chmod(0o600)
    (root / "registry.toml").write_text(
        "\n".join(
            entry_text(make_meter(_meter_id(i), _key(i).public_key(), NODE, "load"))
            for i in range(meters)
        )
    )
    config = root / "agent.toml"
    config.write_text(
        "\n".join(
            [
                "[agent]",
                f'node_id = "{NODE}"',
                f'market = "{MARKET}"',
                'key_file = "node.key"',
                'registry = "registry.toml"',
                'state_dir = "state"',
                'log_level = "warning"',
                f"metrics_port = {metrics_port}",
                "",
                "[broker]",
                f'url = "{broker.url}"',
                f'ca_file = "{broker.ca_file}"',
                'password_file = "broker.pass"',
                "batch_max = 256",
                "batch_wait_ms = 20",  # deploy/agent.example.toml: for thousands of meters
                f"ingest_workers = {ingest_workers}",
                "",
            ]
        )
    )
    return config


def _scrape(port: int) -> tuple[str, float]:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return text, time.perf_counter() - started


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _agent_ready(port: int) -> bool:
    try:
        text, _ = _scrape(port)
    except OSError:
        return False
    return "meterchain_agent_mqtt_connected 1.0" in text


def _accepted_total(port: int) -> float:
    text, _ = _scrape(port)
    prefix = "meterchain_agent_readings_accepted_total"
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


_TICKS = os.sysconf("SC_CLK_TCK")


def _process_tree_cpu(roots: list[int]) -> float:
    """CPU seconds (user + system) used so far by `roots` and their live descendants (Linux)."""
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    total, wanted = 0.0, set(roots)
    for pid in used:
        p = pid
        while p > 1 and p not in wanted:
            p = parent.get(p, 0)
        if p in wanted:
            total += used[pid]
    return total


def _machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, all cores."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / _TICKS, idle / _TICKS


class Sampler(threading.Thread):
    """Every half second where the CPU went; every second the agent's accepted-readings counter.

    The counter comes from a /metrics scrape, which costs the agent about 20
    ms of CPU with 10,000 meters known: scraped at 2 Hz it would take 4 % of
    a core from what is measured (Prometheus scrapes every 15-60 s).

    CPU is split into the agent (with its ingest worker processes), the
    broker, the meter fleets and everything else on the machine (other jobs:
    the figures are only comparable when that is small).
    """

    def __init__(self, port: int, parts: dict[str, list[int]]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.parts = parts  # component -> root pids
        self.samples: list[tuple[float, float]] = []  # (time.time(), accepted)
        self.cpu: list[tuple[float, dict[str, float]]] = []  # (time.time(), CPU seconds)
        self.done = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.done.wait(0.5):
            busy, idle = _machine_cpu()
            used = {name: _process_tree_cpu(pids) for name, pids in self.parts.items()}
            used["other"] = busy - sum(used.values())
            used["idle"] = idle
            self.cpu.append((time.time(), used))
            tick += 1
            if tick % 2:
                continue
            try:
                self.samples.append((time.time(), _accepted_total(self.port)))
            except OSError:
                continue

    def rate(self, start: float, end: float) -> float:
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0)

    def cores(self, start: float, end: float) -> dict[str, float]:
        """Cores each component kept busy on average between `start` and `end`."""
        inside = [(t, used) for t, used in self.cpu if start <= t <= end]
        if len(inside) < 2:
            return {}
        (t0, u0), (t1, u1) = inside[0], inside[-1]
        return {name: round((u1[name] - u0[name]) / (t1 - t0), 2) for name in u0}


def _stall_later(group: int, at: float, seconds: float) -> None:
    """Freeze process group `group` at time `at` for `seconds` (a thread; returns at once)."""

    def stall() -> None:
        time.sleep(max(0.0, at - time.time()))
        os.killpg(group, signal.SIGSTOP)
        time.sleep(seconds)
        os.killpg(group, signal.SIGCONT)

    threading.Thread(target=stall, daemon=True).start()


def _committed(database: Path) -> dict[str, tuple[int, int]]:
    """Per meter: (readings the guard holds, highest sequence)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        held = window_seqs(db)
    return {meter: (len(seqs), seqs[-1]) for meter, seqs in held.items() if seqs}


def _acknowledged_rate(timelines: list[list[tuple[float, int, int]]], plan: Plan) -> float:
    """Acknowledged readings per second between the warm-up and the end of the sustained phase."""

    def acked_at(t: float) -> float:
        total = 0.0
        for timeline in timelines:
            before = [a for s, _, a in timeline if s <= t]
            total += before[-1] if before else 0
        return total

    start = min(_WARMUP_S, plan.sustain_s / 3)
    return (acked_at(plan.sustain_s) - acked_at(start)) / (plan.sustain_s - start)


def run(quick: bool = False) -> dict:
    meters = 1000 if quick else 10_000
    return measure(
        Plan(
            meters=meters,
            rate=2000 if quick else TARGET_READINGS_PER_SECOND,
            sustain_s=6 if quick else 60,
            overload_s=3 if quick else 20,
            drain_s=120 if quick else 900,
            t0=hour_start(int(time.time())) - 6 * HOUR_S,
        )
    )


def measure(plan: Plan) -> dict:
    """One run of the two phases with `plan`; the figures as `run` reports them."""
    meters, rate = plan.meters, plan.rate
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-e2e-"))
    broker = MosquittoBroker(
        workdir / "broker",
        users={NODE: "agent-pw", "fleet": "fleet-pw"},
        acl=None,
        max_inflight_messages=plan.broker_inflight,
        max_queued_messages=plan.broker_queue,
    )
    agent: subprocess.Popen[bytes] | None = None
    ctx = multiprocessing.get_context("spawn")
    fleets: list[Any] = []
    try:
        broker.start()
        metrics_port = free_port()
        config = _write_site(workdir / "site", broker, meters, metrics_port, plan.ingest_workers)
        log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - closed with the process
        agent = subprocess.Popen(
            [sys.executable, "-m", "meterchain.cli", "agent", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            start_new_session=True,  # its own process group: the agent and its workers
        )
        _wait(lambda: _agent_ready(metrics_port), 60, "the agent to connect")
        time.sleep(1.0)  # its subscription is in place before the fleets publish
        ready, go, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        endpoint = {
            "host": broker.host,
            "port": broker.port,
            "ca": str(broker.ca_file),
            "user": "fleet",
            "password": "fleet-pw",
        }
        for f in range(FLEETS):
            ids = list(range(f, meters, FLEETS))
            proc = ctx.Process(target=_fleet_main, args=(ids, plan, endpoint, ready, go, results))
            proc.start()
            fleets.append(proc)
        if not all(ready.get(timeout=1800) for _ in fleets):
            raise RuntimeError(f"a meter fleet failed: {results.get(timeout=10)}")
        start_at = time.time() + 1.0
        assert broker.process is not None
        sampler = Sampler(
            metrics_port,
            {
                "agent": [agent.pid],
                "broker": [broker.process.pid],
                "fleets": [p.pid for p in fleets if p.pid is not None],
            },
        )
        sampler.start()
        for _ in fleets:
            go.put(start_at)
        if plan.agent_stall_s:
            _stall_later(agent.pid, start_at + plan.sustain_s, plan.agent_stall_s)
        load_before = os.getloadavg()[0]
        outcomes = [results.get(timeout=plan.sustain_s + plan.overload_s + plan.drain_s + 120)]
        outcomes += [results.get(timeout=120) for _ in fleets[1:]]
        errors = [o["error"] for o in outcomes if "error" in o]
        if errors:
            raise RuntimeError(f"meter fleet failed: {errors}")
        sampler.done.set()
        scrape, scrape_s = _scrape(metrics_port)
        # Mosquitto says so (at most once a minute per client) when a queue overflows.
        drop_notices = broker.log_path.read_text().count("being dropped")
        committed = _committed(workdir / "site" / "state" / "agent.sqlite")
    finally:
        for proc in fleets:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
        broker.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    # Lost: acknowledged to a board (so it may free it) but not in the agent's database,
    # or a hole in what the agent holds. Pending: still on the boards, never freed.
    lost = 0
    pending = 0
    for o in outcomes:
        for name, produced, watermark in o["meters"]:
            count, top = committed.get(name, (0, 0))
            lost += max(0, watermark - count) + (top - count)
            pending += produced - watermark
    made = sum(o["made"] for o in outcomes)
    warm = min(_WARMUP_S, plan.sustain_s / 3)
    sustained = sampler.rate(start_at + warm, start_at + plan.sustain_s)
    cores = sampler.cores(start_at + warm, start_at + plan.sustain_s)
    # Twice the target offered: the agent's queue never runs dry, so this is what it can take.
    overload_from = start_at + plan.sustain_s + min(2.0, plan.overload_s / 3)
    capacity = sampler.rate(overload_from, start_at + plan.sustain_s + plan.overload_s)
    acknowledged = _acknowledged_rate([o["timeline"] for o in outcomes], plan)
    # What the fleets produced by the end of the sustained phase (the timeline, sampled
    # every half second, would miss up to its last half second).
    offered_sustained = sum(o["made_sustained"] for o in outcomes) / plan.sustain_s
    lag = sum([m - a for s, m, a in o["timeline"] if s <= plan.sustain_s][-1] for o in outcomes)
    # The fleets' pacing reaches 98-100 % of the plan's rate (its last half second).
    keeps_up = offered_sustained >= 0.98 * rate and lag <= KEEP_UP_LAG_S * rate
    registry = Registry()
    sample = []
    for i in range(min(meters, 2000)):
        registry.add(_meter_id(i), _key(i).public_key(), NODE, "load")
        sample.append(
            (_meter_id(i), sign_reading(_key(i), _meter_id(i), 1, plan.t0, 1, 0, 0, 0, "load"))
        )
    prepared = prepare_anchor(registry, sample)
    raw_rate = len(prepared) / min(raw_verify_seconds(prepared) for _ in range(3))
    return {
        "meters": meters,
        "fleets": FLEETS,
        "ingest_workers": plan.ingest_workers,
        "offered_per_second": {"sustained": rate, "overload": 2 * rate},
        "offered_sustained_achieved_per_second": round(offered_sustained),
        "sustain_s": plan.sustain_s,
        "overload_s": plan.overload_s,
        "committed_per_second": round(sustained),
        "acknowledged_per_second": round(acknowledged),
        "committed_per_second_overload": round(capacity),
        "lag_at_end_of_sustained": lag,
        "readings_produced": made,
        "readings_committed": sum(count for count, _ in committed.values()),
        "resent": sum(o["resent"] for o in outcomes),
        "lost": lost,
        "broker_drop_notices": drop_notices,
        "zero_lost": lost == 0,
        "pending_on_boards_at_end": pending,
        "scrape_bytes": len(scrape.encode()),
        "scrape_seconds": round(scrape_s, 3),
        "raw_verify_per_second": round(raw_rate),
        "ratio_to_raw_verify": round(sustained / raw_rate, 3),
        "capacity_ratio_to_raw_verify": round(capacity / raw_rate, 3),
        "load_average": round(load_before, 2),
        "cpu_cores_sustained": cores,
        "target_readings_per_second": TARGET_READINGS_PER_SECOND,
        "keeps_up": keeps_up,
        "meets_target": (
            keeps_up
            and rate >= TARGET_READINGS_PER_SECOND
            and capacity >= TARGET_READINGS_PER_SECOND
            and lost == 0
        ),
    }
