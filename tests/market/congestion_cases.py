"""Hand-built executed hours and feeders for the congestion and failed-execution tests."""

from __future__ import annotations

from collections.abc import Sequence

from meterchain.market.clearing import ClearingResult, ExecutedHour, Trade
from meterchain.market.model import Dispatch
from meterchain.market.network import Line, Network
from meterchain.market.units import energy_money


def hour_result(
    dispatch: dict[str, Dispatch],
    trades: Sequence[tuple[str, str, int, int]],
    period: int = 12,
) -> ClearingResult:
    """A clearing result whose one executed hour has ``dispatch`` and ``trades``.

    Trades are (seller, buyer, Wh, price per kWh); the amount is Wh x price.
    """
    ids = tuple(sorted(dispatch))
    n = len(ids)
    executed = ExecutedHour(
        period=period,
        coalition=ids,
        standalone=tuple(Dispatch() for _ in ids),
        dispatch=tuple(dispatch[mg] for mg in ids),
        standalone_cost=(0,) * n,
        cost=(0,) * n,
        saving=0,
        payments=(0,) * n,
        trades=tuple(Trade(s, b, wh, energy_money(wh, p), p) for s, b, wh, p in trades),
        transfers=(),
        individually_rational=True,
    )
    return ClearingResult(
        request_digest=b"\x00" * 32,
        solver="hand",
        first_period=period,
        periods=1,
        microgrids=ids,
        plan=(),
        window_trades=(),
        standalone_cost=(0,) * n,
        cooperative_cost=(0,) * n,
        executed=(executed,),
    )


def triangle(limit_bc: int = 150_000) -> Network:
    """Three buses a (grid), b, c joined in a triangle of equal reactances."""
    return Network(
        "triangle",
        "a",
        ("a", "b", "c"),
        (
            Line("ab", "a", "b", 100, 1_000_000),
            Line("ac", "a", "c", 100, 1_000_000),
            Line("bc", "b", "c", 100, limit_bc),
        ),
        (("seller", "b"), ("buyer", "c")),
    )


def radial_five(limit_23: int = 100_000) -> Network:
    """A radial feeder: sub - n1 - n2 - n3, and n1 - n4; pv at n3, shop at n2, farm at n4."""
    return Network(
        "radial5",
        "sub",
        ("sub", "n1", "n2", "n3", "n4"),
        (
            Line("s1", "sub", "n1", 50, 1_000_000),
            Line("12", "n1", "n2", 80, 1_000_000),
            Line("23", "n2", "n3", 120, limit_23),
            Line("14", "n1", "n4", 90, 1_000_000),
        ),
        (("pv", "n3"), ("shop", "n2"), ("farm", "n4"), ("town", "n1")),
    )
