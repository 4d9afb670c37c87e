"""Next-window forecasts of a microgrid's renewable output and load, from its metered history.

A `Forecaster` maps the hourly history (what the microgrid's own meters
measured, as average W per UTC hour) to per-hour values for the window to
bid. Two are built in:

- `PersistenceForecaster`: each hour as it was at the same hour of the most
  recent day with a measurement (a PV array at 14:00 tomorrow is best guessed
  by 14:00 today). Hours with no such history fall back to the profile file
  if one is given, then to the latest measured hour, then to zero.
- `ProfileForecaster`: the profile file alone (a typical day, 24 values).

The history counts renewable meters' export as renewable output and load
meters' import as load (`history_from_energy`); other source types (bidir,
storage, chp) are the microgrid's controllable assets and not forecast.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge_agent.energy import HOUR_S
from edge_agent.store import HourlyEnergy
from meterchain.errors import ConfigError
from meterchain.reading import RENEWABLE_SOURCES

HISTORY_DAYS = 7  # how far back persistence looks for the same hour of day


@dataclass(frozen=True)
class Forecast:
    """Average power (W) per hour of the window starting at `first_hour` (Unix s, UTC)."""

    first_hour: int
    renewable_w: tuple[int, ...]
    load_w: tuple[int, ...]

    @property
    def periods(self) -> int:
        return len(self.renewable_w)


# hour (Unix s) -> (renewable W, load W) averaged over that hour
History = Mapping[int, tuple[int, int]]


class Forecaster(Protocol):
    def forecast(self, history: History, first_hour: int, periods: int) -> Forecast: ...


@dataclass(frozen=True)
class HourlyProfile:
    """A typical day: 24 values of renewable and load power (W), by UTC hour of day."""

    renewable_w: tuple[int, ...]
    load_w: tuple[int, ...]

    def at(self, hour: int) -> tuple[int, int]:
        h = (hour // HOUR_S) % 24
        return self.renewable_w[h], self.load_w[h]


def load_profile(path: Path) -> HourlyProfile:
    """Read a profile file (TOML: `renewable_w = [24 ints]`, `load_w = [24 ints]`)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"renewable_w", "load_w"})
    if unknown:
        raise ConfigError(str(path), unknown[0], "unknown key (known: renewable_w, load_w)")
    series = []
    for key in ("renewable_w", "load_w"):
        values = doc.get(key)
        if not isinstance(values, list) or len(values) != 24:
            raise ConfigError(str(path), key, "must be an array of 24 hourly values (W)")
        for i, value in enumerate(values):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(str(path), f"{key}[{i}]", "must be a non-negative integer (W)")
        series.append(tuple(values))
    return HourlyProfile(series[0], series[1])


def history_from_energy(rows: Iterable[HourlyEnergy], before: int) -> dict[int, tuple[int, int]]:
    """Renewable and load power (W = Wh per hour) of each complete hour before `before`."""
    history: dict[int, list[int]] = {}
    for row in rows:
        if row.hour + HOUR_S > before:
            continue  # the hour in progress is not a measurement yet
        slot = history.setdefault(row.hour, [0, 0])
        if row.source in RENEWABLE_SOURCES:
            slot[0] += row.export_wh
        elif row.source == "load":
            slot[1] += row.import_wh
    return {hour: (r, load) for hour, (r, load) in history.items()}


class PersistenceForecaster:
    """Same hour of the most recent measured day; see the module docstring for fallbacks."""

    def __init__(self, profile: HourlyProfile | None = None) -> None:
        self.profile = profile

    def _one(self, history: History, hour: int) -> tuple[int, int]:
        for days in range(1, HISTORY_DAYS + 1):
            seen = history.get(hour - days * 24 * HOUR_S)
            if seen is not None:
                return seen
        if self.profile is not None:
            return self.profile.at(hour)
        earlier = [h for h in history if h < hour]
        return history[max(earlier)] if earlier else (0, 0)

    def forecast(self, history: History, first_hour: int, periods: int) -> Forecast:
        values = [self._one(history, first_hour + k * HOUR_S) for k in range(periods)]
        return Forecast(first_hour, tuple(v[0] for v in values), tuple(v[1] for v in values))


class ProfileForecaster:
    """The typical day from the profile file, whatever was measured."""

    def __init__(self, profile: HourlyProfile) -> None:
        self.profile = profile

    def forecast(self, history: History, first_hour: int, periods: int) -> Forecast:
        values = [self.profile.at(first_hour + k * HOUR_S) for k in range(periods)]
        return Forecast(first_hour, tuple(v[0] for v in values), tuple(v[1] for v in values))
