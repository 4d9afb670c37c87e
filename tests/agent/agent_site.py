"""Helpers for the edge agent tests: a site folder (keys, registry, agent.toml) and processes.

`Site` writes what an installer would: the node key and broker password
(mode 600), a registry with board meters and the agent's gateway keys, and
an agent.toml; `AgentProcess` runs `meterchain agent run --config ...` as a
real process, with NOTIFY_SOCKET pointed at a datagram socket so the test
sees the agent's sd_notify READY=1 like systemd would.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from edge_agent.gateway import gateway_key
from hil.broker import MosquittoBroker, free_port
from meterchain.keys import PrivateKey
from meterchain.mqtt_auth import meter_acl, node_acl, reading_topic
from meterchain.reading import sign_reading
from meterchain.registry import entry_text, make_meter

MARKET = "m1"
NODE = "mg1"
INGEST_WORKERS = 2
INGEST_USER = f"{NODE}.ingest"


@dataclass
class BoardMeter:
    """A meter that signs its own readings (stands in for a board until emulated boards land)."""

    meter_id: str
    key: PrivateKey
    owner: str
    source: str
    password: str
    registered: bool = True
    seq: int = 0

    def reading(
        self,
        t: int,
        import_wh: int,
        export_wh: int = 0,
        power_w: int = 0,
        flags: int = 0,
        seq: int | None = None,
    ) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return sign_reading(
            self.key, self.meter_id, seq, t, import_wh, export_wh, power_w, flags, self.source
        )


@dataclass
class Site:
    """A site folder for one agent: config, secrets, registry."""

    root: Path
    broker: MosquittoBroker
    node_key: PrivateKey = field(default_factory=PrivateKey.generate)
    boards: dict[str, BoardMeter] = field(default_factory=dict)
    modbus: list[dict[str, object]] = field(default_factory=list)
    metrics_port: int = field(default_factory=free_port)
    extra: str = ""
    # Meters whose key lives elsewhere (an emulated board's flash): id -> public key point.
    external: dict[str, bytes] = field(default_factory=dict)
    # Ingest worker processes, each its own broker user (the broker may bind client ids).
    ingest_workers: int = INGEST_WORKERS

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    @property
    def database(self) -> Path:
        return self.root / "state" / "agent.sqlite"

    def add_board(
        self, meter_id: str, owner: str = NODE, source: str = "load", *, registered: bool = True
    ) -> BoardMeter:
        """A signing meter with broker credentials (`registered=False`: not in the registry)."""
        board = BoardMeter(
            meter_id, PrivateKey.generate(), owner, source, f"pw-{meter_id}", registered
        )
        self.boards[meter_id] = board
        return board

    def add_modbus_meter(
        self,
        meter_id: str,
        port: int,
        *,
        unit: int = 1,
        source: str = "load",
        poll_interval_s: float = 0.2,
    ) -> None:
        self.modbus.append(
            {"id": meter_id, "port": port, "unit": unit, "source": source, "poll": poll_interval_s}
        )

    def write(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.node_key.save(self.root / "node.key")
        secret = self.root / "broker.pass"
        secret.write_text("agent-pw\n")
        secret.chmod(0o600)
        entries = [
            entry_text(make_meter(b.meter_id, b.key.public_key(), b.owner, b.source))
            for b in self.boards.values()
            if b.registered
        ]
        entries += [
            entry_text(make_meter(meter_id, point, NODE, "load"))
            for meter_id, point in self.external.items()
        ]
        for m in self.modbus:
            key = gateway_key(self.node_key, MARKET, str(m["id"])).public_key()
            entries.append(entry_text(make_meter(str(m["id"]), key, NODE, str(m["source"]))))
        (self.root / "registry.toml").write_text("\n".join(entries))
        lines = [
            "[agent]",
            f'node_id = "{NODE}"',
            f'market = "{MARKET}"',
            'key_file = "node.key"',
            'registry = "registry.toml"',
            'state_dir = "state"',
            'log_level = "debug"',
            f"metrics_port = {self.metrics_port}",
            "",
            "[broker]",
            f'url = "{self.broker.url}"',
            f'ca_file = "{self.broker.ca_file}"',
            'password_file = "broker.pass"',
            "batch_wait_ms = 5",
            f"ingest_workers = {self.ingest_workers}",
            f'ingest_username = "{INGEST_USER}"',
            "",
        ]
        for m in self.modbus:
            lines += [
                "[[modbus.bus]]",
                f'name = "bus-{m["id"]}"',
                'kind = "tcp"',
                'host = "127.0.0.1"',
                f"port = {m['port']}",
                "timeout_s = 0.5",
                "backoff_initial_s = 0.1",
                "backoff_max_s = 0.5",
                "",
                "[[modbus.meter]]",
                f'id = "{m["id"]}"',
                f'bus = "bus-{m["id"]}"',
                f"unit = {m['unit']}",
                f'source = "{m["source"]}"',
                f"poll_interval_s = {m['poll']}",
                "",
            ]
        self.config_path.write_text("\n".join(lines) + self.extra)
        return self.config_path

    def broker_users(self) -> tuple[dict[str, str], str]:
        users = {NODE: "agent-pw", "observer": "obs-pw"}
        acl = node_acl(MARKET, NODE) + f"user observer\ntopic read mc/{MARKET}/#\n"
        for k in range(self.ingest_workers):
            users[f"{INGEST_USER}{k}"] = "agent-pw"
            acl += node_acl(MARKET, NODE, user=f"{INGEST_USER}{k}")
        for b in self.boards.values():
            users[b.meter_id] = b.password
            acl += meter_acl(MARKET, b.meter_id)
        return users, acl


def agent_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "meterchain.cli", "agent", *args]


class AgentProcess:
    """`meterchain agent run` as a child process with a fake systemd notify socket."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self._dir = tempfile.mkdtemp(prefix="notify-")
        self.notify_path = os.path.join(self._dir, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.2)
        self.notes: list[str] = []  # every sd_notify line, in order
        self.log_path = site.root / f"agent-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._closing = False

    def _read_notify(self) -> None:
        while not self._closing:
            try:
                data = self.notify.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.notes.extend(data.decode().splitlines())

    def start(self, timeout: float = 20.0) -> AgentProcess:
        # WATCHDOG_USEC without WATCHDOG_PID: the watchdog applies to the child, as
        # systemd's WatchdogSec does for the service's main process.
        env = dict(
            os.environ,
            NOTIFY_SOCKET=self.notify_path,
            WATCHDOG_USEC="2000000",
            PYTHONUNBUFFERED="1",
        )
        env.pop("WATCHDOG_PID", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            agent_command("run", "--config", str(self.site.config_path)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._reader.start()
        self.wait_for("READY=1", timeout)
        # Readings published before the agent's first subscription are not kept for it.
        self.wait_for("STATUS=subscribed to readings", timeout)
        return self

    def wait_for(self, message: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited {self.process.returncode}:\n{self.log()}")
            if message in self.notes:
                return
            time.sleep(0.05)
        raise AssertionError(f"agent did not send {message} in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except OSError:
            return ""

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.site.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL: what a power cut or an OOM kill does."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._reader.is_alive():
            self._reader.join(2)
        self.notify.setblocking(False)
        while True:  # datagrams sent just before exit
            try:
                data = self.notify.recv(4096)
            except OSError:
                break
            self.notes.extend(data.decode().splitlines())
        self.notify.close()
        self._log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if not self._closing:
            self._close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if got == want:
            return float(value)
    return 0.0


class Publisher:
    """A real paho client publishing signed readings to the real broker as one meter."""

    def __init__(self, broker: MosquittoBroker, user: str, password: str) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{user}", protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(user, password)
        self.client.tls_set(ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: connected.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not connected.wait(10):
            raise AssertionError(f"publisher {user} could not connect")

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def publish_reading(self, meter_id: str, payload: bytes) -> None:
        self.publish(reading_topic(MARKET, meter_id), payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Collector:
    """A real paho client that records every message on a topic filter (as the aggregator would)."""

    def __init__(self, broker: MosquittoBroker, user: str, password: str, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"collect-{user}", protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(user, password)
        self.client.tls_set(ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise AssertionError(f"collector could not subscribe to {topic}")

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [payload for _, payload in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
