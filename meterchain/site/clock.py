"""The market clock every service reads: real time, or a lab's accelerated day from its config.

A `[clock]` table in the agent's and the aggregator's configuration (and a
lab's boards) sets it:

    [clock]
    start = 1718061600          # market time (Unix s) when the clock starts; 0: real time
    speed = 1440.0              # market seconds per real second (1440: a day in a minute)
    anchor = 1764669000.0       # wall time (Unix s) at which market time leaves `start`
    anchor_file = "run/clock-anchor"   # or: the file that will hold that wall time

Until its anchor the market clock stands still at `start`; `meterchain site
up` writes the anchor file once every service of the site is running and the
genesis block is on the ledger, so all of them begin the day together. After
it, market time runs at `speed`. Everything about the market (hours, bids,
block intervals, settlement grace) is in market seconds; everything about the
network (the consensus bound delta, vote timeouts, keepalives) stays in real
seconds, so a lab day exercises the same code and timers as a real one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterchain.config_files import TableChecker

_RECHECK_S = 0.05  # how often a clock waiting for its anchor file looks again
_IDLE_S = 0.2  # what `wall_until` answers while the clock stands still


@dataclass(frozen=True)
class ClockSection:
    """The `[clock]` table as written in a configuration."""

    start: int = 0  # market Unix time at the anchor; 0: the clock is the wall clock
    speed: float = 1.0
    anchor: float = 0.0  # wall Unix time; 0: not anchored (yet)
    anchor_file: Path | None = None


class MarketClock:
    """Market time from a `ClockSection` (thread-safe; the anchor file is read once found)."""

    def __init__(
        self, start: int = 0, speed: float = 1.0, anchor: float = 0.0,
        anchor_file: Path | None = None,
    ) -> None:  # fmt: skip
        self.start = start
        self.speed = speed
        self.anchor = anchor
        self.anchor_file = anchor_file
        self._found: float | None = None
        self._looked = 0.0
        self._lock = threading.Lock()

    def section(self) -> ClockSection:
        return ClockSection(self.start, self.speed, self.anchor, self.anchor_file)

    @property
    def real_time(self) -> bool:
        return self.start == 0

    def anchored_at(self) -> float | None:
        """The wall time the market clock started at, or None while it stands still."""
        if self.anchor:
            return self.anchor
        if self._found is not None or self.anchor_file is None:
            return self._found
        with self._lock:
            now = time.monotonic()
            if self._found is None and now - self._looked >= _RECHECK_S:
                self._looked = now
                try:
                    self._found = float(self.anchor_file.read_text().strip())
                except (OSError, ValueError):
                    pass
            return self._found

    def now(self) -> float:
        """Market time, Unix seconds."""
        wall = time.time()
        if self.real_time:
            return wall
        anchor = self.anchored_at()
        if anchor is None:
            return float(self.start)
        return self.start + max(0.0, wall - anchor) * self.speed

    def wall_seconds(self, market_seconds: float) -> float:
        """How long `market_seconds` of market time take on the wall clock."""
        return market_seconds / self.speed

    def wall_until(self, market_time: float) -> float:
        """Real seconds from now until the market clock reads `market_time` (0 if past);
        a short wait while the clock has not started (ask again then)."""
        ahead = market_time - self.now()
        if ahead <= 0:
            return 0.0
        if self.real_time:
            return ahead
        anchor = self.anchored_at()
        if anchor is None:
            return _IDLE_S
        if time.time() < anchor:
            return (anchor - time.time()) + self.wall_seconds(market_time - self.start)
        return self.wall_seconds(ahead)


REAL_TIME = MarketClock()


def start_clock(path: Path, at: float) -> float:
    """Write the anchor file (wall time `at`), unless the clock already started; returns it."""
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{at:.3f}\n")
    tmp.replace(path)
    return at


def check_clock(check: TableChecker, raw: Any) -> MarketClock:
    """The `[clock]` table of a service configuration (ConfigError naming the bad key)."""
    clock: ClockSection = check.table(raw, ClockSection, "clock")
    if clock.start < 0:
        check.fail("clock.start", f"must be 0 (real time) or a Unix time, got {clock.start}")
    if not 0 < clock.speed <= 100_000 or clock.speed != clock.speed:
        check.fail("clock.speed", f"must be in (0, 100000], got {clock.speed}")
    if clock.start == 0 and (clock.speed != 1.0 or clock.anchor or clock.anchor_file):
        check.fail("clock.start", "is required (a Unix time) when speed or an anchor is set")
    if clock.anchor < 0 or clock.anchor != clock.anchor:
        check.fail("clock.anchor", f"must be a Unix time, got {clock.anchor}")
    if clock.start and not clock.anchor and clock.anchor_file is None:
        check.fail("clock.anchor", "missing: an accelerated clock needs anchor or anchor_file")
    return MarketClock(clock.start, clock.speed, clock.anchor, clock.anchor_file)
