"""A rig's observer of the meters' topics: every reading verified, sequence-checked, kept by hour.

`ReadingCollector` subscribes to every meter topic, verifies each reading
(`meterchain.reading.verify` against the registry, then the SQLite
`SequenceGuard`: no replay, no gap in order, no register running backwards),
and keeps it by hour for the conformance checks of `hil.scenarios`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from meterchain import reading
from meterchain.errors import MeterChainError, RejectedReading
from meterchain.ledger.readings import LedgerReading
from meterchain.registry import Registry
from meterchain.sequence import SequenceGuard


class RigLinkError(MeterChainError):
    """A rig client could not reach the broker or was refused."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str = ""
    password: str = ""
    ca_file: str | None = None


def mqtt_client(
    client_id: str,
    broker: BrokerAddress,
    subscriptions: Sequence[str] = (),
    on_message: Any = None,
    *,
    persistent: bool = False,
) -> mqtt.Client:
    """A connected paho client with its network loop running (raises AgentError if refused).

    `subscriptions` are (re)subscribed at QoS 1 on every connect, so the client
    keeps receiving after a broker restart; the first connect waits for SUBACK.
    `persistent` asks the broker to keep the session (and queue QoS 1 messages)
    while the client is away. `client.mc_subscribed` is set while subscribed.
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent
    )
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.ca_file:
        client.tls_set(ca_certs=broker.ca_file)
    connected = threading.Event()
    subscribed = threading.Event()

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if getattr(rc, "is_failure", False):
            return
        for topic in subscriptions:
            c.subscribe(topic, qos=1)
        connected.set()

    client.on_connect = on_connect  # type: ignore[assignment]
    if on_message is not None:
        client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()  # type: ignore[assignment]
    client.on_disconnect = lambda *args: subscribed.clear()  # type: ignore[assignment]
    client.mc_subscribed = subscribed  # type: ignore[attr-defined]
    client.reconnect_delay_set(0.05, 1)
    try:
        client.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise RigLinkError(f"{client_id}: cannot reach the broker {broker.host}:{broker.port}: "
                         f"{exc}") from exc  # fmt: skip
    client.loop_start()
    if not connected.wait(10) or (subscriptions and not subscribed.wait(10)):
        client.loop_stop()
        raise RigLinkError(f"{client_id}: broker {broker.host}:{broker.port} did not accept us")
    return client




class ReadingCollector:
    """Verified readings from `mc/<market>/r/+`, grouped by hour, plus what was refused."""

    def __init__(
        self,
        market: str,
        registry: Registry,
        guard_path: Path,
        broker: BrokerAddress,
        clock: Callable[[], float],
    ) -> None:
        self.registry = registry
        self.guard = SequenceGuard(guard_path)
        self.clock = clock
        self.by_hour: dict[int, list[LedgerReading]] = {}
        self.received = 0
        self.accepted = 0
        self.rejected: list[str] = []
        self._cond = threading.Condition()
        # A persistent session: QoS 1 readings wait at the broker while we are away.
        self.client = mqtt_client(
            f"aggregator-{market}", broker, [f"mc/{market}/r/+"], self._on_message,
            persistent=True,
        )  # fmt: skip

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        data = bytes(msg.payload)
        with self._cond:
            self.received += 1
            try:
                verified = reading.verify(data, self.registry, now=int(self.clock()))
                self.guard.check_and_accept(verified)
            except RejectedReading as exc:
                self.rejected.append(f"{msg.topic}: {exc}")
            else:
                self.accepted += 1
                r = LedgerReading.from_reading(verified, data)
                self.by_hour.setdefault(r.hour, []).append(r)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until `count` readings arrived (accepted or refused)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.received >= count, timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the collector is connected and subscribed (again, after a restart)."""
        return bool(self.client.mc_subscribed.wait(timeout))

    def take(self, hour: int) -> list[LedgerReading]:
        with self._cond:
            return self.by_hour.pop(hour, [])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.guard.close()
