"""The round driver: each hour, forecast and bid for the next window, then execute what cleared.

`bid_lead_s` (market seconds) before each UTC hour of the market clock
(`meterchain.site.clock`) the driver forecasts the window from that
hour to the end of the day, builds the trade request (edge_agent.bid) and
hands it to a `Clearing`: the SDBFT consensus among the market's agents, or
`StandaloneClearing`, which clears the microgrid's request alone (no trade
partner: its disagreement-point schedule, what M3 guarantees it can always
fall back to). At the hour it writes the executed hour's setpoints and
records the schedule; the storage energy the schedule ends the hour with is
what the next window starts from. If no result arrives, storage and turbine
are set idle and the grid covers the balance, as the model assumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edge_agent.bid import trade_request, window_periods
from edge_agent.config import MicrogridSection
from edge_agent.energy import HOUR_S, hour_start
from edge_agent.forecast import Forecaster, History
from edge_agent.setpoints import NotApplied, SetpointWriter
from edge_agent.store import StoreView
from meterchain.errors import MeterChainError
from meterchain.market.clearing import ClearingRequest, ClearingResult, clear
from meterchain.market.model import Dispatch, Market, TradeRequest

log = logging.getLogger("meterchain.agent.rounds")


class Clearing(Protocol):
    """Turns this microgrid's trade request into a committed clearing result."""

    async def clear(self, request: TradeRequest, first_hour: int) -> ClearingResult: ...


class StandaloneClearing:
    """Clear the microgrid's request alone with the market contract (no partners, no trades)."""

    def __init__(self, market: Market) -> None:
        self.market = market

    async def clear(self, request: TradeRequest, first_hour: int) -> ClearingResult:
        sc1 = ClearingRequest(self.market, (first_hour // HOUR_S) % 24, (request,))
        # The QP solve takes tens of milliseconds: keep it off the event loop.
        return await asyncio.to_thread(clear, sc1)


@dataclass(frozen=True)
class RoundOutcome:
    """One round: the hour it executes (Unix s), what was bid, and what cleared."""

    hour: int
    request: TradeRequest | None
    result: ClearingResult | None
    dispatch: Dispatch
    latency_s: float
    error: str = ""


class RoundDriver:
    def __init__(
        self,
        *,
        microgrid_id: str,
        section: MicrogridSection,
        forecaster: Forecaster,
        history: Callable[[int], History],
        clearing: Clearing,
        writer: SetpointWriter,
        store: StoreView,
        bid_lead_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        wall_until: Callable[[float], float] | None = None,
        on_round: Callable[[RoundOutcome], None] | None = None,
    ) -> None:
        """`clock` reads market time; `wall_until(t)` says how many real seconds remain
        until the market clock reads t (default: the two clocks run alike)."""
        self.microgrid_id = microgrid_id
        self.section = section
        self.forecaster = forecaster
        self.history = history
        self.clearing = clearing
        self.writer = writer
        self.store = store
        self.bid_lead_s = bid_lead_s
        self.clock = clock
        self.wall_until = wall_until or (lambda t: t - self.clock())
        self.on_round = on_round or (lambda outcome: None)

    def _soc_at(self, hour: int) -> int | None:
        """Storage energy at the start of `hour`: where the previous executed hour left it."""
        previous = self.store.schedule(hour - HOUR_S)
        return previous.soc_wh if previous is not None else None

    async def prepare(self, hour: int) -> RoundOutcome:
        """Forecast, bid and clear the window that starts at `hour`."""
        started = time.monotonic()
        request: TradeRequest | None = None
        try:
            forecast = self.forecaster.forecast(
                self.history(int(self.clock())), hour, window_periods(hour)
            )
            request = trade_request(self.microgrid_id, self.section, forecast, self._soc_at(hour))
            result = await self.clearing.clear(request, hour)
            index = result.index_of(self.microgrid_id)
            dispatch = result.executed[0].dispatch[index]
        except (MeterChainError, ValueError) as exc:
            log.error("round for %s: no clearing result, storage and turbine go idle: %s",
                      _iso(hour), exc)
            outcome = RoundOutcome(hour, request, None, Dispatch(), time.monotonic() - started,
                                   str(exc))
        else:
            outcome = RoundOutcome(hour, request, result, dispatch, time.monotonic() - started)
            log.info("round for %s cleared: gas %d W, charge %d W, discharge %d W, grid %d W",
                     _iso(hour), dispatch.gas_w, dispatch.charge_w, dispatch.discharge_w,
                     dispatch.grid_w)
        self.on_round(outcome)
        return outcome

    async def execute(self, outcome: RoundOutcome) -> list[NotApplied]:
        """Write the hour's setpoints and record the schedule with what could not be applied."""
        missed = await self.writer.apply(outcome.dispatch)
        self.store.record_schedule(
            outcome.hour,
            outcome.dispatch,
            outcome.result.digest if outcome.result is not None else b"",
            json.dumps([m.__dict__ for m in missed]),
        )
        for m in missed:
            log.warning("hour %s: %s = %d W not applied (%s)", _iso(outcome.hour), m.kind,
                        m.value_w, m.reason)
        return missed

    async def run(self) -> None:
        """Forever: bid `bid_lead_s` before each hour, execute at the hour."""
        while True:
            hour = hour_start(int(self.clock())) + HOUR_S
            await self._sleep_until(hour - self.bid_lead_s)
            outcome = await self.prepare(hour)
            await self._sleep_until(hour)
            await self.execute(outcome)

    async def _sleep_until(self, t: float) -> None:
        # Ask the clock again after each sleep: a market clock may stand still until its
        # site starts it, or run at another speed than the wall clock.
        while (delay := self.wall_until(t)) > 0:
            await asyncio.sleep(delay)


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(t))
