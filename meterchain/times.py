"""Times as people read them: ISO-8601 in UTC (`...Z`) or local time with its UTC offset."""

from __future__ import annotations

import datetime as dt


def iso_utc(seconds: float | None) -> str | None:
    """Unix seconds as ISO-8601 UTC to the second, e.g. 2026-01-01T11:00:00Z; None stays None."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_local(seconds: float) -> str:
    """Unix seconds as ISO-8601 local time with its offset, e.g. 2026-01-01T12:00:00+01:00."""
    return dt.datetime.fromtimestamp(int(seconds)).astimezone().isoformat(timespec="seconds")
