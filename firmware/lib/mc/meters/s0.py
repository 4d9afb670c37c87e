"""S0 pulse input (DIN 43864 / EN 62053-31): a pulse counter whose total survives reboots.

The HAL counts pulses in hardware where the chip and port have it (esp32.PCNT, MicroPython
1.27+, ESP32 and ESP32-S3): edges are counted while the firmware blocks (a reconnect can
take tens of seconds) and glitches shorter than the counter's filter are ignored;
`WrapCounter` turns its 16-bit wrapping value into a running total.  Otherwise a GPIO
interrupt calls `EdgeCounter.edge()`.  That handler is *scheduled* on the ESP32 port
(a queue of 8): it runs after the edge, possibly long after and back to back with other
queued ones, so its run time says nothing about when the edge happened and every call is
counted (no time-based debouncing, which would discard real pulses); pulses beyond the
queue's depth during a long blocking call are lost, which is why the config refuses S0
on a chip without PCNT.

This module turns pulses into Wh with the meter's constant (pulses per kWh) and keeps the
running pulse total in a crash-safe slot store, written at most every `persist_s` by the
app.  After a reboot the count resumes from the stored total: it never resets; at worst
the pulses since the last save are lost, and never counted twice.
"""

from ..slots import SlotStore

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


# A pulse rate above this (W) is not a meter but a noisy or tampered line.
_MAX_PLAUSIBLE_W = const(1000000)


class EdgeCounter:
    """Counts every edge an interrupt handler reports; `edge()` is cheap enough for an IRQ."""

    def __init__(self) -> None:
        self.count = 0

    def edge(self, _pin=None) -> None:
        self.count += 1


class WrapCounter:
    """A running total from a hardware counter that wraps to 0 at `modulus` (read it at
    least once per `modulus` pulses: the app reads it every few seconds)."""

    def __init__(self, read, modulus: int) -> None:
        self._read = read
        self._modulus = modulus
        self._last = read()
        self._total = 0

    @property
    def count(self) -> int:
        value = self._read()
        self._total += (value - self._last) % self._modulus
        self._last = value
        return self._total


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
        """Read the counter, so a wrapping hardware counter never wraps twice unseen."""
        self.total_pulses()

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
