"""Tail a board's signed readings and verify each one against the meter registry.

Two sources: the broker (`--broker URL`: subscribe to mc/<market>/r/#, as the edge
agent does) or the board's console (`--port`: the firmware prints every signed
reading as an `MC-R <hex>` line; on an emulated board that is its console.log).
Each reading is checked with `meterchain.reading.verify` (signature, registry,
canonical encoding, field ranges) and, from the broker, against its topic; the
result is one line per reading.
"""

from __future__ import annotations

import queue
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meterchain.board.driver import EMULATED_PREFIX
from meterchain.board.emulated import CONSOLE_FILE
from meterchain.board.provision import parse_broker_url
from meterchain.errors import MeterChainError, RejectedReading
from meterchain.reading import Reading, verify
from meterchain.registry import Registry
from meterchain.times import iso_utc

_READING_PREFIX = "MC-R "


@dataclass
class MonitorStats:
    verified: list[Reading] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)


def describe(reading: Reading) -> str:
    return (
        f"OK {reading.meter_id} seq={reading.seq} time={iso_utc(reading.time)} "
        f"import={reading.import_wh}Wh export={reading.export_wh}Wh power={reading.power_w}W "
        f"flags=0x{reading.flags:02x} source={reading.source}"
    )


def check(
    data: bytes,
    registry: Registry,
    where: str,
    stats: MonitorStats,
    out: Callable[[str], None],
    topic_meter: str | None = None,
) -> None:
    try:
        reading = verify(data, registry)
    except RejectedReading as exc:
        stats.rejected.append((where, exc.reason))
        out(f"REJECTED {where}: {exc.reason}: {exc}")
        return
    if topic_meter is not None and topic_meter != reading.meter_id:
        stats.rejected.append((where, "topic"))
        out(f"REJECTED {where}: topic: reading of {reading.meter_id} on {topic_meter}'s topic")
        return
    stats.verified.append(reading)
    out(describe(reading))


def _console_lines(port: str, from_start: bool, deadline: float) -> Iterator[str]:
    if port.startswith(EMULATED_PREFIX):
        path = Path(port[len(EMULATED_PREFIX) :]) / CONSOLE_FILE
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not path.exists():
            return
        with path.open() as console:
            if not from_start:
                console.seek(0, 2)
            partial = ""
            while time.monotonic() < deadline:
                chunk = console.readline()
                if not chunk:
                    time.sleep(0.05)
                    continue
                partial += chunk
                if partial.endswith("\n"):
                    yield partial.rstrip("\n")
                    partial = ""
        return
    import serial

    link = serial.Serial()
    link.port, link.baudrate, link.timeout = port, 115200, 0.5
    # ESP32 dev boards wire DTR/RTS to EN/GPIO0: keep both released, or opening the
    # port would reset the board (or hold it in its ROM bootloader).
    link.dtr = False
    link.rts = False
    link.open()
    with link:
        while time.monotonic() < deadline:
            raw = link.readline()
            if raw:
                yield raw.decode(errors="replace").rstrip("\r\n")


def monitor_port(
    port: str,
    registry: Registry,
    *,
    count: int | None,
    timeout: float,
    from_start: bool = False,
    out: Callable[[str], None] = print,
    verbose: bool = False,
) -> MonitorStats:
    stats = MonitorStats()
    deadline = time.monotonic() + timeout
    for line in _console_lines(port, from_start, deadline):
        if line.startswith(_READING_PREFIX):
            try:
                data = bytes.fromhex(line[len(_READING_PREFIX) :].strip())
            except ValueError:
                stats.rejected.append((port, "console"))
                out(f"REJECTED {port}: console line is not hex")
                continue
            check(data, registry, port, stats, out)
        elif verbose and line.startswith("MC"):
            out(f"  {line}")
        if count is not None and len(stats.verified) + len(stats.rejected) >= count:
            break
    return stats


def monitor_broker(
    url: str,
    market: str,
    registry: Registry,
    *,
    ca_file: Path | None,
    username: str | None,
    password: str | None,
    count: int | None,
    timeout: float,
    out: Callable[[str], None] = print,
) -> MonitorStats:
    import paho.mqtt.client as mqtt

    target = parse_broker_url(url)
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    connected: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"mc-monitor-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )
    if username:
        client.username_pw_set(username, password)
    if target["tls"]:
        client.tls_set(
            ca_certs=str(ca_file) if ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT
        )
    topic = f"mc/{market}/r/#"

    def on_connect(
        c: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        connected.put(getattr(rc, "value", 0))
        c.subscribe(topic, qos=1)

    client.on_connect = on_connect
    client.on_message = lambda c, u, m: inbox.put((m.topic, m.payload))
    stats = MonitorStats()
    try:
        client.connect(target["host"], target["port"])
    except OSError as exc:
        raise MeterChainError(f"cannot reach the broker at {url}: {exc}") from exc
    client.loop_start()
    try:
        try:
            rc = connected.get(timeout=min(timeout, 10))
        except queue.Empty as exc:
            raise MeterChainError(f"no CONNACK from {url}") from exc
        if rc:
            raise MeterChainError(f"broker {url} refused the monitor: return code {rc}")
        deadline = time.monotonic() + timeout
        while count is None or len(stats.verified) + len(stats.rejected) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg_topic, payload = inbox.get(timeout=left)
            except queue.Empty:
                break
            parts = msg_topic.split("/")
            meter = parts[3] if len(parts) == 4 else None
            check(bytes(payload), registry, msg_topic, stats, out, topic_meter=meter)
    finally:
        client.disconnect()
        client.loop_stop()
    return stats


def exit_status(stats: MonitorStats, count: int | None) -> int:
    if stats.rejected:
        return 1
    if count is not None and len(stats.verified) < count:
        print(f"only {len(stats.verified)} of {count} readings arrived", file=sys.stderr)
        return 3
    return 0
