"""Bridge from the ledger to the market contracts: committed clearings and re-executed settlement.

A clearing transaction records what the consensus agents agreed in a clearing
round and the evidence for it: the signed request messages, the agreed value,
the quorum certificate of more than n/2 members over ["vote" | "final", market,
[round, kind], view, value digest] (the SDBFT statement of
`edge_agent.consensus.messages`), and the SC1 request and result in their
canonical forms (`meterchain.market.clearing`). `check_clearing` ties them
together. A settlement transaction records, for the executed hour, the metered
values the ledger's own readings give and the SC2 settlement
(`meterchain.market.settlement.settle`); `execute` re-runs it, so every node
re-executes exactly the same thing.

Metered values per microgrid (Wh in the delivery hour, from the cumulative
registers of its registered meters): green generation = export of pv, wind,
hydro and biomass meters; load = import of load meters; grid import/export =
import/export of bidir meters (the point of common coupling); green demand =
the cleared model's green demand for that hour, capped at the metered load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from meterchain import codec, reading
from meterchain.errors import CodecError, MeterChainError
from meterchain.ledger.transactions import TxError
from meterchain.quorum import Membership, QuorumCertificate, QuorumError

if TYPE_CHECKING:
    from meterchain.ledger.state import LedgerState
    from meterchain.market.clearing import ClearingRequest, ClearingResult
    from meterchain.market.settlement import MeteredHour

CERTIFYING_TAGS = ("vote", "final")


def value_digest(market: str, round_id: list[Any], requests: Sequence[bytes], value: Any) -> bytes:
    """Digest of a consensus round's value: the same formula as SDBFT's `value_digest`."""
    return codec.digest(["value", market, round_id, list(requests), value])


def decode_clearing(request: bytes, result: bytes) -> tuple[ClearingRequest, ClearingResult]:
    """The SC1 request and result from their canonical bytes, checked to belong together."""
    from meterchain.market.clearing import ClearingRequest, ClearingResult

    try:
        req = ClearingRequest.from_cbor(request)
        res = ClearingResult.from_cbor(result)
    except MeterChainError as exc:
        raise TxError(f"clearing: {exc}") from exc
    if req.to_cbor() != request or res.to_cbor() != result:
        raise TxError("clearing request or result is not in its canonical form")
    if res.request_digest != req.digest:
        raise TxError("clearing result was computed for another request")
    if not res.executed:
        raise TxError("clearing result has no executed hour")
    return req, res


def committed_clearing(state: LedgerState, hour: int) -> tuple[ClearingRequest, ClearingResult]:
    """The committed clearing of `hour` as settlement sees it: with the weak centre's
    recorded congestion cut (M25, `meterchain.ledger.weakcentre`) applied."""
    clearing = state.clearings[hour]
    request, result = decode_clearing(clearing.request, clearing.result)
    record = state.congestion.get(hour)
    if record is not None:
        from meterchain.market.congestion import Adjustment, adjusted_result

        result = adjusted_result(result, Adjustment.from_cbor(record))
    return request, result


def _binds(value: Any, result: bytes) -> bool:
    """True when the agreed value is, or names, exactly this clearing result."""
    result_value = codec.decode(result)
    if value == result_value:
        return True
    if isinstance(value, dict):
        if value.get("result") == result_value or value.get("result") == result:
            return True
        if value.get("result_digest") == hashlib.sha256(result).digest():
            return True
    return False


def check_clearing(market: str, membership: Membership, body: Mapping[str, Any]) -> None:
    """Raise TxError unless the clearing transaction's certificate commits exactly its result."""
    try:
        qc = QuorumCertificate.from_cbor(body["qc"])
        fields = qc.fields()
        qc.verify(membership)
    except (QuorumError, CodecError) as exc:
        raise TxError(f"clearing QC: {exc}") from exc
    round_id = [body["round"], body["round_kind"]]
    if len(fields) != 5 or fields[0] not in CERTIFYING_TAGS:
        raise TxError(f"clearing QC is a {fields[0]!r} certificate, not a vote or final one")
    if fields[2] != round_id:
        raise TxError(f"clearing QC is for round {fields[2]!r}, not {round_id!r}")
    if fields[0] == "vote" and fields[3] != body["view"]:
        raise TxError(f"clearing QC is for view {fields[3]}, not {body['view']}")
    try:
        value = codec.decode(body["value"])
    except CodecError as exc:
        raise TxError(f"clearing value is not canonical CBOR: {exc}") from exc
    if fields[4] != value_digest(market, round_id, body["requests"], value):
        raise TxError("clearing QC does not certify this value and request set")
    decode_clearing(body["request"], body["result"])
    if not _binds(value, body["result"]):
        raise TxError("the certified value is not this clearing result")


def metered_for(
    state: LedgerState, hour: int, request: ClearingRequest, result: ClearingResult
) -> list[MeteredHour]:
    """Each requesting microgrid's metered hour, from the ledger's readings (see module doc)."""
    from meterchain.market.errors import SettlementError
    from meterchain.market.settlement import MeteredHour

    executed = result.executed[0]
    t = executed.period - request.first_period
    totals = {mg: [0, 0, 0, 0] for mg in request.ids}  # green, load, grid in, grid out
    for meter in sorted(state.meters.values(), key=lambda m: m.id):
        if meter.owner not in totals or meter.id not in state.snapshots:
            continue
        imp, exp = state.meter_energy(meter.id, hour)
        row = totals[meter.owner]
        if meter.source in reading.RENEWABLE_SOURCES:
            row[0] += exp
        elif meter.source == "load":
            row[1] += imp
        elif meter.source == "bidir":
            row[2] += imp
            row[3] += exp
    out = []
    for mg in request.microgrids:
        green, load, grid_in, grid_out = totals[mg.id]
        try:
            out.append(
                MeteredHour(mg.id, green, min(load, mg.green_demand_w[t]), load, grid_in, grid_out)
            )
        except SettlementError as exc:
            raise TxError(f"metered values of {mg.id}: {exc}") from exc
    return out


def encode_metered(metered: Sequence[MeteredHour]) -> bytes:
    return codec.encode([m.to_list() for m in metered])


def execute(
    request: ClearingRequest, result: ClearingResult, metered: Sequence[MeteredHour]
) -> bytes:
    """Canonical CBOR of the SC2 settlement of the executed hour (money in minor units)."""
    from meterchain.market.settlement import settle

    try:
        settlement = settle(request, result, metered)
    except MeterChainError as exc:
        raise TxError(f"settlement contract refused: {exc}") from exc
    return codec.encode(settlement.to_dict())


def settlement_tx(state: LedgerState, hour: int) -> Any:
    """The settlement transaction of `hour` as the ledger's state and readings give it."""
    from meterchain.ledger.transactions import Tx

    clearing = state.clearings.get(hour)
    if clearing is None:
        raise TxError(f"hour {hour} has no committed clearing to settle")
    request, result = committed_clearing(state, hour)
    metered = metered_for(state, hour, request, result)
    return Tx.make(
        "settlement",
        {
            "hour": hour,
            "clearing": clearing.tx,
            "metered": encode_metered(metered),
            "result": execute(request, result, metered),
        },
    )
