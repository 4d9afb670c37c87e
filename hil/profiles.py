"""Deterministic power profiles for emulated meters: a PV array and a household-style load.

A profile maps simulated time (Unix seconds) to active power in W, positive
when the metered site imports (load) and negative when it exports (PV). The
same seed gives the same curve on every run and machine: cloud and load
noise come from a counter-based hash (splitmix64), not from a stateful RNG,
so a value depends only on (seed, time) and never on how often it was asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def unit_noise(seed: int, index: int) -> float:
    """A value in [0, 1) that depends only on (seed, index)."""
    return _splitmix64((seed * 0x100000001B3 + index) & _MASK64) / 2.0**64


def smooth_noise(seed: int, t: float, period_s: float) -> float:
    """Noise in [0, 1) interpolated (cosine) between knots `period_s` apart."""
    k = math.floor(t / period_s)
    frac = t / period_s - k
    a = unit_noise(seed, k)
    b = unit_noise(seed, k + 1)
    w = (1 - math.cos(math.pi * frac)) / 2
    return a + (b - a) * w


def hour_of_day(t: float) -> float:
    """Hour of the (UTC) day of Unix time `t`, in [0, 24)."""
    return (t % 86400.0) / 3600.0


class PowerProfile(Protocol):
    """Signed active power in W at simulated Unix time `t` (import > 0, export < 0)."""

    def power_w(self, t: float) -> float: ...


@dataclass(frozen=True)
class PvProfile:
    """A PV array behind the meter: a clear-sky arch from sunrise to sunset, dimmed by clouds."""

    peak_w: float = 8000.0
    sunrise_h: float = 6.0
    sunset_h: float = 18.0
    seed: int = 1
    cloudiness: float = 0.35  # fraction of output a thick cloud removes

    def power_w(self, t: float) -> float:
        h = hour_of_day(t)
        if not self.sunrise_h < h < self.sunset_h:
            return 0.0
        arch = math.sin(math.pi * (h - self.sunrise_h) / (self.sunset_h - self.sunrise_h))
        clouds = 1.0 - self.cloudiness * smooth_noise(self.seed, t, 600.0)
        return -self.peak_w * arch**1.5 * clouds


@dataclass(frozen=True)
class LoadProfile:
    """A building load: a base, a morning and an evening peak, and minute-scale jitter."""

    base_w: float = 1500.0
    morning_peak_w: float = 2500.0
    evening_peak_w: float = 4000.0
    seed: int = 1
    jitter: float = 0.15  # relative amplitude of the minute-scale noise

    def power_w(self, t: float) -> float:
        h = hour_of_day(t)
        morning = self.morning_peak_w * math.exp(-(((h - 7.5) / 1.2) ** 2))
        evening = self.evening_peak_w * math.exp(-(((h - 19.5) / 1.8) ** 2))
        noise = 1.0 + self.jitter * (2.0 * smooth_noise(self.seed, t, 60.0) - 1.0)
        return (self.base_w + morning + evening) * noise


PROFILES: dict[str, type[PvProfile] | type[LoadProfile]] = {"pv": PvProfile, "load": LoadProfile}


def make_profile(name: str, seed: int = 1) -> PowerProfile:
    """The named profile (`pv` or `load`) with default parameters and `seed`."""
    try:
        cls = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
    return cls(seed=seed)
