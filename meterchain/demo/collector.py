"""The demo aggregator's two jobs: collect verified readings from MQTT and form signed blocks.

`ReadingCollector` subscribes to every meter topic, verifies each reading
(`meterchain.reading.verify` against the registry, then the SQLite
`SequenceGuard`: no replay, no gap in order, no register running backwards)
and keeps it for the block of its hour. `BlockFormer` builds each block on
the ledger store, sends the proposal to every consensus agent's
`BlockReviewer` (they re-execute it and sign or refuse), collects a quorum
certificate of more than n/2 signatures, checks the sealed block once more
with `accept_block` and appends it; then the agents store it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meterchain import reading
from meterchain.demo.agents import BrokerAddress, mqtt_client
from meterchain.errors import MeterChainError, RejectedReading
from meterchain.ledger.block import GENESIS_PREV, Block
from meterchain.ledger.chain import StoreReadings
from meterchain.ledger.readings import HOUR, LedgerReading
from meterchain.ledger.review import (
    BlockReviewer,
    Proposal,
    accept_block,
    encode_committed,
    parse_reply,
)
from meterchain.ledger.sandbox import reading_batch
from meterchain.ledger.state import LedgerState
from meterchain.ledger.store import LedgerStore
from meterchain.ledger.transactions import Tx
from meterchain.quorum import QuorumCertificate
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


class BlockFormer:
    """Forms blocks on `store`, certified by the consensus agents' reviewers."""

    def __init__(
        self,
        store: LedgerStore,
        reviewers: Sequence[BlockReviewer],
        quorum: int,
        regulator: Any,
        proposer: str = "aggregator",
    ) -> None:
        self.store = store
        self.reviewers = list(reviewers)
        self.quorum = quorum
        self.regulator = regulator
        self.proposer = proposer
        self.source = StoreReadings(store)
        self.state: LedgerState | None = None
        self.refusals: list[str] = []

    def commit(
        self,
        market: str,
        txs: Sequence[Tx],
        time: int,
        readings: dict[int, tuple[LedgerReading, ...]] | None = None,
        round: int = 0,
    ) -> Block:
        readings = readings or {}
        head = self.store.head()
        height, prev = (0, GENESIS_PREV) if head is None else (head[0] + 1, head[1])
        block = Block.build(
            market=market, height=height, prev=prev, time=time, round=round,
            proposer=self.proposer, txs=txs,
        )  # fmt: skip
        proposal = Proposal(block, readings).encode()
        signatures: list[tuple[str, bytes]] = []
        reasons: list[str] = []
        for reviewer in self.reviewers:
            reply = parse_reply(reviewer.review(proposal, time))
            if reply.kind == "block-vote" and reply.header_hash == block.hash:
                signatures.append((reply.node_id, reply.signature))
            else:
                reasons.append(f"{reply.node_id}: {reply.reason}")
        self.refusals.extend(reasons)
        if len(signatures) < self.quorum:
            raise BlockRefused(f"block {height}: {len(signatures)} signature(s), "
                               f"refusals: {'; '.join(reasons)}")  # fmt: skip
        sealed = block.with_qc(QuorumCertificate.collect(block.statement(), signatures))
        self.state = accept_block(
            self.state, sealed, readings, self.source, regulator=self.regulator
        )
        self.store.append(sealed, readings)
        announcement = encode_committed(sealed)
        for reviewer in self.reviewers:
            reviewer.committed(announcement)
        return sealed

    def commit_readings(
        self, market: str, readings: Sequence[LedgerReading], time: int
    ) -> Block | None:
        """One block with one reading batch per hour of `readings` (None when there are none)."""
        by_hour: dict[int, list[LedgerReading]] = {}
        for r in readings:
            by_hour.setdefault(r.time // HOUR, []).append(r)
        if not by_hour:
            return None
        txs: list[Tx] = []
        batches: dict[int, tuple[LedgerReading, ...]] = {}
        for hour in sorted(by_hour):
            tx, ordered = reading_batch(hour, by_hour[hour])
            batches[len(txs)] = ordered
            txs.append(tx)
        return self.commit(market, txs, time, batches)
