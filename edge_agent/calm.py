"""Calm logging (STYLE rule 9): ERROR when a subject starts failing, DEBUG while it lasts."""

from __future__ import annotations

import logging


class CalmLog:
    """Per-subject failure state: ERROR when a subject starts failing, INFO when it recovers.

    A subject is a meter, a bus or a peer; a kind is a stable reason label. A
    meter sending a stream of bad readings logs one line, not thousands. With
    `per_kind` a different problem on the same subject is logged again (a
    meter whose readings fail for a new reason); without it one outage is
    one ERROR whatever its symptoms (a Modbus link that first times out, then
    refuses connections).
    """

    def __init__(self, logger: logging.Logger, *, per_kind: bool = True) -> None:
        self._log = logger
        self._per_kind = per_kind
        self._failing: dict[str, str] = {}

    def failure(self, subject: str, kind: str, message: str) -> None:
        known = self._failing.get(subject)
        if known is None or (self._per_kind and known != kind):
            self._failing[subject] = kind
            self._log.error("%s: %s (%s)", subject, message, kind)
        else:
            self._log.debug("%s: still failing: %s (%s)", subject, message, kind)

    def success(self, subject: str) -> None:
        if self._failing.pop(subject, None) is not None:
            self._log.info("%s: recovered", subject)

    @property
    def any_failing(self) -> bool:
        return bool(self._failing)
