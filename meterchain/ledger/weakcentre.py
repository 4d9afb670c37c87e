"""Bridge from the ledger to the weak centre's contracts: network, congestion (M25), remedies (M21).

The same functions run when the aggregator forms a block (``congestion_tx``,
``remedy_tx``) and when every node applies it (``check_congestion``,
``check_remedy``), so a record is accepted only if a node re-executing the
contract on its own copy of the ledger gets exactly it:

* ``grid_network`` (regulator-signed): the distribution network model the
  congestion check uses from then on (`meterchain.market.network`).
* ``congestion``: for a cleared hour not yet settled, the weak centre's record
  (`meterchain.market.congestion`): flows, the minimal cut or the congestion
  prices, with its published reason. It never edits the clearing; the hour's
  settlement then settles the adjusted trades (``settle.committed_clearing``).
  A node checks it with ``congestion.verify``: it re-runs the flows itself.
* ``remedy``: after an hour's settlement, the failed-execution case derived
  from the ledger (every trade delivered short; the spare green energy of
  the other microgrids, offered at the hour's average trade price; the
  owner-signed ``reserve_offer`` records of storage for the hour; the
  holder-signed ``transmission_right`` records for its trades) and its
  remedies (`meterchain.market.failed_execution`), re-executed by every node.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from meterchain import codec
from meterchain.errors import MeterChainError
from meterchain.ledger import settle
from meterchain.ledger.transactions import Tx, TxError
from meterchain.market import congestion
from meterchain.market import failed_execution as fx
from meterchain.market.network import Network
from meterchain.market.units import price_per_kwh

if TYPE_CHECKING:
    from meterchain.ledger.state import LedgerState


@lru_cache(maxsize=8)
def network_from(raw: bytes) -> Network:
    """The network model of a ``grid_network`` transaction (cached: its PTDF is reused)."""
    try:
        network = Network.from_cbor(raw)
    except MeterChainError as exc:
        raise TxError(f"grid network: {exc}") from exc
    if network.to_cbor() != raw:
        raise TxError("grid network is not in its canonical form")
    return network


def _unsettled_clearing(state: LedgerState, hour: int, clearing_tx: bytes) -> None:
    clearing = state.clearings.get(hour)
    if clearing is None or clearing.tx != clearing_tx:
        raise TxError(f"congestion record of hour {hour} does not refer to its committed clearing")
    if state.txs[clearing.tx].vetoed_by is not None:
        raise TxError(f"the clearing of hour {hour} was vetoed")
    if hour in state.settlements:
        raise TxError(f"hour {hour} is already settled: too late for a congestion record")
    if hour in state.congestion:
        raise TxError(f"hour {hour} already has a congestion record")


def congestion_tx(state: LedgerState, hour: int, method: str) -> Tx | None:
    """The weak centre's congestion record for cleared ``hour``, or None if every limit holds."""
    if state.network is None or hour not in state.clearings:
        return None
    clearing = state.clearings[hour]
    _, result = settle.decode_clearing(clearing.request, clearing.result)
    try:
        record = congestion.decide(network_from(state.network), result, method)
    except MeterChainError as exc:
        raise TxError(f"congestion check of hour {hour}: {exc}") from exc
    if record is None:
        return None
    body = {"hour": hour, "clearing": clearing.tx, "record": record.to_cbor()}
    return Tx.make("congestion", body)


def check_congestion(state: LedgerState, body: dict[str, Any]) -> None:
    """Raise TxError unless the record is the contract's for the ledger's clearing and network."""
    hour = body["hour"]
    _unsettled_clearing(state, hour, body["clearing"])
    if state.network is None:
        raise TxError("no grid network is recorded: congestion cannot be checked")
    clearing = state.clearings[hour]
    _, result = settle.decode_clearing(clearing.request, clearing.result)
    try:
        record = congestion.Adjustment.from_cbor(body["record"])
        if record.to_cbor() != body["record"]:
            raise TxError("congestion record is not in its canonical form")
        if record.period != result.executed[0].period:
            raise TxError(f"congestion record is for period {record.period}, not the executed one")
        congestion.verify(network_from(state.network), result, record)
    except MeterChainError as exc:
        raise TxError(f"congestion of hour {hour}: {exc}") from exc


def remedy_case(state: LedgerState, hour: int, order: tuple[str, ...]) -> fx.RemedyCase | None:
    """The failed-execution case of settled ``hour`` from the ledger; None if nothing fell short."""
    request, result = settle.committed_clearing(state, hour)
    metered = settle.metered_for(state, hour, request, result)
    from meterchain.market.settlement import settle as run_settlement

    try:
        settlement = run_settlement(request, result, metered)
    except MeterChainError as exc:
        raise TxError(f"remedies of hour {hour}: {exc}") from exc
    executed = result.executed[0]
    t = executed.period - request.first_period
    models = {r.microgrid.id: r.microgrid for r in request.requests}
    failed = []
    for trade, delivery in zip(executed.trades, settlement.deliveries, strict=True):
        if not delivery.short_wh:
            continue
        buyer = models[trade.buyer]
        retail = buyer.retail_price_per_kwh[t]
        price = max(0, trade.price_per_kwh)
        penalty = buyer.green_loss.coefficient_per_kwh + max(0, retail - trade.price_per_kwh)
        failed.append(
            fx.FailedTrade(
                trade.seller,
                trade.buyer,
                delivery.cleared_wh,
                delivery.delivered_wh,
                price,
                penalty,
                retail,
            )
        )
    if not failed:
        return None
    sold = {mg: 0 for mg in request.ids}
    for delivery in settlement.deliveries:
        sold[delivery.seller] += delivery.delivered_wh
    energy = sum(tr.energy_wh for tr in executed.trades)
    amount = sum(max(0, tr.amount) for tr in executed.trades)
    market_price = price_per_kwh(amount, energy) if energy else 0
    offers = []
    for m in metered:
        spare = m.green_generation_wh - m.green_demand_wh - sold[m.microgrid]
        if spare > 0:
            offers.append(
                fx.Offer(
                    fx.REASSIGN,
                    m.microgrid,
                    spare,
                    market_price,
                    models[m.microgrid].feed_in_tariff_per_kwh,
                )
            )
    for owner, wh, price in state.reserves.get(hour, ()):
        feed_in = models[owner].feed_in_tariff_per_kwh if owner in models else 0
        offers.append(fx.Offer(fx.STORAGE, owner, wh, price, feed_in))
    rights = tuple(fx.TransmissionRight(*right) for right in state.rights.get(hour, ()))
    return fx.RemedyCase(executed.period, tuple(failed), tuple(offers), rights, order)


def remedy_tx(state: LedgerState, hour: int, order: tuple[str, ...]) -> Tx | None:
    """The remedy transaction of settled ``hour``, or None when no remedy applies."""
    if hour not in state.settlements or hour in state.remedies or not order:
        return None
    case = remedy_case(state, hour, order)
    if case is None:
        return None
    plan = fx.remedy(case)
    if not plan.remedies:
        return None
    body = {
        "hour": hour,
        "settlement": state.settlements[hour],
        "case": case.to_cbor(),
        "result": codec.encode(plan.to_dict()),
    }
    return Tx.make("remedy", body)


def check_remedy(state: LedgerState, body: dict[str, Any]) -> None:
    """Raise TxError unless the case is the ledger's own and the result re-executes exactly."""
    hour = body["hour"]
    if state.settlements.get(hour) != body["settlement"]:
        raise TxError(f"remedy of hour {hour} does not refer to its settlement")
    if hour in state.remedies:
        raise TxError(f"hour {hour} already has its remedies")
    try:
        recorded = fx.RemedyCase.from_cbor(body["case"])
    except MeterChainError as exc:
        raise TxError(f"remedy of hour {hour}: {exc}") from exc
    case = remedy_case(state, hour, recorded.order)
    if case is None or case.to_cbor() != body["case"]:
        raise TxError(f"remedy case of hour {hour} differs from what the ledger's readings give")
    if codec.encode(fx.remedy(case).to_dict()) != body["result"]:
        raise TxError(f"re-executed remedies of hour {hour} differ from the recorded ones")
