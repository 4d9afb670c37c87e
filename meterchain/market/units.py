"""Market units and the one shared rounding point: solver floats become integer W, Wh and money.

Everything the market signs or compares across nodes is an integer:

* power in W and energy in Wh (periods are one hour, so a period's energy in Wh
  equals its average power in W),
* money in minor units, ``MONEY_SCALE`` minor units to one currency unit,
* prices in money minor units per kWh.

Floats exist only inside the solver. Every value that leaves it passes through
a function of this module, so two nodes holding the same solver output produce
the same integers, and the integers keep the totals that the physics needs
(pool sales equal pool purchases, storage energy follows its flows).

Rounding is half-to-even everywhere (Python's ``round`` on floats, ``div_round``
on exact integer ratios): it is unbiased and exactly specified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MONEY_SCALE = 10_000
"""Money minor units per currency unit (1/10000)."""

WH_PER_KWH = 1_000

# Exact period costs are kept as integers scaled by this factor before the one
# final division: quadratic coefficients are per MW^2 h, so W^2 needs 1e12.
COST_SCALE = 10**12


def div_round(numerator: int, denominator: int) -> int:
    """Exact ``numerator / denominator`` rounded half to even (integers in, integer out)."""
    if denominator == 0:
        raise ZeroDivisionError("div_round by zero")
    if denominator < 0:
        numerator, denominator = -numerator, -denominator
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def to_int(value: float) -> int:
    """One solver float (W, Wh or money minor units) to the nearest integer, half to even."""
    if not math.isfinite(value):
        raise ValueError(f"cannot round non-finite solver value {value!r}")
    return round(value)


def to_int_array(values: np.ndarray) -> np.ndarray:
    """Element-wise `to_int` for solver arrays (numpy's rint is also half to even)."""
    if not np.all(np.isfinite(values)):
        raise ValueError("cannot round non-finite solver values")
    return np.rint(values).astype(np.int64)


def to_ints_with_total(
    values: Sequence[float] | np.ndarray, total: int, caps: Sequence[int] | np.ndarray | None = None
) -> list[int]:
    """Round non-negative floats to integers that add up to exactly ``total``.

    Largest-remainder method: take floors, then give the missing units to the
    largest fractional parts (ties to the lower index), or take surplus units
    from the smallest fractional parts of positive entries. An entry never goes
    above its cap (``caps``), so upper bounds survive. Used where a sum is
    physics (pool sales = pool purchases) and must survive rounding. Vectorised
    (a pool period of 10,000 microgrids); values and caps must fit in int64.
    """
    vals = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(vals)):
        raise ValueError("cannot round non-finite values")
    floors = np.floor(vals).astype(np.int64)
    cap_arr = None if caps is None else np.asarray(caps, dtype=np.int64)
    if cap_arr is not None:
        floors = np.minimum(floors, cap_arr)
    # the fractional part as Python computes float - int (the int made a float)
    frac = vals - floors.astype(float)
    missing = total - int(floors.sum())
    ranks = np.arange(vals.shape[0])
    if missing >= 0:
        eligible = ranks if cap_arr is None else ranks[floors < cap_arr]
        if missing > eligible.shape[0]:
            raise ValueError(f"total {total} is not reachable by rounding {len(vals)} values")
        # largest fraction first, ties to the lower index (lexsort: last key is primary)
        order = eligible[np.lexsort((eligible, -frac[eligible]))]
        floors[order[:missing]] += 1
        return floors.tolist()
    eligible = ranks[floors > 0]
    if -missing > eligible.shape[0]:
        raise ValueError(f"total {total} is not reachable by rounding {len(vals)} values")
    order = eligible[np.lexsort((eligible, frac[eligible]))]
    floors[order[:-missing]] -= 1
    return floors.tolist()


def to_ints_cumulative(values: np.ndarray) -> np.ndarray:
    """Round time series (last axis) so running sums stay within half a unit of the float sums.

    Each entry is ``round(prefix_sum[t]) - round(prefix_sum[t-1])``: storage
    energy computed from rounded charge/discharge flows then tracks the solver's
    state of charge to about 1 Wh instead of drifting by up to half a Wh per hour.
    """
    prefix = to_int_array(np.cumsum(values, axis=-1))
    return np.diff(prefix, axis=-1, prepend=0)


def energy_money(energy_wh: int, price_per_kwh: int) -> int:
    """Money minor units for ``energy_wh`` at ``price_per_kwh`` (minor units per kWh)."""
    return div_round(energy_wh * price_per_kwh, WH_PER_KWH)


def price_per_kwh(amount: int, energy_wh: int) -> int:
    """Unit price in minor units per kWh of ``amount`` minor units for ``energy_wh`` (> 0)."""
    if energy_wh <= 0:
        raise ValueError("a unit price needs a positive energy")
    return div_round(amount * WH_PER_KWH, energy_wh)


def pro_rata(amount: int, part: int, whole: int) -> int:
    """``amount * part / whole`` rounded half to even (integers; ``whole`` > 0)."""
    return div_round(amount * part, whole)


def split_pro_rata(total: int, weights: Sequence[int]) -> list[int]:
    """Split a non-negative integer ``total`` in proportion to non-negative integer weights.

    Exact largest-remainder split: the parts add up to ``total``; ties go to the
    lower index, so the split is the same on every node.
    """
    whole = sum(weights)
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError("split_pro_rata takes non-negative integers")
    if whole == 0:
        if total:
            raise ValueError("cannot split a positive total over zero weights")
        return [0] * len(weights)
    parts = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    missing = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda k: (-remainders[k], k))
    for k in order[:missing]:
        parts[k] += 1
    return parts
