"""Deterministic contracts a round can agree on: the interface and two cheap reference contracts.

A contract is pure: `execute(requests)` computes the result every node would
compute from the exact same signed request set, and `check(requests, result)`
says whether a proposed result is acceptable. A backup may verify instead of
re-executing, because an optimisation can have several optimal answers. The
Nash-bargaining clearing of `meterchain.market` plugs in through
`ClearingContract` below once that module is present. Money is in integer
minor units and energy in Wh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from edge_agent.consensus.messages import Request, RoundId


class Contract(Protocol):
    """What the consensus needs from a market contract."""

    def execute(self, requests: Sequence[Request]) -> Any:
        """The canonical (CBOR-encodable, integers only) result for this request set."""
        ...

    def check(self, requests: Sequence[Request], result: Any) -> bool:
        """True when `result` is an acceptable outcome for exactly these requests."""
        ...


def _bid(body: Any) -> tuple[str, int, int] | None:
    """(side, Wh, price per kWh in minor units) of a well-formed auction bid, else None."""
    if not isinstance(body, dict) or set(body) != {"side", "wh", "price"}:
        return None
    side, wh, price = body["side"], body["wh"], body["price"]
    if side not in ("buy", "sell"):
        return None
    for number in (wh, price):
        if not isinstance(number, int) or isinstance(number, bool):
            return None
    if wh <= 0 or price < 0:
        return None
    return side, wh, price


class DoubleAuction:
    """Sealed-bid uniform-price double auction over the submitted integer bids.

    Body of each request: {"side": "buy"|"sell", "wh": Wh, "price": minor units
    per kWh}. Bids are matched best first (ties by submitter id); the clearing
    price is the floor midpoint of the last matched buy and sell prices. The
    result lists, per submitter, the traded Wh (positive sold, negative bought)
    and the money it receives (negative: pays), in minor units, rounded down
    for sellers and up for buyers so the market never pays out more than it
    takes. Malformed bids are listed as rejected. The result is unique, so
    `check` re-executes and compares.
    """

    def execute(self, requests: Sequence[Request]) -> Any:
        buys: list[tuple[int, str, int]] = []
        sells: list[tuple[int, str, int]] = []
        rejected = []
        for req in requests:
            bid = _bid(req.body)
            if bid is None:
                rejected.append(req.submitter)
                continue
            side, wh, price = bid
            (buys if side == "buy" else sells).append((price, req.submitter, wh))
        buys.sort(key=lambda b: (-b[0], b[1]))
        sells.sort(key=lambda s: (s[0], s[1]))
        traded: dict[str, int] = {}
        bi = si = 0
        left_buy = buys[0][2] if buys else 0
        left_sell = sells[0][2] if sells else 0
        last_buy = last_sell = None
        while bi < len(buys) and si < len(sells) and buys[bi][0] >= sells[si][0]:
            qty = min(left_buy, left_sell)
            buyer, seller = buys[bi][1], sells[si][1]
            traded[buyer] = traded.get(buyer, 0) - qty
            traded[seller] = traded.get(seller, 0) + qty
            last_buy, last_sell = buys[bi][0], sells[si][0]
            left_buy -= qty
            left_sell -= qty
            if left_buy == 0:
                bi += 1
                left_buy = buys[bi][2] if bi < len(buys) else 0
            if left_sell == 0:
                si += 1
                left_sell = sells[si][2] if si < len(sells) else 0
        price = None if last_buy is None or last_sell is None else (last_buy + last_sell) // 2
        fills = []
        for submitter in sorted(traded):
            wh = traded[submitter]
            # money = Wh * (minor units per kWh) / 1000, rounded against the participant
            amount = (wh * price) // 1000 if price is not None else 0
            fills.append([submitter, wh, amount])
        return {"price": price, "fills": fills, "rejected": sorted(rejected)}

    def check(self, requests: Sequence[Request], result: Any) -> bool:
        return result == self.execute(requests)


def tamper_auction(result: Any, beneficiary: str, victim: str, amount: int) -> Any:
    """A dishonest primary's edit: pay `beneficiary` `amount` more and `victim` as much less."""
    fills = []
    for submitter, wh, money in result["fills"]:
        if submitter == beneficiary:
            money += amount
        elif submitter == victim:
            money -= amount
        fills.append([submitter, wh, money])
    return {**result, "fills": fills}


class Tally:
    """A trivial contract for benchmarks: counts the requests and sums their integer bodies."""

    def execute(self, requests: Sequence[Request]) -> Any:
        total = sum(
            r.body for r in requests if isinstance(r.body, int) and not isinstance(r.body, bool)
        )
        return {"count": len(requests), "sum": total}

    def check(self, requests: Sequence[Request], result: Any) -> bool:
        return result == self.execute(requests)


class ClearingContract:
    """SC1 clearing (Nash bargaining, `meterchain.market.clearing`) as a consensus contract.

    Each request body is a `TradeRequest.to_dict()` of the submitting
    microgrid (its id must be the submitter's node id). Bodies that do not
    parse, name another microgrid or fall short of the market's minimum
    deposit are left out and listed as rejected, deterministically, so one bad
    request cannot block a round. The result is
    {"result": ClearingResult.to_dict() or None, "rejected": [ids]}. A backup
    checks a proposal with `meterchain.market.verify.check` (optimisation
    results are compared within tolerance, everything derived exactly) instead
    of requiring its own solve to match bit for bit.
    """

    def __init__(
        self,
        market: Any,
        first_period: int | Callable[[RoundId], int],
        *,
        solver: str | None = None,
    ) -> None:
        """`first_period`: the window's first hour (0-23), or a function of the round
        (e.g. the hour a clearing round's sequence number stands for)."""
        self.market = market
        self.first_period = first_period
        self.solver = solver
        self._own: dict[bytes, Any] = {}

    def clearing_request(self, requests: Sequence[Request]) -> tuple[Any, list[str]]:
        from meterchain.errors import MeterChainError
        from meterchain.market.clearing import ClearingRequest
        from meterchain.market.model import TradeRequest

        accepted = []
        rejected = []
        for req in requests:
            try:
                trade = TradeRequest.from_dict(req.body)
            except (MeterChainError, TypeError, ValueError, KeyError):
                rejected.append(req.submitter)
                continue
            if trade.microgrid.id != req.submitter or trade.deposit < self.market.min_deposit:
                rejected.append(req.submitter)
                continue
            accepted.append(trade)
        if not accepted:
            return None, rejected
        period = self.first_period
        if callable(period):
            period = period(requests[0].env.round)
        try:
            return ClearingRequest(self.market, period, tuple(accepted)), rejected
        except MeterChainError:
            # models that cannot be cleared together (e.g. different window lengths)
            return None, sorted(rejected + [t.microgrid.id for t in accepted])

    def _solve(self, sc1: Any) -> Any:
        from meterchain.market.clearing import clear

        own = self._own.get(sc1.digest)
        if own is None:
            own = clear(sc1) if self.solver is None else clear(sc1, solver=self.solver)
            self._own = {sc1.digest: own}  # only the latest window is worth keeping
        return own

    def execute(self, requests: Sequence[Request]) -> Any:
        sc1, rejected = self.clearing_request(requests)
        result = None if sc1 is None else self._solve(sc1).to_dict()
        return {"result": result, "rejected": sorted(rejected)}

    def check(self, requests: Sequence[Request], result: Any) -> bool:
        from meterchain.errors import MeterChainError
        from meterchain.market import verify
        from meterchain.market.clearing import ClearingResult

        sc1, rejected = self.clearing_request(requests)
        if not isinstance(result, dict) or set(result) != {"result", "rejected"}:
            return False
        if result["rejected"] != sorted(rejected):
            return False
        if sc1 is None:
            return result["result"] is None
        try:
            proposed = ClearingResult.from_dict(result["result"])
        except MeterChainError:
            return False
        if proposed.to_dict() != result["result"]:
            return False  # not in canonical form: the digest would not be reproducible
        return verify.check(sc1, proposed, own=self._solve(sc1)).accepted
