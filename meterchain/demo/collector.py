"""Readings from MQTT into the aggregator: verified, sequence-checked, then into the ledger inbox.

`ReadingCollector` subscribes to every meter topic, verifies each reading
(`meterchain.reading.verify` against the registry, then the SQLite
`SequenceGuard`: no replay, no gap in order, no register running backwards),
and keeps it by hour until the demo hands it to the ledger store's inbox, from
which the aggregator's block former (`aggregator.former`) takes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meterchain import reading
from meterchain.demo.agents import BrokerAddress, mqtt_client
from meterchain.errors import MeterChainError, RejectedReading
from meterchain.ledger.readings import LedgerReading
from meterchain.registry import Registry
from meterchain.sequence import SequenceGuard


class BlockRefused(MeterChainError):
    """Too few consensus agents signed a proposed block; the message has their reasons."""


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
