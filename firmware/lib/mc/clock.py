"""Wall-clock time for readings: NTP sync, and the "clock not synced" flag until it succeeds.

The board's RTC starts at an arbitrary time after power-up; until NTP has answered
in this boot (and again at least once a day) every reading carries
FLAG_CLOCK_NOT_SYNCED, so consumers do not take its time stamp at face value.
"""

from .reading import FLAG_CLOCK_NOT_SYNCED

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_RETRY_MS = const(60000)  # NTP retry while unsynced
_STALE_MS = const(86400000)  # a sync older than a day no longer vouches for the RTC
_MIN_TIME = const(1704067200)  # 2024-01-01: an RTC earlier than this was never set


class Clock:
    def __init__(self, board, host: str, resync_s: int, log) -> None:
        self._board = board
        self._host = host
        self._resync_ms = resync_s * 1000
        self._log = log
        self._synced_at = None  # ticks of the last successful sync
        self._next_try = board.ticks_ms()

    def service(self) -> None:
        """Sync when due; cheap to call every loop."""
        board = self._board
        now = board.ticks_ms()
        # Checked here, every loop, because ticks_diff only spans a few days.
        if self._synced_at is not None and board.ticks_diff(now, self._synced_at) >= _STALE_MS:
            self._synced_at = None
        if board.ticks_diff(now, self._next_try) < 0:
            return
        if board.ntp_sync(self._host):
            self._synced_at = board.ticks_ms()
            self._next_try = board.ticks_add(self._synced_at, self._resync_ms)
            self._log.recovered("ntp", "clock synced from %s" % self._host)
        else:
            self._next_try = board.ticks_add(now, _RETRY_MS)
            self._log.failing("ntp", "NTP sync from %s failed" % self._host)

    def try_now(self) -> None:
        """Ask NTP at once if the clock is not synced (TLS waits for it), else nothing."""
        if not self.synced:
            self._next_try = self._board.ticks_ms()
            self.service()

    def now(self) -> int:
        """Unix seconds from the RTC (never negative)."""
        t = self._board.time()
        return t if t > 0 else 0

    @property
    def synced(self) -> bool:
        return self._synced_at is not None and self._board.time() >= _MIN_TIME

    def flags(self) -> int:
        return 0 if self.synced else FLAG_CLOCK_NOT_SYNCED
