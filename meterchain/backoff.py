"""Capped exponential backoff with jitter, for every reconnect path (Modbus links, MQTT clients)."""

from __future__ import annotations

import random
from typing import Any


class Backoff:
    """Capped exponential backoff with +/-20 % jitter; `reset()` after a success."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._next = initial_s
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.max_s, self._next * 2)
        return min(self.max_s, delay * self._rng.uniform(0.8, 1.2))

    def reset(self) -> None:
        self._next = self.initial_s


def paho_backoff(
    client: Any, min_s: float, max_s: float, rng: random.Random | None = None
) -> None:
    """Set a paho client's reconnect backoff: a jittered first wait, doubled up to `max_s`.

    paho doubles its wait after every refused or failed attempt and resets it
    once a session is up; the first wait is drawn from [min_s, 2 min_s) so
    that clients which lost the broker together do not all return at once.
    Calling it again resets the wait (do that only after a working session).
    """
    first = (rng or random).uniform(min_s, 2 * min_s)
    client.reconnect_delay_set(min_delay=first, max_delay=max(max_s, first))
