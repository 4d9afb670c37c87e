"""Clearing through SDBFT: the agent as a consensus node submits its bid and awaits the commit.

Wires the consensus package (`edge_agent.consensus`: the pure `Node` state
machine, its `NodeRunner` MQTT transport and fsynced `RoundLog`) into the
round driver. Each hourly clearing is one consensus round whose identity is
(Unix hour of the executed period, "clear-HH"): every member derives it
from the hour alone, so nodes agree on it without talking, and the kind
carries the hour of day the SC1 contract needs (`ClearingContract` is
built once per hour of day). The request body is the agent's
`TradeRequest`; the round commits the exact request set and the contract
result, and the agent executes its own line of that result. Requests of the
submit-only participants listed in `consensus.participants` are accepted too
(their side: `edge_agent.consensus_submit`).

Once a round is final (more than n/2 members attested it: the finality
certificate), the node sends the aggregator the committed clearing as a
ledger transaction (`clearing_tx`) on `mc/<market>/c/<node_id>/tx`; every
member does, so one crashed member loses nothing, and the aggregator keeps
the first and counts the others as duplicates.

The consensus runs on its own MQTT connection (client id `sdbft-<node>`)
beside the ingest session, under the same broker credentials: the node ACL
lets it publish only under `mc/<market>/c/<node_id>/`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from edge_agent.config import AgentConfig, load_participants
from edge_agent.consensus.contracts import ClearingContract
from edge_agent.consensus.messages import Decoder, RoundId, Value
from edge_agent.consensus.node import Commit, Final, Node
from edge_agent.consensus.signing import Keyring, P256Signer
from edge_agent.consensus.transport import MqttSettings, NodeRunner, open_store
from edge_agent.energy import HOUR_S
from meterchain import codec
from meterchain.errors import ConfigError
from meterchain.ledger.transactions import Tx
from meterchain.market.clearing import ClearingResult
from meterchain.market.errors import MarketError
from meterchain.market.model import Market, TradeRequest
from meterchain.mqtt_auth import consensus_topic
from meterchain.quorum import Membership

log = logging.getLogger("meterchain.agent.consensus")


def clearing_round(first_hour: int) -> RoundId:
    """The consensus round that clears the window starting at `first_hour` (Unix s)."""
    return RoundId(first_hour // HOUR_S, f"clear-{(first_hour // HOUR_S) % 24:02d}")


def clearing_contracts(market: Market) -> dict[str, ClearingContract]:
    """One SC1 contract per hour of day, keyed by the round kind `clearing_round` gives."""
    return {f"clear-{h:02d}": ClearingContract(market, h) for h in range(24)}


def clearing_tx(final: Final, contracts: dict[str, ClearingContract]) -> Tx | None:
    """The ledger transaction of a final clearing round (None: it cleared nothing).

    It carries the exact signed request set, the contract value, the SC1
    request and result in canonical form and the finality certificate (view
    -1), which the ledger checks against the membership (`settle.check_clearing`).
    """
    value = final.value
    outcome = value.result
    contract = contracts.get(final.round.kind)
    if contract is None or not isinstance(outcome, dict) or outcome.get("result") is None:
        return None
    request, _ = contract.clearing_request(value.requests)
    if request is None:
        return None
    result = ClearingResult.from_dict(outcome["result"])
    return Tx.make(
        "clearing",
        {
            "round": final.round.seq,
            "round_kind": final.round.kind,
            "view": -1,
            "hour": final.round.seq,
            "requests": [r.raw for r in value.requests],
            "value": codec.encode(outcome),
            "request": request.to_cbor(),
            "result": result.to_cbor(),
            "qc": final.certificate.to_cbor(),
        },
    )


class NoClearing(MarketError):
    """The round committed, but without a result for this microgrid (refused or empty)."""


class ConsensusClearing:
    """`Clearing` for a consensus node: open the hour's round, submit, await the commit."""

    def __init__(
        self,
        runner: NodeRunner,
        node_id: str,
        *,
        timeout_s: float,
        on_primary_change: Callable[[], None] | None = None,
        contracts: dict[str, ClearingContract] | None = None,
    ) -> None:
        """`contracts`: send each final clearing to the aggregator (None: do not)."""
        self.runner = runner
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.on_primary_change = on_primary_change or (lambda: None)
        self._waiting: dict[RoundId, asyncio.Future[Commit]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.contracts = contracts or {}
        runner.on_commit = self._committed
        runner.on_publish = self._published
        runner.on_final = self._final

    def _committed(self, commit: Commit) -> None:
        """From the consensus driver thread: hand the commit to the waiting round."""
        future = self._waiting.get(commit.round)
        if future is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: future.done() or future.set_result(commit))

    def _final(self, final: Final) -> None:
        """From the consensus driver thread: send the certified clearing to the aggregator."""
        if not self.contracts:
            return  # no aggregator configured (consensus.aggregator = "")
        try:
            tx = clearing_tx(final, self.contracts)
        except MarketError as exc:
            log.error("round %s is final but not a clearing the ledger takes: %s", final.round, exc)
            return
        if tx is None:
            log.warning("round %s is final without a clearing result", final.round)
            return
        self.runner.link.publish(consensus_topic(self.runner.market, self.node_id, "tx"), tx.raw)
        log.info("round %s final: clearing sent to the aggregator", final.round)

    def _published(self, kind: str, data: bytes) -> None:
        if kind == "status":  # sent when this node enters a new view: the primary changed
            self.on_primary_change()

    async def clear(self, request: TradeRequest, first_hour: int) -> ClearingResult:
        rid = clearing_round(first_hour)
        self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Commit] = self._loop.create_future()
        self._waiting[rid] = future
        try:
            self.runner.open_round(
                rid,
                deposit=f"deposit:{self.node_id}:{rid.seq}".encode(),
                body=request.to_dict(),
            )
            try:
                commit = await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                raise NoClearing(f"round {rid}: no commit within {self.timeout_s:.0f} s") from None
        finally:
            self._waiting.pop(rid, None)
        log.info("round %s committed in view %d", rid, commit.view)
        return committed_result(rid, commit.value, self.node_id)


def committed_result(rid: RoundId, value: Value, node_id: str) -> ClearingResult:
    """The clearing result a committed round's value holds for `node_id` (else NoClearing)."""
    outcome = value.result
    if not isinstance(outcome, dict) or outcome.get("result") is None:
        raise NoClearing(f"round {rid} committed no clearing result: {outcome!r}")
    if node_id in outcome.get("rejected", []):
        raise NoClearing(f"round {rid}: our request was refused by the contract")
    result = ClearingResult.from_dict(outcome["result"])
    if node_id not in result.microgrids:
        raise NoClearing(f"round {rid}: left out, our request is not in the committed set")
    return result


def start_consensus(
    config: AgentConfig, market: Market, *, on_primary_change: Callable[[], None]
) -> ConsensusClearing:
    """Build and start this agent's consensus node (raises ConfigError for a bad membership)."""
    cfg = config
    assert cfg.consensus.membership is not None and cfg.node_key is not None
    membership = Membership.load(cfg.consensus.membership)
    where = str(cfg.path)
    if membership.market != cfg.agent.market:
        raise ConfigError(
            where,
            "consensus.membership",
            f"is for market {membership.market!r}, not {cfg.agent.market!r}",
        )
    own = membership.key_of(cfg.agent.node_id)
    if own is None:
        raise ConfigError(
            where, "consensus.membership", f"does not list node {cfg.agent.node_id!r}"
        )
    if own.point != cfg.node_key.public_key().point:
        raise ConfigError(
            where,
            "agent.key_file",
            f"is not the key the membership lists for {cfg.agent.node_id!r}",
        )
    # Submit-only participants: their signed requests count, they never vote.
    participants = (
        load_participants(cfg.consensus.participants) if cfg.consensus.participants else {}
    )
    for node_id in participants:
        if membership.key_of(node_id) is not None:
            raise ConfigError(
                where, "consensus.participants", f"{node_id!r} is a member, not a participant"
            )
    store, records = open_store(Path(cfg.agent.state_dir) / "consensus")
    contracts = clearing_contracts(market)
    node = Node(
        P256Signer(cfg.agent.node_id, cfg.node_key),
        Keyring(membership, participants),
        contracts,
        delta_ms=max(2, int(cfg.consensus.delta_s * 1000)),
        decoder=Decoder(),
        records=records,
    )
    url = urlsplit(cfg.broker.url)
    settings = MqttSettings(
        url.hostname or "localhost",
        url.port or (8883 if url.scheme == "mqtts" else 1883),
        cfg.broker.consensus_username,
        cfg.broker_password,
        str(cfg.broker.ca_file) if cfg.broker.ca_file else None,
        client_id=f"sdbft-{cfg.agent.node_id}",
    )
    runner = NodeRunner(node, store, settings)
    clearing = ConsensusClearing(
        runner,
        cfg.agent.node_id,
        # The result must be in before the hour it executes starts (real seconds).
        timeout_s=cfg.clock.wall_seconds(cfg.consensus.bid_lead_s),
        on_primary_change=on_primary_change,
        contracts=contracts if cfg.consensus.aggregator else None,
    )
    try:
        runner.start()
    except TimeoutError:
        # The link keeps reconnecting on its own; metering must not wait for the broker.
        log.warning("consensus node %s: broker not reachable yet, still trying", cfg.agent.node_id)
    return clearing
