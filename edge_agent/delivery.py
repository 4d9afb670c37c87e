"""End-to-end delivery: per-meter watermarks the agent acknowledges, and the gaps it holds back.

The scheme (README, "Delivery guarantee"): after its SQLite commit the agent
publishes, per meter of its own microgrid, a retained QoS 1 message on
`mc/<market>/ack/<meter_id>` with the deterministic CBOR map
{1: meter_id, 2: watermark}. A board frees spooled readings only up to the
watermark and resends the rest from watermark + 1 on every reconnect and
after its `ack_timeout_s`, so a reading a broker loses (kill -9, a full
queue, a session taken over) is sent again until the agent has it.

The watermark is the highest sequence handled *contiguously*: accepted, or
refused for good (and then kept in the rejection log). A reading above
watermark + 1 leaves a gap; the readings in it may be ones the broker lost,
and acknowledging past them would make the board free them. So such a
reading is deferred (not committed, PUBACKed so the broker forgets it) and
the board sends it again after rewinding. A gap is real only where the
board has nothing to fill it (its spool thinned on overflow, sequence
numbers skipped at a reboot); the agent accepts a gap once the reading above
it has waited `gap_hold_s` as the lowest sequence pending above the
watermark, a time a board's rewinds fill any gap the broker made.

`Watermarks` is the pure bookkeeping (no I/O, injected clock); the store
persists watermarks in the ingest transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meterchain import codec

DEFAULT_GAP_HOLD_S = 300.0  # well above a board's default ack_timeout_s (120 s)
MAX_PENDING_PER_METER = 1024  # deferred sequence numbers remembered per meter


def ack_payload(meter_id: str, watermark: int) -> bytes:
    """The acknowledgement: canonical CBOR {1: meter_id, 2: watermark}."""
    return codec.encode({1: meter_id, 2: watermark})


@dataclass
class _Gap:
    """Sequence numbers seen above the watermark and when each was first seen."""

    first_seen: dict[int, float] = field(default_factory=dict)


class Watermarks:
    """Per-meter watermarks of one writer: `decide` in order, then `commit` or `rollback`.

    `load(meter_id)` reads a committed watermark from the store (None if the
    meter was never handled; the first reading of a fresh board is seq 1).
    """

    def __init__(
        self,
        load: Callable[[str], int | None],
        *,
        gap_hold_s: float = DEFAULT_GAP_HOLD_S,
        clock: Callable[[], float],
    ) -> None:
        self._load = load
        self.gap_hold_s = gap_hold_s
        self._clock = clock
        self._committed: dict[str, int] = {}
        self._pending: dict[str, int] = {}  # advanced in the open transaction
        self._gaps: dict[str, _Gap] = {}

    def watermark(self, meter_id: str) -> int:
        """The committed watermark (0 for a meter never handled)."""
        known = self._committed.get(meter_id)
        if known is None:
            known = self._load(meter_id) or 0
            self._committed[meter_id] = known
        return known

    def _current(self, meter_id: str) -> int:
        pending = self._pending.get(meter_id)
        return self.watermark(meter_id) if pending is None else pending

    def decide(self, meter_id: str, seq: int) -> bool:
        """True if a handled reading `seq` may be committed now (the watermark then covers it).

        False means a gap below it: defer the reading, the board sends it again.
        A sequence at or below the watermark is always True (a re-delivery)
        and leaves the watermark where it is.
        """
        current = self._current(meter_id)
        if seq <= current:
            return True
        if seq == current + 1 or self._gap_is_real(meter_id, current, seq):
            self._pending[meter_id] = seq
            return True
        return False

    def _gap_is_real(self, meter_id: str, current: int, seq: int) -> bool:
        now = self._clock()
        gap = self._gaps.setdefault(meter_id, _Gap())
        seen = gap.first_seen
        if seq not in seen and len(seen) < MAX_PENDING_PER_METER:
            seen[seq] = now
        first = seen.get(seq)
        if first is None or now - first < self.gap_hold_s:
            return False
        # Real only if nothing between the watermark and `seq` is known to exist.
        return not any(current < other < seq for other in seen)

    def commit(self) -> dict[str, int]:
        """The transaction committed: the watermarks it advanced, now durable."""
        advanced = self._pending
        self._pending = {}
        for meter_id, seq in advanced.items():
            self._committed[meter_id] = seq
            gap = self._gaps.get(meter_id)
            if gap is not None:
                gap.first_seen = {s: t for s, t in gap.first_seen.items() if s > seq}
                if not gap.first_seen:
                    del self._gaps[meter_id]
        return advanced

    def pending(self) -> dict[str, int]:
        """Watermarks advanced in the open transaction (to be written with it)."""
        return dict(self._pending)

    def rollback(self) -> None:
        self._pending.clear()
