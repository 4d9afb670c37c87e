"""A small but complete market history for ledger tests: every transaction kind, a few blocks."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from meterchain.ledger.contracts import due_actions
from meterchain.ledger.readings import HOUR, LedgerReading
from meterchain.ledger.sandbox import Chain, Sandbox
from meterchain.ledger.settle import settlement_tx
from meterchain.ledger.store import LedgerStore
from meterchain.ledger.transactions import Tx
from meterchain.market.clearing import ClearingRequest, clear
from meterchain.market.model import TradeRequest
from meterchain.market.reference import reference_request

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, on an hour boundary
H0 = T0 // HOUR
PV_WH_PER_HOUR = 600_000
METERS = {
    "pv1": ("mg1", "pv"),
    "ld1": ("mg1", "load"),
    "ld2": ("mg2", "load"),
    "bd2": ("mg2", "bidir"),
}


@dataclass
class World:
    chain: Chain
    sandbox: Sandbox
    readings: dict[int, list[LedgerReading]] = field(default_factory=dict)
    order_tx: Tx | None = None
    vetoed_tx: Tx | None = None
    veto_tx: Tx | None = None
    clearing_tx: Tx | None = None

    @property
    def store(self) -> LedgerStore:
        return self.chain.store


def hour_readings(sb: Sandbox, hour: int, seq0: int) -> list[LedgerReading]:
    """Readings every 10 minutes of `hour` for every meter (cumulative registers, Wh)."""
    out = []
    for k in range(6):
        t = hour * HOUR + 600 * k
        elapsed = (hour - H0) * 6 + k  # ten-minute steps since T0
        seq = seq0 + k
        out.append(sb.reading("pv1", seq, t, 0, PV_WH_PER_HOUR * elapsed // 6, "pv", 3000))
        out.append(sb.reading("ld1", seq, t, 150_000 * elapsed // 6, 0, "load", 900))
        out.append(sb.reading("ld2", seq, t, 400_000 * elapsed // 6, 0, "load", 2400))
        out.append(sb.reading("bd2", seq, t, 50_000 * elapsed // 6, 10_000 * elapsed // 6, "bidir"))
    return out


def order_terms(oid: str, delivery: int, energy_wh: int, created: int) -> dict[str, object]:
    return {
        "id": oid,
        "creator": "mg2",
        "created": created,
        "seller": "mg1",
        "buyer": "mg2",
        "grid": "grid",
        "dispatch": "dispatch",
        "energy_wh": energy_wh,
        "price": 800,
        "delivery": delivery,
        "deposit": 2_000,
    }


@functools.cache
def two_microgrid_clearing(first_period: int) -> tuple[Any, Any]:
    """The reference day's clearing with the wind farm as mg1 and the campus as mg2."""
    reference = reference_request(first_period)
    names = {"mg4-wind-farm": "mg1", "mg1-campus": "mg2"}
    requests = tuple(
        TradeRequest(dataclasses.replace(r.microgrid, id=names[r.microgrid.id]), r.deposit)
        for r in reference.requests
        if r.microgrid.id in names
    )
    request = ClearingRequest(reference.market, reference.first_period, requests)
    return request, clear(request)


def build_world(store: LedgerStore) -> World:
    sb = Sandbox(market="m1", members=3)
    chain = Chain(sb, store)
    world = World(chain, sb)
    chain.genesis(
        T0,
        [
            sb.participant("mg1", "microgrid", T0),
            sb.participant("mg2", "microgrid", T0),
            sb.participant("grid", "grid", T0),
            sb.participant("dispatch", "dispatch", T0),
        ],
    )
    # block 1: meters
    chain.commit([sb.meter(m, owner, src, T0) for m, (owner, src) in METERS.items()], T0 + 10)
    # block 2: a trade order for hour H0+1, and another one the regulator will halt
    world.order_tx = sb.order(order_terms("o1", H0 + 1, 700_000, T0 + 20))
    world.vetoed_tx = sb.order(order_terms("o2", H0 + 2, 50_000, T0 + 25))
    # ... and the consensus agents' committed clearing for delivery hour H0+1
    request, result = two_microgrid_clearing((H0 + 1) % 24)
    world.clearing_tx = sb.clearing(H0 + 1, request, result, round=7)
    chain.commit([world.order_tx, world.vetoed_tx, world.clearing_tx], T0 + 30)
    # block 3 and 4: an hour of readings each
    for i, hour in enumerate((H0, H0 + 1)):
        rs = hour_readings(sb, hour, 1 + 6 * i)
        world.readings[hour] = rs
        chain.commit_readings(rs, (hour + 1) * HOUR + 5)
    # block 5: the regulator halts o2 with a published reason
    world.veto_tx = sb.veto(world.vetoed_tx.hash, "seller line limit exceeded", T0 + 2 * HOUR + 30)
    chain.commit([world.veto_tx], T0 + 2 * HOUR + 30)
    # block 6: hour H0+1 is settled, the contract client fires o1 (due at H0+3) and a
    # certificate is issued for pv1
    state = chain.state
    assert state is not None
    t6 = (H0 + 3) * HOUR + 10
    fire = due_actions(state, t6)
    # pv1's export register rose 1.1 MWh over its 12 readings: one certificate, 0.1 MWh carried.
    issue = Tx.make("cert_issue", {"meter": "pv1", "to_seq": 12, "certs": ["pv1-1"]})
    chain.commit([settlement_tx(state, H0 + 1), *fire, issue], t6)
    # block 7: the certificate moves to mg2, which retires it
    cid = "pv1-1"
    transfer = sb.owner_signed(
        "cert_transfer", {"certs": [cid], "from": "mg1", "to": "mg2", "time": t6 + 60}, "mg1"
    )
    retire = sb.owner_signed(
        "cert_retire",
        {
            "certs": [cid],
            "owner": "mg2",
            "period": 2026,
            "purpose": "2026 renewable quota",
            "time": t6 + 61,
        },
        "mg2",
    )
    chain.commit([transfer, retire], t6 + 120)
    return world
