"""Calm logging (STYLE rule 9): ERROR when a subject starts failing, then counted summaries.

Shared by every service (readings, Modbus buses, broker links, block proposals).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

SUMMARY_EVERY_S = 60.0  # at most one "still failing" line per subject this often


@dataclass
class _Failing:
    kind: str
    since: float  # clock time of the first failure
    count: int = 1
    reported: int = 1  # failures already counted in a logged line
    next_summary: float = 0.0


class CalmLog:
    """Per-subject failure state: ERROR when a subject starts failing, INFO when it recovers.

    A subject is a meter, a bus or a peer; a kind is a stable reason label. A
    meter sending a stream of bad readings logs one ERROR, then (while it
    goes on) one WARNING per `summary_every_s` with the count since the last
    line, each other failure at DEBUG, and one INFO with the total when it
    recovers: thousands of failures make a handful of lines. With `per_kind`
    a different problem on the same subject is logged again (a meter whose
    readings fail for a new reason); without it one outage is one ERROR
    whatever its symptoms (a Modbus link that first times out, then refuses
    connections).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        per_kind: bool = True,
        summary_every_s: float = SUMMARY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._per_kind = per_kind
        self._every = summary_every_s
        self._clock = clock
        self._failing: dict[str, _Failing] = {}

    def failure(self, subject: str, kind: str, message: str) -> None:
        now = self._clock()
        known = self._failing.get(subject)
        if known is None:
            self._failing[subject] = _Failing(kind, now, next_summary=now + self._every)
            self._log.error("%s: %s (%s)", subject, message, kind)
            return
        known.count += 1
        if self._per_kind and known.kind != kind:  # news: logged, the outage goes on counting
            known.kind, known.reported = kind, known.count
            known.next_summary = now + self._every
            self._log.error("%s: %s (%s)", subject, message, kind)
            return
        known.kind = kind
        if now >= known.next_summary:
            self._log.warning(
                "%s: still failing: %s (%s); %d more failure(s), %d in %.0f s",
                subject, message, kind, known.count - known.reported, known.count,
                now - known.since,
            )  # fmt: skip
            known.reported = known.count
            known.next_summary = now + self._every
        else:
            self._log.debug("%s: still failing: %s (%s)", subject, message, kind)

    def success(self, subject: str) -> None:
        known = self._failing.pop(subject, None)
        if known is not None:
            self._log.info(
                "%s: recovered after %d failure(s) in %.0f s",
                subject, known.count, self._clock() - known.since,
            )  # fmt: skip

    def failures(self, subject: str) -> int:
        """Failures of `subject` since it started failing, whatever their kinds (0: not failing)."""
        known = self._failing.get(subject)
        return known.count if known else 0

    @property
    def any_failing(self) -> bool:
        return bool(self._failing)
