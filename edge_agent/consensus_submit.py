"""Clearing as a submit-only participant: sign and publish the bid, then verify the round's result.

A microgrid outside the consensus set (role "submitter") takes part in the
hourly clearing without voting. `submit_lead_s` (the nodes' `bid_lead_s`
plus 2 delta, so that the bid is held by the nodes before they open the
round and reaches the primary before its proposal) before the hour it signs its
`TradeRequest` as an SDBFT request with its node key and publishes it on
`mc/<market>/c/<node_id>/req` (QoS 1; the node ACL lets it write only under
its own id). The consensus nodes include it if their participants file lists
this node id with this key and it reaches the primary before the proposal.

The participant then listens to the round's `final` messages. Each must be
signed by a member of the regulator-signed membership; once more than n/2
members attest one value digest, their signatures form the finality
certificate (`meterchain.quorum.QuorumCertificate`), which is verified
against the membership like every node does. The value itself comes with the
primary's `final` (or a catch-up answer) and must hash to that digest. The
participant executes its own line of the certified result, or -- when its
request is not among the committed ones -- raises `NoClearing` ("left out"),
which the round driver logs and records as an idle hour.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from edge_agent.config import AgentConfig
from edge_agent.consensus.messages import (
    Decoder,
    Envelope,
    MessageError,
    RoundId,
    Value,
    final_statement,
    parse_qc,
    seal,
    statement,
)
from edge_agent.consensus.signing import Keyring
from edge_agent.consensus.transport import MqttLink, MqttSettings
from edge_agent.consensus_clearing import NoClearing, clearing_round, committed_result
from meterchain import codec
from meterchain.errors import CodecError, ConfigError
from meterchain.keys import PrivateKey
from meterchain.market.clearing import ClearingResult
from meterchain.market.model import TradeRequest
from meterchain.mqtt_auth import consensus_topic
from meterchain.quorum import Membership, QuorumCertificate, QuorumError

log = logging.getLogger("meterchain.agent.consensus")


def request_message(
    market: str,
    rid: RoundId,
    submitter: str,
    key: PrivateKey,
    trade: TradeRequest,
    *,
    deposit: bytes | None = None,
) -> bytes:
    """A participant's signed SDBFT request carrying its SC1 trade request."""
    ref = deposit if deposit is not None else b"deposit:" + submitter.encode()
    stmt = statement("req", market, rid, 0, ref, submitter, trade.to_dict())
    return seal(submitter, key.sign(stmt), stmt)


@dataclass
class RoundWait:
    """What one round's `final` messages have shown so far."""

    future: asyncio.Future[Value]
    loop: asyncio.AbstractEventLoop
    finals: dict[bytes, dict[str, bytes]] = field(default_factory=dict)
    values: dict[bytes, Value] = field(default_factory=dict)
    certified: dict[bytes, QuorumCertificate] = field(default_factory=dict)


class FinalCollector:
    """Checks `final` messages of awaited rounds and yields a value once its FC verifies."""

    def __init__(self, membership: Membership) -> None:
        self.keyring = Keyring(membership)
        self.market = membership.market
        self.decoder = Decoder()
        self.rejected: list[str] = []  # why messages were refused, for logs and tests

    def feed(self, pending: dict[RoundId, RoundWait], data: bytes, sender: str) -> None:
        """One message from the market's consensus topics (any thread)."""
        try:
            env = self.decoder.envelope(data)
        except MessageError:
            return
        if env.tag != "final" or env.round not in pending:
            return
        wait = pending[env.round]
        try:
            self._take(wait, env.round, env, sender)
        except (MessageError, QuorumError, CodecError) as exc:
            self.rejected.append(f"{sender}: {exc}")
            log.warning("round %s: refused a final from %s: %s", env.round, sender, exc)
            return
        for vd in wait.certified:
            value = wait.values.get(vd)
            if value is not None:
                wait.loop.call_soon_threadsafe(
                    lambda v=value: wait.future.done() or wait.future.set_result(v)
                )
                return

    def _take(self, wait: RoundWait, rid: RoundId, env: Envelope, sender: str) -> None:
        if env.sender != sender or env.market != self.market:
            raise MessageError(f"sent as {env.sender!r} for market {env.market!r}")
        if env.view != 0 or env.extra or not isinstance(env.ref, bytes):
            raise MessageError("final must be [final, market, round, 0, digest]")
        if not self.keyring.is_member(sender):
            raise MessageError(f"{sender!r} is not a member")
        if not self.keyring.verify(sender, env.statement, env.signature):
            raise MessageError("signature does not verify")
        vd = env.ref
        expect = codec.decode(final_statement(self.market, rid, vd))
        if env.attachment is not None:
            try:
                value_cbor, _qc, fc_cbor = env.attachment
            except (TypeError, ValueError) as exc:
                raise MessageError("final attachment must be [value, qc, fc]") from exc
            if value_cbor is not None:  # the primary's, when participants are registered
                value = self.decoder.value(self.market, rid, value_cbor)
                if value.digest != vd:
                    raise MessageError("final's value does not hash to its digest")
                wait.values.setdefault(vd, value)
            if fc_cbor is not None:  # a catch-up answer carries the whole certificate
                fc = parse_qc(fc_cbor)
                fc.verify(self.keyring.membership, expect=expect)
                wait.certified.setdefault(vd, fc)
        sigs = wait.finals.setdefault(vd, {})
        sigs.setdefault(sender, env.signature)
        if vd not in wait.certified and len(sigs) >= self.keyring.membership.quorum:
            fc = QuorumCertificate.collect(final_statement(self.market, rid, vd), sigs.items())
            fc.verify(self.keyring.membership, expect=expect)
            wait.certified[vd] = fc


class SubmitClearing:
    """`Clearing` for a submit-only participant: publish the signed bid, await a certified value."""

    def __init__(
        self,
        link_settings: MqttSettings,
        node_id: str,
        key: PrivateKey,
        membership: Membership,
        *,
        timeout_s: float,
        on_final: Callable[[RoundId, Value], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.key = key
        self.market = membership.market
        self.timeout_s = timeout_s
        self.collector = FinalCollector(membership)
        self.on_final = on_final or (lambda rid, value: None)
        self._pending: dict[RoundId, RoundWait] = {}
        self.link = MqttLink(link_settings, [f"mc/{self.market}/c/#"], self._received)

    def start(self, wait_connected_s: float = 10.0) -> SubmitClearing:
        self.link.start()
        if not self.link.connected.wait(wait_connected_s):
            raise TimeoutError(f"{self.node_id}: no broker connection in {wait_connected_s} s")
        return self

    def stop(self) -> None:
        self.link.close()

    def _received(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 5 or parts[4] != "final" or parts[3] == self.node_id:
            return
        self.collector.feed(dict(self._pending), bytes(payload), parts[3])

    async def clear(self, request: TradeRequest, first_hour: int) -> ClearingResult:
        rid = clearing_round(first_hour)
        loop = asyncio.get_running_loop()
        wait = RoundWait(loop.create_future(), loop)
        self._pending[rid] = wait
        raw = request_message(
            self.market,
            rid,
            self.node_id,
            self.key,
            request,
            deposit=f"deposit:{self.node_id}:{rid.seq}".encode(),
        )
        try:
            self.link.publish(consensus_topic(self.market, self.node_id, "req"), raw)
            try:
                value = await asyncio.wait_for(wait.future, self.timeout_s)
            except TimeoutError:
                raise NoClearing(
                    f"round {rid}: no certified result within {self.timeout_s:.0f} s"
                ) from None
        finally:
            self._pending.pop(rid, None)
        self.on_final(rid, value)
        if self.node_id not in {r.submitter for r in value.requests}:
            raise NoClearing(f"round {rid}: left out, our request is not in the committed set")
        log.info("round %s: certified result received (%d requests)", rid, len(value.requests))
        return committed_result(rid, value, self.node_id)


def start_submitter(config: AgentConfig) -> SubmitClearing:
    """Build and start a submit-only participant's clearing (ConfigError for a bad membership)."""
    cfg = config
    assert cfg.consensus.membership is not None and cfg.node_key is not None
    membership = Membership.load(cfg.consensus.membership)
    if membership.market != cfg.agent.market:
        raise ConfigError(
            str(cfg.path),
            "consensus.membership",
            f"is for market {membership.market!r}, not {cfg.agent.market!r}",
        )
    clearing = SubmitClearing(
        MqttSettings(
            *_broker(cfg),
            cfg.broker.consensus_username,
            cfg.broker_password,
            str(cfg.broker.ca_file) if cfg.broker.ca_file else None,
            client_id=f"sdbft-{cfg.agent.node_id}",
        ),
        cfg.agent.node_id,
        cfg.node_key,
        membership,
        # The result must be in before the hour it executes starts (real seconds).
        timeout_s=cfg.clock.wall_seconds(submit_lead_s(cfg)),
    )
    try:
        clearing.start()
    except TimeoutError:
        # The link keeps reconnecting on its own; metering must not wait for the broker.
        log.warning("participant %s: broker not reachable yet, still trying", cfg.agent.node_id)
    return clearing


def submit_lead_s(cfg: AgentConfig) -> float:
    """How long before the hour (market seconds) a participant bids: 2 delta (real time,
    so scaled by the market clock's speed) ahead of the consensus nodes.

    The primary proposes as soon as it holds every member's request, so a
    participant's request sent at the same moment as the members' could miss
    the proposal; the nodes hold requests of rounds they have not opened yet.
    """
    return cfg.consensus.bid_lead_s + 2 * cfg.consensus.delta_s * cfg.clock.speed


def _broker(cfg: AgentConfig) -> tuple[str, int]:
    url = urlsplit(cfg.broker.url)
    return url.hostname or "localhost", url.port or (8883 if url.scheme == "mqtts" else 1883)
