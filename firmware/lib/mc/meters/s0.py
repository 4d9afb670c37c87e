"""S0 pulse input (DIN 43864): a debounced pulse counter whose total survives reboots.

The HAL wires a GPIO interrupt to `Debouncer.edge()`; this module turns pulses into
Wh with the meter's constant (pulses per kWh) and keeps the running pulse total in a
crash-safe slot store, written at most every `persist_s` by the app.  After a reboot the
count resumes from the stored total: it never resets; at worst the pulses since the
last save are lost, and never counted twice.
"""

from ..slots import SlotStore

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


# A pulse rate above this (W) is not a meter but a noisy or tampered line.
_MAX_PLAUSIBLE_W = const(1000000)


class Debouncer:
    """Counts edges at least `debounce_ms` apart; `edge()` is cheap enough for an IRQ."""

    def __init__(self, debounce_ms: int, ticks_diff) -> None:
        self.debounce_ms = debounce_ms
        self._ticks_diff = ticks_diff
        self._last = None
        self.count = 0
        self.bounces = 0

    def edge(self, now_ms) -> None:
        last = self._last
        if last is not None and self._ticks_diff(now_ms, last) < self.debounce_ms:
            self.bounces += 1
            return
        self._last = now_ms
        self.count += 1


class S0Meter:
    """Cumulative energy from an S0 counter (anything with a `count` attribute)."""

    def __init__(self, counter, flash, board, pulses_per_kwh: int, direction: str = "import") -> None:
        if pulses_per_kwh < 1:
            raise ValueError("pulses_per_kwh must be >= 1")
        self._counter = counter
        self._board = board
        self._ppk = pulses_per_kwh
        self._export = direction == "export"
        self._store = SlotStore(flash, "s0")
        stored = self._store.values
        self._base = stored[0] if stored else 0
        self._boot_count = counter.count
        self._saved = self._base
        self._last_pulses = self._base
        self._last_ms = board.ticks_ms()

    def total_pulses(self) -> int:
        return self._base + self._counter.count - self._boot_count

    def poll(self) -> None:
        """Nothing to do: the interrupt counts."""

    def sample(self):
        """(import Wh, export Wh, average W since the last sample, flags)."""
        from ..reading import FLAG_TAMPER

        board = self._board
        now = board.ticks_ms()
        pulses = self.total_pulses()
        dt = board.ticks_diff(now, self._last_ms)
        dp = pulses - self._last_pulses
        self._last_ms = now
        self._last_pulses = pulses
        # W = dp pulses * (1000/ppk Wh) * 3600 s/h / (dt/1000 s), in integers.
        power = dp * 3600000000 // (self._ppk * dt) if dt > 0 else 0
        flags = FLAG_TAMPER if power > _MAX_PLAUSIBLE_W else 0
        wh = pulses * 1000 // self._ppk
        if self._export:
            return 0, wh, -power, flags
        return wh, 0, power, flags

    def persist(self) -> None:
        total = self.total_pulses()
        if total != self._saved:
            self._store.save((total,))
            self._saved = total
