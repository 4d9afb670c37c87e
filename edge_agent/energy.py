"""Interval energy from cumulative registers, split across hour boundaries in integer Wh.

Between two consecutive accepted readings of a meter, the energy that flowed
is the difference of its cumulative registers; it is exact however long the
gap (a board offline for a day, a Modbus link cut), because the registers
kept counting. The difference is spread over the UTC hours the interval
covers in proportion to the seconds spent in each. Each share is
floor(delta * elapsed_until_end_of_hour / total) minus the same for the
previous hour, so the shares are integers, sum exactly to the delta, are
each within 1 Wh of the exact proportion, and the rounding remainder always
lands in the same hour for the same inputs on every node.
"""

from __future__ import annotations

from dataclasses import dataclass

HOUR_S = 3600


def hour_start(t: int) -> int:
    """The Unix time (s) of the start of the UTC hour containing `t`."""
    return t - t % HOUR_S


@dataclass(frozen=True, slots=True)
class HourShare:
    """Energy (Wh) of one meter interval that falls in the hour starting at `hour` (Unix s)."""

    hour: int
    import_wh: int
    export_wh: int


def split_interval(t0: int, t1: int, import_delta_wh: int, export_delta_wh: int) -> list[HourShare]:
    """Spread the energy measured between times `t0` and `t1` over the hours in between.

    Deltas are non-negative integer Wh. When the clock did not advance
    (t1 <= t0: two readings in the same second, or a clock stepped back) the
    whole delta belongs to the hour of `t1`, the newer reading.
    """
    if import_delta_wh < 0 or export_delta_wh < 0:
        raise ValueError("energy deltas must be non-negative (counters only move forward)")
    if t1 <= t0 or hour_start(t0) == hour_start(t1 - 1):
        if not import_delta_wh and not export_delta_wh:
            return []
        # An interval that ends exactly on an hour boundary belongs to the hour before it.
        hour = hour_start(t1 - 1) if t1 > t0 else hour_start(t1)
        return [HourShare(hour, import_delta_wh, export_delta_wh)]
    total = t1 - t0
    shares: list[HourShare] = []
    done_import = done_export = 0
    hour = hour_start(t0)
    while hour < t1:
        end = min(hour + HOUR_S, t1)
        elapsed = end - t0
        cum_import = import_delta_wh * elapsed // total
        cum_export = export_delta_wh * elapsed // total
        share_import, share_export = cum_import - done_import, cum_export - done_export
        if share_import or share_export:
            shares.append(HourShare(hour, share_import, share_export))
        done_import, done_export = cum_import, cum_export
        hour += HOUR_S
    return shares
