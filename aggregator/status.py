"""The aggregator's live status (`/status`) and health (`/healthz`), read from the running service.

Market clock, broker link, ledger height and head hash (read on a connection
of its own, so the HTTP thread never touches the service loop's store),
readings and transactions waiting for a block, the proposal in flight and
its votes, how many proposals in a row failed, and when each consensus
member last answered. The API is served once the ledger verified at
start-up. Live: the service loop turned within `STUCK_S`. Ready: live and
connected to the broker.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aggregator.config import ledger_target
from meterchain.service import Health
from meterchain.status import ledger_head, market_clock
from meterchain.times import iso_utc

if TYPE_CHECKING:
    from aggregator.service import Aggregator

STUCK_S = 30.0  # a loop turn takes well under a second; this long means it is stuck


class AggregatorStatus:
    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.started = time.time()
        self.loop_turned = time.monotonic()
        self.peers_seen: dict[str, float] = {}  # member -> wall time of its last block answer

    def health(self) -> Health:
        agg = self.aggregator
        reasons = []
        stuck = time.monotonic() - self.loop_turned
        live = stuck < STUCK_S
        if not live:
            reasons.append(f"the service loop has not turned for {stuck:.0f} s")
        if not agg.connected.is_set():
            reasons.append(f"not connected to the broker {agg.cfg.broker.url}")
        return Health(live=live, ready=live and not reasons, reasons=tuple(reasons))

    def document(self) -> dict[str, Any]:
        agg, cfg = self.aggregator, self.aggregator.cfg
        members = agg.former.state.membership if agg.former and agg.former.state else None
        members = members or cfg.membership
        current = agg.round
        return {
            "service": "aggregator",
            "node_id": agg.node_id,
            "role": "aggregator",
            "market": agg.market,
            "started": iso_utc(self.started),
            "uptime_s": round(time.time() - self.started, 1),
            "market_clock": market_clock(cfg.clock),
            "broker": {"url": cfg.broker.url, "connected": agg.connected.is_set()},
            "ledger": ledger_head(ledger_target(cfg)),
            "proposal": None if current is None else {
                "height": current.proposal.block.height,
                "txs": len(current.proposal.block.txs),
                "votes": sorted(current.votes),
                "refusals": dict(sorted(current.refusals.items())),
                "quorum": current.membership.quorum,
            },
            "proposals_failed_in_a_row": agg.proposal_log.failures("proposals"),
            "members": [
                {"id": m.node_id, "last_answer": iso_utc(self.peers_seen.get(m.node_id))}
                for m in members.members
            ],
        }  # fmt: skip
