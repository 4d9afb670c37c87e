"""Interval energy is split over hours in integer Wh that sum exactly to the register delta."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.energy import HOUR_S, HourShare, split_interval

T0 = 1_700_000_000 - 1_700_000_000 % HOUR_S  # an hour boundary


def test_interval_inside_one_hour() -> None:
    assert split_interval(T0 + 10, T0 + 70, 5, 0) == [HourShare(T0, 5, 0)]


def test_interval_ending_on_the_boundary_belongs_to_the_hour_before() -> None:
    assert split_interval(T0 + 3000, T0 + HOUR_S, 7, 3) == [HourShare(T0, 7, 3)]


def test_split_is_proportional_with_the_remainder_in_a_fixed_place() -> None:
    # 10 Wh over 30 min + 30 min: 5 and 5; 11 Wh: floor puts the odd Wh in the second hour.
    assert split_interval(T0 + 1800, T0 + 5400, 10, 0) == [
        HourShare(T0, 5, 0),
        HourShare(T0 + HOUR_S, 5, 0),
    ]
    assert split_interval(T0 + 1800, T0 + 5400, 11, 0) == [
        HourShare(T0, 5, 0),
        HourShare(T0 + HOUR_S, 6, 0),
    ]


def test_a_day_long_gap_spreads_over_every_hour() -> None:
    shares = split_interval(T0, T0 + 24 * HOUR_S, 24_000, 2_400)
    assert shares == [HourShare(T0 + h * HOUR_S, 1000, 100) for h in range(24)]


def test_clock_that_did_not_advance_gives_all_to_the_newer_reading() -> None:
    assert split_interval(T0 + 100, T0 + 100, 4, 1) == [HourShare(T0, 4, 1)]
    assert split_interval(T0 + 4000, T0 + 100, 4, 1) == [HourShare(T0, 4, 1)]


def test_no_energy_no_rows() -> None:
    assert split_interval(T0, T0 + 5 * HOUR_S, 0, 0) == []


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(1_600_000_000, 1_700_000_000),
    length=st.integers(0, 3 * 86_400),
    imp=st.integers(0, 10**9),
    exp=st.integers(0, 10**9),
)
def test_shares_are_exact_and_within_one_wh_of_proportional(
    start: int, length: int, imp: int, exp: int
) -> None:
    shares = split_interval(start, start + length, imp, exp)
    assert sum(s.import_wh for s in shares) == imp
    assert sum(s.export_wh for s in shares) == exp
    assert [s.hour for s in shares] == sorted({s.hour for s in shares})
    for s in shares:
        assert s.hour % HOUR_S == 0
        assert s.import_wh >= 0 and s.export_wh >= 0
        if length:
            seconds = min(s.hour + HOUR_S, start + length) - max(s.hour, start)
            assert abs(s.import_wh - imp * seconds / length) < 1 + 1e-6 * imp
            assert abs(s.export_wh - exp * seconds / length) < 1 + 1e-6 * exp
