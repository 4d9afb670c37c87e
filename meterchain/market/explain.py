"""Plain-language account of an executed hour's prices, bargaining transfers and gains, for
operators: the demo, reports and settlement statements all print these lines.

* `explain_hour(request, result, k=0, settlement=None) -> list[str]`: the
  hour's energy price and its band, every trade, every bargaining transfer,
  each member's gain and, with a settlement, deliveries and penalties.
* `hour_gain(result, index, k=0) -> int` and `hour_shared_saving(hour) -> int`:
  the figures the equal split is made of (money minor units).
* `GLOSSARY` and `glossary_lines()`: the terms the lines use.
"""

from __future__ import annotations

from meterchain.market.clearing import ClearingRequest, ClearingResult, ExecutedHour, participants
from meterchain.market.settlement import Settlement
from meterchain.market.units import MONEY_SCALE, WH_PER_KWH

GLOSSARY: dict[str, str] = {
    "energy price": (
        "one price per kWh for every green-power trade of the hour: the middle of the band "
        "between the sellers' feed-in tariff (what the grid would pay them) and the buyers' "
        "retail price (what the grid would charge them). The wheeling fee is paid half by "
        "each side, so the price is also in the middle of the band net of fees. Deviation "
        "penalties (M5) are computed from this price."
    ),
    "bargaining transfer": (
        "money between two members with no energy attached. Nash bargaining with equal "
        "power gives every member the same gain; energy at one fair price alone does not, "
        "so members that gain more than the average pay members that gain less. It is "
        "shown and settled separately ('bargaining-transfer') and never changes a price."
    ),
    "disagreement cost (C_non)": (
        "what a microgrid's window would cost running alone, with no trade between "
        "microgrids: the point every gain is measured from."
    ),
    "continuation cost (V)": (
        "what the rest of the window would cost the microgrid alone, starting from the "
        "storage energy the executed hour leaves it: the stored energy is valued, so a "
        "battery kept full for the evening peak counts as a gain now."
    ),
    "gain": (
        "C_non - (cost of the hour + payments) - V (+ investment credit): what the "
        "executed hour leaves a member better off than never trading, even if the market "
        "stopped afterwards. Every member's gain is the same, to the minor unit."
    ),
    "investment credit": (
        "in an hour that pays off only through the plan's later hours (e.g. storage "
        "charged now for a trade later), each member advances an equal share of the "
        "hour's shortfall, so the hour breaks even; the later hours' savings are shared "
        "equally, so over a day every member gains the same share of the day's saving."
    ),
    "window saving": (
        "what the whole cooperative plan saves over the window; the coalition trades "
        "only when it is positive."
    ),
}


def _money(minor: int) -> str:
    sign = "-" if minor < 0 else ""
    units, rest = divmod(abs(minor), MONEY_SCALE)
    return f"{sign}{units}.{rest:04d}"


def _kwh(wh: int) -> str:
    return f"{wh / WH_PER_KWH:.1f} kWh"


def hour_gain(result: ClearingResult, index: int, k: int = 0) -> int:
    """Microgrid ``index``'s gain in executed hour ``k`` (see `GLOSSARY`), minor units.

    Rolling clearing (one executed hour): C_non - final cost - V + investment
    credit; several executed hours (day-ahead): the hour alone minus the final
    cost. Zero outside the coalition.
    """
    hour = result.executed[k]
    if result.microgrids[index] not in hour.coalition:
        return 0
    if len(result.executed) == 1:
        return (
            result.standalone_cost[index]
            - hour.final_cost(index)
            - hour.continuation_cost[index]
            + hour.investment_credit[index]
        )
    return hour.standalone_cost[index] - hour.final_cost(index)


def hour_shared_saving(hour: ExecutedHour) -> int:
    """The saving the members split equally in ``hour`` (the hour's saving plus credits)."""
    return hour.saving + sum(hour.investment_credit)


def glossary_lines() -> list[str]:
    return [f"{term}: {text}" for term, text in GLOSSARY.items()]


def explain_hour(
    request: ClearingRequest,
    result: ClearingResult,
    k: int = 0,
    settlement: Settlement | None = None,
) -> list[str]:
    """Lines an operator can read: why each price, what each transfer is for, who gains what."""
    lines: list[str] = []
    for mg_id, reason in result.excluded:
        lines.append(f"{mg_id} is left out of this clearing: {reason}")
    if not result.executed:
        return lines
    hour = result.executed[k]
    sub = participants(request, result.excluded)
    t = hour.period - sub.first_period
    ids = result.microgrids
    if not hour.coalition:
        lines.append(
            f"hour {hour.period:02d}: no trade -- the plan saves nothing over the window, "
            "every microgrid runs alone"
        )
        return lines
    if hour.trades:
        mgs = {mg.id: mg for mg in sub.microgrids}
        sellers = sorted({tr.seller for tr in hour.trades})
        buyers = sorted({tr.buyer for tr in hour.trades})
        floor = max(mgs[s].feed_in_tariff_per_kwh for s in sellers)
        ceiling = min(mgs[b].retail_price_per_kwh[t] for b in buyers)
        lines.append(
            f"hour {hour.period:02d}: energy price {_money(hour.price_per_kwh)}/kWh, the middle "
            f"of the band from the feed-in tariff {_money(floor)} to the retail price "
            f"{_money(ceiling)}"
        )
        for tr in hour.trades:
            lines.append(
                f"  {tr.seller} -> {tr.buyer}: {_kwh(tr.energy_wh)} green at "
                f"{_money(tr.price_per_kwh)}/kWh = {_money(tr.amount)}"
            )
    else:
        lines.append(
            f"hour {hour.period:02d}: no energy changes hands this hour; the coalition follows "
            "a plan that trades later in the window"
        )
    shared = hour_shared_saving(hour)
    members = len(hour.coalition)
    credit = sum(hour.investment_credit)
    lines.append(
        f"  the window plan saves {_money(hour.window_saving)}; this hour saves "
        f"{_money(hour.saving)}"
        + (f" (+ {_money(credit)} investment credit)" if credit else "")
        + f", split equally: {_money(shared // members)} each for {members} members"
    )
    single = len(result.executed) == 1
    for tf in hour.transfers:
        lines.append(
            f"  bargaining transfer {tf.payer} -> {tf.payee}: {_money(tf.amount)} "
            "(equal gains, not part of any price)"
        )
    for i, mg_id in enumerate(ids):
        if mg_id in hour.coalition:
            alone = result.standalone_cost[i] if single else hour.standalone_cost[i]
            lines.append(
                f"  {mg_id}: gains {_money(hour_gain(result, i, k))} (alone "
                f"{_money(alone)} {'over the window' if single else 'this hour'}, pays "
                f"{_money(hour.payments[i])} in energy and transfers)"
            )
    if settlement is not None:
        for d in settlement.deliveries:
            if d.short_wh:
                lines.append(
                    f"  {d.seller} delivered {_kwh(d.delivered_wh)} of {_kwh(d.cleared_wh)} "
                    f"to {d.buyer}; penalty for {_kwh(d.short_wh)} short at the buyer's loss "
                    f"coefficient + max(0, retail - energy price)"
                )
    return lines
