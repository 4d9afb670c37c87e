"""Calm logging (STYLE rule 9): ERROR when a subject starts failing, DEBUG while it lasts."""

from __future__ import annotations

import logging


class CalmLog:
    """Per-subject failure state: one ERROR per new (subject, kind), INFO when it recovers.

    A subject is a meter, a bus or a peer; a kind is a stable reason label. A
    meter sending a stream of bad readings logs one line, not thousands, and
    a different problem on the same subject is logged again.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._failing: dict[str, str] = {}

    def failure(self, subject: str, kind: str, message: str) -> None:
        if self._failing.get(subject) != kind:
            self._failing[subject] = kind
            self._log.error("%s: %s (%s)", subject, message, kind)
        else:
            self._log.debug("%s: still failing: %s (%s)", subject, message, kind)

    def success(self, subject: str) -> None:
        if self._failing.pop(subject, None) is not None:
            self._log.info("%s: recovered", subject)

    def failing(self, subject: str) -> bool:
        return subject in self._failing
