"""Keeps the board's MQTT connection and drains the spool through it.

The connection keeper around `mc.mqtt.Protocol`: WiFi (re)join, TLS connect with the
meter's own credentials, reconnect with capped exponential backoff and jitter, an
in-flight window of QoS 1 publishes matched to their PUBACKs, and keepalive pings.
A reading leaves the spool only when its PUBACK arrives; on any error the connection
is dropped and everything unacknowledged is sent again, oldest first, after the next
connect (the broker may then see a duplicate, which ingest discards by sequence number).

Everything runs in `service(wait_ms)`, called from the app's loop; it returns within
about `wait_ms` (plus a connect attempt, which is bounded by its own timeouts).
"""

from .mqtt import PINGRESP, MQTTError, Protocol

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_CONNECT_TIMEOUT_MS = const(10000)
_ACK_TIMEOUT_MS = const(30000)  # a PUBACK this late means a broken session: reconnect, resend
_WIFI_TIMEOUT_MS = const(20000)

STATE_DOWN = "down"
STATE_UP = "up"


class Uplink:
    """Publishes spooled readings to mc/<market>/r/<meter_id>; see the module docstring."""

    def __init__(self, board, cfg: dict, spool, log) -> None:
        self._board = board
        self._cfg = cfg
        self._spool = spool
        self._log = log
        self.topic = ("mc/%s/r/%s" % (cfg["market"], cfg["meter_id"])).encode()
        self._window = cfg["broker.inflight"]
        self._keepalive_ms = cfg["broker.keepalive_s"] * 1000
        self._min_ms = cfg["broker.backoff_min_ms"]
        self._max_ms = cfg["broker.backoff_max_ms"]
        self._ca = None
        self._proto = None
        self._link = None
        # In-flight window as fixed slots (packet id, 0 = free -> sequence number),
        # allocated once: publishing and matching PUBACKs allocate nothing.
        self._slot_pid = [0] * self._window
        self._slot_seq = [0] * self._window
        self._used = 0
        self._oldest_at = None  # ticks when the oldest unacknowledged publish went out
        self._cursor = 0  # highest sequence number published on this connection
        self._pid = 0
        self._failures = 0
        self._retry_at = board.ticks_ms()
        self._last_tx = self._retry_at
        self._ping_at = None  # ticks of an unanswered PINGREQ
        self.state = STATE_DOWN
        self.connects = 0
        self.published = 0
        self.acked = 0
        self.last_error = ""

    # -- connection keeping --------------------------------------------------

    def _ca_data(self):
        if self._ca is None and self._cfg["broker.tls"] and self._cfg["broker.ca"]:
            self._ca = self._board.flash.read(self._cfg["broker.ca"])
        return self._ca

    def _connect(self) -> None:
        board = self._board
        cfg = self._cfg
        try:
            if cfg["wifi.ssid"] and not board.wifi_ok():
                if not board.wifi_connect(cfg["wifi.ssid"], cfg["wifi.password"], _WIFI_TIMEOUT_MS):
                    raise OSError("WiFi %s not joined" % cfg["wifi.ssid"])
            link = board.connect(
                cfg["broker.host"], cfg["broker.port"], cfg["broker.tls"], self._ca_data(),
                _CONNECT_TIMEOUT_MS,
            )
        except OSError as exc:
            self._failed("connect to %s:%d failed: %s" % (cfg["broker.host"], cfg["broker.port"], exc))
            return
        proto = Protocol(
            link, cfg["meter_id"], cfg["broker.username"], cfg["broker.password"],
            cfg["broker.keepalive_s"],
        )
        try:
            proto.connect(_CONNECT_TIMEOUT_MS, board)
        except MQTTError as exc:
            self._close_link(link)
            self._failed("MQTT connect refused: %s" % exc)
            return
        self._link = link
        self._proto = proto
        self._clear_slots()
        self._oldest_at = None
        self._cursor = 0
        self._failures = 0
        self._last_tx = board.ticks_ms()
        self._ping_at = None
        self.state = STATE_UP
        self.connects += 1
        self._log.recovered("uplink", "connected to %s:%d" % (cfg["broker.host"], cfg["broker.port"]))

    def _close_link(self, link) -> None:
        try:
            link.close()
        except OSError:
            pass

    def _failed(self, why: str) -> None:
        """Count a failure and schedule the next attempt: capped exponential backoff, jitter."""
        self._failures += 1
        self.last_error = why
        self._log.failing("uplink", why)
        shift = self._failures - 1 if self._failures < 21 else 20
        delay = self._min_ms << shift
        if delay > self._max_ms:
            delay = self._max_ms
        # "Equal jitter": at least half the delay, so a fleet that lost its broker at the
        # same moment does not come back in one burst, and none retries too eagerly.
        rand = int.from_bytes(self._board.urandom(4), "big")
        delay = delay // 2 + rand % (delay // 2 + 1)
        self._retry_at = self._board.ticks_add(self._board.ticks_ms(), delay)

    def drop(self, why: str) -> None:
        """Close the connection; unacknowledged readings stay spooled for the next one."""
        if self._link is not None:
            self._close_link(self._link)
        self._link = None
        self._proto = None
        self._clear_slots()
        self._oldest_at = None
        self._cursor = 0
        self.state = STATE_DOWN
        self._failed(why)

    def close(self) -> None:
        """Orderly shutdown: DISCONNECT and close (the spool keeps what was not acked)."""
        if self._proto is not None:
            self._proto.disconnect()
        if self._link is not None:
            self._close_link(self._link)
        self._link = None
        self._proto = None
        self.state = STATE_DOWN

    def retry_in_ms(self) -> int:
        if self._proto is not None:
            return 0
        left = self._board.ticks_diff(self._retry_at, self._board.ticks_ms())
        return left if left > 0 else 0

    # -- publishing ----------------------------------------------------------

    def _clear_slots(self) -> None:
        for i in range(self._window):
            self._slot_pid[i] = 0
        self._used = 0

    def _take(self, pid: int) -> int:
        """Free the slot of packet id `pid`; its sequence number, or -1 if not in flight."""
        for i in range(self._window):
            if self._slot_pid[i] == pid:
                self._slot_pid[i] = 0
                self._used -= 1
                return self._slot_seq[i]
        return -1

    def _next_pid(self) -> int:
        while True:
            self._pid = self._pid + 1 if self._pid < 0xFFFF else 1
            if self._pid not in self._slot_pid:
                return self._pid

    def _fill(self) -> None:
        proto = self._proto
        spool = self._spool
        while proto is not None and self._used < self._window:
            seq = spool.next_unsent(self._cursor)
            if seq < 0:
                return
            self._cursor = seq
            data = spool.payload(seq)
            if data is None:
                continue  # failed its CRC on re-read and was dropped
            pid = self._next_pid()
            proto.publish(self.topic, data, pid)
            i = self._slot_pid.index(0)
            self._slot_pid[i] = pid
            self._slot_seq[i] = seq
            self._used += 1
            self._last_tx = self._board.ticks_ms()
            if self._oldest_at is None:
                self._oldest_at = self._last_tx
            self.published += 1

    def inflight(self) -> int:
        return self._used

    def service(self, wait_ms: int) -> None:
        """Connect if due, publish what the window allows, and read PUBACKs for `wait_ms`."""
        board = self._board
        if self._proto is None:
            left = self.retry_in_ms()
            if left > 0:
                board.sleep_ms(left if left < wait_ms else wait_ms)
                return
            self._connect()
            if self._proto is None:
                return
        proto = self._proto
        deadline = board.ticks_add(board.ticks_ms(), wait_ms)
        try:
            self._fill()
            while True:
                left = board.ticks_diff(deadline, board.ticks_ms())
                event = proto.poll(left if left > 0 else 0)
                if event > 0:
                    seq = self._take(event)
                    if seq >= 0:
                        self._spool.ack(seq)
                        self.acked += 1
                        # Restart the PUBACK clock: the broker is answering.
                        self._oldest_at = board.ticks_ms() if self._used else None
                    self._fill()
                elif event == PINGRESP:
                    self._ping_at = None
                elif left <= 0:
                    break
            self._keepalive()
        except MQTTError as exc:
            self.drop("connection lost: %s" % exc)

    def _keepalive(self) -> None:
        board = self._board
        now = board.ticks_ms()
        if self._oldest_at is not None and board.ticks_diff(now, self._oldest_at) > _ACK_TIMEOUT_MS:
            raise MQTTError("no PUBACK within %d ms" % _ACK_TIMEOUT_MS)
        if self._ping_at is not None:
            if board.ticks_diff(now, self._ping_at) > self._keepalive_ms // 2:
                raise MQTTError("no PINGRESP within %d ms" % (self._keepalive_ms // 2))
        elif board.ticks_diff(now, self._last_tx) >= self._keepalive_ms // 2:
            assert self._proto is not None
            self._proto.ping()
            self._ping_at = now
            self._last_tx = now
