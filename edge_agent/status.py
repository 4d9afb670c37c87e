"""The edge agent's live status (`/status`) and health (`/healthz`), read from its running parts.

`AgentStatus` keeps the little the parts do not already hold (the last
round's outcome, boards' online states) and reads the rest when asked: the
market clock, the broker link, the executed hour's setpoints, the node's
ledger copy (height and head hash), consensus peers seen, every meter's last
reading and age, Modbus buses. Boards' states are also the metric
`meterchain_agent_board_online{meter}`. Times are ISO-8601 UTC; ages are seconds of
market time. Live: the ingest writer is running. Ready: live, connected to
the broker and, for a consensus node or a submitter, to the consensus link.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge

from edge_agent.energy import HOUR_S, hour_start
from edge_agent.rounds import RoundOutcome
from meterchain import codec
from meterchain.errors import MeterChainError
from meterchain.market.model import Dispatch
from meterchain.service import Health
from meterchain.status import ledger_head, market_clock
from meterchain.times import iso_utc

if TYPE_CHECKING:
    from edge_agent.agent import Agent

MAX_METERS = 200  # meters listed in /status, stalest first; the count says how many there are


class AgentStatus:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.started = time.time()
        self.last_round: RoundOutcome | None = None
        self.boards: dict[str, tuple[str, float]] = {}  # meter -> (online|offline, seen at)
        # As a metric too (alerts): bounded like the agent's other per-meter series.
        self._board_online = Gauge(
            "meterchain_agent_board_online",
            "1 while a board's retained state (its MQTT last will) says online, 0 offline",
            ["meter"],
            registry=agent.metrics.registry,
        )

    def round_done(self, outcome: RoundOutcome) -> None:
        self.last_round = outcome

    def board_state(self, meter_id: str, payload: bytes) -> None:
        """A board's retained online state: CBOR {1: meter id, 2: "online" | "offline"}."""
        try:
            doc = codec.decode(payload)
        except MeterChainError:
            return
        if isinstance(doc, dict) and doc.get(1) == meter_id and doc.get(2) in ("online", "offline"):
            if meter_id in self.boards or len(self.boards) < self.agent.metrics.max_meter_series:
                self._board_online.labels(meter_id).set(doc[2] == "online")
            self.boards[meter_id] = (doc[2], time.time())

    def health(self) -> Health:
        a = self.agent
        reasons = []
        live = not a.ingest_failed()
        if not live:
            reasons.append("the ingest writer stopped (storage failure)")
        if a.pool is not None and not a.pool.up:
            reasons.append("an ingest worker is not connected and subscribed")
        if not a.link.connected:
            reasons.append(f"not connected to the broker {a.config.broker.url}")
        if a.consensus is not None and not a.consensus.runner.link.connected.is_set():
            reasons.append("the consensus link is not connected")
        if a.submitter is not None and not a.submitter.link.connected.is_set():
            reasons.append("the link to the consensus nodes is not connected")
        return Health(live=live, ready=live and not reasons, reasons=tuple(reasons))

    def document(self) -> dict[str, Any]:
        a, cfg = self.agent, self.agent.config
        now = a.clock()
        doc: dict[str, Any] = {
            "service": "agent",
            "node_id": cfg.agent.node_id,
            "role": cfg.consensus.role,
            "market": cfg.agent.market,
            "microgrid": cfg.owner,
            "started": iso_utc(self.started),
            "uptime_s": round(time.time() - self.started, 1),
            "market_clock": market_clock(cfg.clock),
            "broker": {"url": cfg.broker.url, "connected": a.link.connected,
                       "outbox_pending": a.view.outbox_pending()},  # fmt: skip
            "last_round": self._last_round(),
            "setpoints": self._setpoints(int(now)),
        }
        if a.rounds is not None:
            hour = hour_start(int(now)) + HOUR_S
            bid_at = hour - a.rounds.bid_lead_s
            doc["next_round"] = {"hour": iso_utc(hour), "bid_at": iso_utc(bid_at)}
        if a.consensus is not None:
            runner = a.consensus.runner
            doc["consensus"] = {
                "connected": runner.link.connected.is_set(),
                "messages_received": runner.counts["deliveries"],
                "peers_seen": {p: iso_utc(t) for p, t in sorted(runner.peers_seen.items())},
            }
        if a.submitter is not None:
            doc["consensus"] = {"connected": a.submitter.link.connected.is_set()}
        if a.pool is not None:
            doc["ingest_workers"] = {"up": a.pool.up, "restarts": a.pool.restarts,
                                     "pids": a.pool.pids()}  # fmt: skip
        if a.reviewer is not None:
            doc["ledger"] = ledger_head(str(cfg.ledger))
        doc["meters"], doc["meters_total"] = self._meters(now)
        doc["modbus"] = {name: bus.state.value for name, bus in sorted(a.buses.items())}
        return doc

    def _last_round(self) -> dict[str, Any] | None:
        r = self.last_round
        if r is None:
            return None
        return {
            "hour": iso_utc(r.hour),
            "result": "cleared" if r.result is not None else "failed",
            "error": r.error or None,
            "latency_s": round(r.latency_s, 3),
            "result_digest": r.result.digest.hex() if r.result is not None else None,
            "trades": len(r.result.executed[0].trades) if r.result is not None else 0,
        }

    def _setpoints(self, now: int) -> dict[str, Any] | None:
        hour = hour_start(now)
        dispatch = self.agent.view.schedule(hour)
        if dispatch is None:
            return None
        values = {name: getattr(dispatch, name) for name in Dispatch.FIELDS}
        return {"hour": iso_utc(hour), **values}

    def _meters(self, now: float) -> tuple[list[dict[str, Any]], int]:
        a = self.agent
        seen = a.metrics.last_reading_times()
        ids = set(seen) | set(self.boards) | {m.id for m in a.registry.owned_by(a.config.owner)}
        ids |= {m.id for m in a.config.modbus_meters}

        def age(meter: str) -> float:
            return now - seen[meter] if meter in seen else float("inf")

        listed = sorted(ids, key=lambda m: (-age(m), m))[:MAX_METERS]
        rows = []
        for meter in listed:
            board = self.boards.get(meter)
            rows.append({
                "id": meter,
                "last_reading": iso_utc(seen.get(meter)),
                "last_reading_age_s": round(age(meter), 1) if meter in seen else None,
                "board": board[0] if board else None,
            })  # fmt: skip
        return rows, len(ids)
