"""The market clock every service reads: real time, or a lab's accelerated day from its config.

A `[clock]` table in the agent's and the aggregator's configuration sets it:

    [clock]
    start = 1718062200   # market time (Unix s) at the anchor; 0 (default): real time
    speed = 1440.0       # market seconds per real second (1440: a day in a minute)
    anchor = 1764669000.0  # wall time (Unix s) at which market time leaves `start`

Before `anchor` the market clock stands still at `start`, so services that
start at different moments agree on the day from the first block on; after
it, market time runs at `speed`. Everything about the market (hours, bids,
block intervals, settlement grace) is in market seconds; everything about the
network (the consensus bound delta, vote timeouts, keepalives) stays in real
seconds, so a lab day exercises the same code and timers as a real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from meterchain.config_files import TableChecker


@dataclass(frozen=True)
class MarketClock:
    start: int = 0  # market Unix time at `anchor`; 0: the clock is the wall clock
    speed: float = 1.0
    anchor: float = 0.0

    @property
    def real_time(self) -> bool:
        return self.start == 0

    def now(self) -> float:
        """Market time, Unix seconds."""
        wall = time.time()
        if self.real_time:
            return wall
        return self.start + max(0.0, wall - self.anchor) * self.speed

    def wall_seconds(self, market_seconds: float) -> float:
        """How long `market_seconds` of market time take on the wall clock."""
        return market_seconds / self.speed

    def wall_until(self, market_time: float) -> float:
        """Real seconds from now until the market clock reads `market_time` (0 if past)."""
        ahead = market_time - self.now()
        if ahead <= 0:
            return 0.0
        if not self.real_time and time.time() < self.anchor:
            return (self.anchor - time.time()) + self.wall_seconds(market_time - self.start)
        return self.wall_seconds(ahead)


REAL_TIME = MarketClock()


def check_clock(check: TableChecker, raw: Any, *, require_anchor: bool = True) -> MarketClock:
    """The `[clock]` table of a service configuration (ConfigError naming the bad key).

    An accelerated clock needs its anchor (`meterchain site up` sets it when it
    starts the site); `require_anchor=False` accepts one not anchored yet.
    """
    clock: MarketClock = check.table(raw, MarketClock, "clock")
    if clock.start < 0:
        check.fail("clock.start", f"must be 0 (real time) or a Unix time, got {clock.start}")
    if not 0 < clock.speed <= 100_000 or clock.speed != clock.speed:
        check.fail("clock.speed", f"must be in (0, 100000], got {clock.speed}")
    if clock.real_time and (clock.speed != 1.0 or clock.anchor):
        check.fail("clock.start", "is required (a Unix time) when speed or anchor is set")
    if clock.anchor < 0 or clock.anchor != clock.anchor:
        check.fail("clock.anchor", f"must be a Unix time, got {clock.anchor}")
    if require_anchor and not clock.real_time and not clock.anchor:
        check.fail("clock.anchor", "missing: `meterchain site up` sets it when the site starts")
    return clock
