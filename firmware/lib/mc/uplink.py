"""Keeps the board's MQTT connection, drains the spool through it, frees readings on the agent's word.

The connection keeper around `mc.mqtt.Protocol`: WiFi (re)join, the clock before TLS,
TLS connect with the meter's own credentials, reconnect with capped exponential backoff
and jitter, an in-flight window of QoS 1 publishes matched to their PUBACKs, keepalive
pings, a retained online state with a last will saying "offline", and escalation when
nothing passes (WiFi reset, then a clean reboot).

End-to-end acknowledgement: a broker's PUBACK only frees a slot of the in-flight window.
A reading leaves the spool only when the edge agent, after its durable commit, publishes
the retained message {1: meter id, 2: watermark} on mc/<market>/ack/<meter id>: every
spooled reading with sequence <= watermark is then freed.  On every (re)connect, and
when the watermark has not advanced for `broker.ack_timeout_s` after publishing, the
publish cursor rewinds to watermark + 1 and the rest is sent again (ingest discards
exact duplicates).  A watermark above the highest sequence this board may have
published, a malformed payload or one naming another meter is ignored.

Everything runs in `service(wait_ms)`, called from the app's loop; it returns within
about `wait_ms` (plus a connect attempt, whose steps are each bounded by their own
timeouts, with the watchdog fed between them).
"""

from . import cbor
from .mqtt import MESSAGE, PINGRESP, SUBACK, MQTTError, Protocol
from .porterrors import CONNECT_ERRORS, LINK_ERRORS

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_CONNECT_TIMEOUT_MS = const(10000)
_PUBACK_TIMEOUT_MS = const(30000)  # a PUBACK this late means a broken session: reconnect, resend
_WIFI_TIMEOUT_MS = const(20000)
_WIFI_RESET_FAILURES = const(4)  # consecutive failed attempts before WiFi is reset
_STATUS_PID = const(0xFFFF)  # packet id kept for the online-state publish

STATE_DOWN = "down"
STATE_UP = "up"


class Uplink:
    """Publishes spooled readings to mc/<market>/r/<meter_id>; see the module docstring.

    `published_floor` is the highest sequence number the board may have published before
    this boot (acknowledgements up to it are believed); `clock` (mc.clock.Clock) gates
    TLS until the time is known; `feed` is called between the blocking steps of a connect.
    """

    def __init__(self, board, cfg: dict, spool, log, clock=None, published_floor: int = 0) -> None:
        self._board = board
        self._cfg = cfg
        self._spool = spool
        self._log = log
        self._clock = clock
        meter_id = cfg["meter_id"]
        self._meter_id = meter_id
        market = cfg["market"]
        self.topic = ("mc/%s/r/%s" % (market, meter_id)).encode()
        self.ack_topic = ("mc/%s/ack/%s" % (market, meter_id)).encode()
        self.status_topic = ("mc/%s/status/%s" % (market, meter_id)).encode()
        self._online = cbor.encode({1: meter_id, 2: "online"})
        self._offline = cbor.encode({1: meter_id, 2: "offline"})
        self._window = cfg["broker.inflight"]
        self._keepalive_ms = cfg["broker.keepalive_s"] * 1000
        self._min_ms = cfg["broker.backoff_min_ms"]
        self._max_ms = cfg["broker.backoff_max_ms"]
        self._ack_timeout_ms = cfg["broker.ack_timeout_s"] * 1000
        self._reboot_ms = cfg["broker.reboot_after_s"] * 1000
        self._ca = None
        self._proto = None
        self._link = None
        # In-flight window as fixed slots (packet id, 0 = free -> sequence number),
        # allocated once: publishing and matching PUBACKs allocate nothing.
        self._slot_pid = [0] * self._window
        self._slot_seq = [0] * self._window
        self._used = 0
        self._oldest_at = None  # ticks when the oldest PUBACK-pending publish went out
        self._cursor = 0  # highest sequence number published since the last rewind
        self._max_published = published_floor
        self._waiting_since = None  # ticks: readings above the watermark are out, no ack since
        self._pid = 0
        self._failures = 0
        now = board.ticks_ms()
        self._retry_at = now
        self._last_tx = now
        self._last_good = now  # ticks when the broker last proved that data passes
        self._ping_at = None  # ticks of an unanswered PINGREQ
        self.feed = None
        self.state = STATE_DOWN
        self.watermark = 0  # the agent's committed sequence watermark
        self.reboot_due = False  # nothing passed for broker.reboot_after_s: reboot cleanly
        self.connects = 0
        self.published = 0
        self.acked = 0  # PUBACKs for readings (the broker has them)
        self.freed = 0  # readings freed by the agent's acknowledgement
        self.rewinds = 0
        self.wifi_resets = 0
        self.ignored_acks = 0
        self.last_error = ""

    # -- connection keeping --------------------------------------------------

    def _feed(self) -> None:
        if self.feed is not None:
            self.feed()

    def _ca_data(self):
        if self._ca is None and self._cfg["broker.tls"] and self._cfg["broker.ca"]:
            self._ca = self._board.flash.read(self._cfg["broker.ca"])
        return self._ca

    def join_wifi(self) -> bool:
        """Join WiFi if configured and down (bounded by its timeout); True when usable."""
        cfg = self._cfg
        board = self._board
        if not cfg["wifi.ssid"] or board.wifi_ok():
            return True
        try:
            ok = board.wifi_connect(cfg["wifi.ssid"], cfg["wifi.password"], _WIFI_TIMEOUT_MS)
        except OSError as exc:
            self._log.failing("wifi", "WiFi %s: %s" % (cfg["wifi.ssid"], exc))
            ok = False
        self._feed()
        return ok

    def _connect(self) -> None:
        board = self._board
        cfg = self._cfg
        where = "%s:%d" % (cfg["broker.host"], cfg["broker.port"])
        if not self.join_wifi():
            self._failed("WiFi %s not joined" % cfg["wifi.ssid"])
            return
        clock = self._clock
        if cfg["broker.tls"] and clock is not None and not clock.synced:
            # Certificates carry validity dates: with the RTC at 2000-01-01 every handshake
            # fails, so ask NTP first (and spend no 36 KB on a doomed handshake).
            clock.try_now()
            self._feed()
            if not clock.synced:
                self._failed("TLS to %s waits for the clock (no NTP answer yet)" % where)
                return
        link = None
        try:
            ca = self._ca_data()
            link = board.connect(cfg["broker.host"], cfg["broker.port"], cfg["broker.tls"], ca,
                                 _CONNECT_TIMEOUT_MS)
        except CONNECT_ERRORS as exc:
            # DNS, TCP, TLS (ValueError for a certificate it refuses) or the heap: the
            # link failed this time; sampling goes on and the next attempt backs off.
            self._ca = None
            self._failed("connect to %s failed: %s: %s" % (where, type(exc).__name__, exc))
            return
        self._feed()
        proto = Protocol(
            link, self._meter_id, cfg["broker.username"], cfg["broker.password"],
            cfg["broker.keepalive_s"], will_topic=self.status_topic, will_payload=self._offline,
        )
        try:
            proto.connect(_CONNECT_TIMEOUT_MS, board)
            self._feed()
            proto.subscribe(self.ack_topic, self._next_pid())
            proto.publish(self.status_topic, self._online, _STATUS_PID, retain=True)
        except MQTTError as exc:
            self._close_link(link)
            self._failed("MQTT connect to %s: %s" % (where, exc))
            return
        self._link = link
        self._proto = proto
        self._clear_slots()
        self._oldest_at = None
        self._rewind()
        now = board.ticks_ms()
        self._last_tx = now
        self._ping_at = None
        self.state = STATE_UP
        self.connects += 1
        self._log.recovered("uplink", "connected to %s" % where)

    def _close_link(self, link) -> None:
        try:
            link.close()
        except LINK_ERRORS:
            pass

    def _failed(self, why: str) -> None:
        """Count a failure, escalate when nothing passes, schedule the next attempt
        (capped exponential backoff with jitter)."""
        board = self._board
        self._failures += 1
        self.last_error = why
        self._log.failing("uplink", why)
        now = board.ticks_ms()
        if self._cfg["wifi.ssid"] and self._failures % _WIFI_RESET_FAILURES == 0:
            # WiFi may say "connected" while nothing passes (a stale association, a dead
            # access point uplink): drop it and join afresh on the next attempt.
            self.wifi_resets += 1
            self._log.error("uplink: %d failures in a row, resetting WiFi" % self._failures)
            try:
                board.wifi_reset()
            except OSError:
                pass
        if self._reboot_ms and board.ticks_diff(now, self._last_good) >= self._reboot_ms:
            self.reboot_due = True
        shift = self._failures - 1 if self._failures < 21 else 20
        delay = self._min_ms << shift
        if delay > self._max_ms:
            delay = self._max_ms
        # "Equal jitter": at least half the delay, so a fleet that lost its broker at the
        # same moment does not come back in one burst, and none retries too eagerly.
        rand = int.from_bytes(board.urandom(4), "big")
        delay = delay // 2 + rand % (delay // 2 + 1)
        self._retry_at = board.ticks_add(now, delay)

    def _healthy(self) -> None:
        """The broker answered on this session: data passes."""
        self._last_good = self._board.ticks_ms()
        self._failures = 0

    def drop(self, why: str) -> None:
        """Close the connection; unacknowledged readings stay spooled for the next one."""
        if self._link is not None:
            self._close_link(self._link)
        self._link = None
        self._proto = None
        self._clear_slots()
        self._oldest_at = None
        self.state = STATE_DOWN
        self._failed(why)

    def close(self) -> None:
        """Orderly shutdown: offline state, DISCONNECT, close (the spool keeps the rest)."""
        proto = self._proto
        if proto is not None:
            try:
                # A clean DISCONNECT discards the will: say "offline" ourselves.
                proto.publish(self.status_topic, self._offline, _STATUS_PID, retain=True)
            except MQTTError:
                pass
            proto.disconnect()
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
            self._pid = self._pid + 1 if self._pid < 0xFFFE else 1
            if self._pid not in self._slot_pid:
                return self._pid

    def _rewind(self) -> None:
        """Publish again from watermark + 1 (after a connect, or when no ack came)."""
        self._cursor = self.watermark
        self._waiting_since = None

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
            now = self._board.ticks_ms()
            self._last_tx = now
            if self._oldest_at is None:
                self._oldest_at = now
            if self._waiting_since is None:
                self._waiting_since = now
            if seq > self._max_published:
                self._max_published = seq
            self.published += 1

    def inflight(self) -> int:
        return self._used

    def caught_up(self) -> bool:
        """Connected, every spooled reading published and PUBACKed (the agent may still owe its ack)."""
        return self._proto is not None and not self._used and self._spool.next_unsent(self._cursor) < 0

    def on_ack(self, payload) -> bool:
        """Apply an acknowledgement payload; True if it advanced the watermark."""
        try:
            doc = cbor.decode(payload)
        except ValueError:
            doc = None
        mark = doc.get(2) if isinstance(doc, dict) and len(doc) == 2 and doc.get(1) == self._meter_id else None
        if not isinstance(mark, int) or isinstance(mark, bool) or mark < 0:
            self.ignored_acks += 1
            self._log.error("ignored a malformed acknowledgement (or one for another meter)")
            return False
        if mark > self._max_published:
            # Cannot acknowledge what was never sent: a stale, forged or buggy watermark.
            self.ignored_acks += 1
            self._log.error("ignored acknowledgement %d: the highest sequence published is %d"
                            % (mark, self._max_published))
            return False
        self._healthy()
        if mark <= self.watermark:
            return False
        self.watermark = mark
        self.freed += self._spool.ack_through(mark)
        if self._cursor < mark:
            self._cursor = mark
        self._waiting_since = self._board.ticks_ms() if self._cursor > mark else None
        if self._log.is_failing("ack"):
            self._log.recovered("ack", "the edge agent acknowledges again (up to %d)" % mark)
        return True

    def service(self, wait_ms: int) -> None:
        """Connect if due, publish what the window allows, and read the broker for `wait_ms`."""
        board = self._board
        if self._reboot_ms and board.ticks_diff(board.ticks_ms(), self._last_good) >= self._reboot_ms:
            self.reboot_due = True  # checked here too: backoff may space attempts minutes apart
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
                        self.acked += 1
                        self._healthy()
                        # Restart the PUBACK clock: the broker is answering.
                        self._oldest_at = board.ticks_ms() if self._used else None
                    self._fill()
                elif event == PINGRESP:
                    self._ping_at = None
                    self._healthy()
                elif event == SUBACK:
                    if proto.granted & 0x80:
                        self._log.failing("ack", "the broker refused the subscription to %s "
                                          "(ACL?): readings are resent, never freed"
                                          % self.ack_topic.decode())
                elif event == MESSAGE:
                    if proto.topic == self.ack_topic:
                        self.on_ack(proto.payload)
                    self._fill()
                elif left <= 0:
                    break
            self._keepalive()
        except MQTTError as exc:
            self.drop("connection lost: %s" % exc)
        except LINK_ERRORS as exc:
            # The heap, or flash refusing to re-read a spooled reading: start afresh later.
            self.drop("uplink error: %s: %s" % (type(exc).__name__, exc))

    def _keepalive(self) -> None:
        board = self._board
        now = board.ticks_ms()
        if self._oldest_at is not None and board.ticks_diff(now, self._oldest_at) > _PUBACK_TIMEOUT_MS:
            raise MQTTError("no PUBACK within %d ms" % _PUBACK_TIMEOUT_MS)
        if self._waiting_since is not None and board.ticks_diff(now, self._waiting_since) >= self._ack_timeout_ms:
            self.rewinds += 1
            self._log.failing("ack", "no acknowledgement from the edge agent for %d s: "
                              "republishing from %d" % (self._ack_timeout_ms // 1000, self.watermark + 1))
            self._rewind()
            self._fill()
        if self._reboot_ms and board.ticks_diff(now, self._last_good) >= self._reboot_ms:
            self.reboot_due = True
        if self._ping_at is not None:
            if board.ticks_diff(now, self._ping_at) > self._keepalive_ms // 2:
                raise MQTTError("no PINGRESP within %d ms" % (self._keepalive_ms // 2))
        elif board.ticks_diff(now, self._last_tx) >= self._keepalive_ms // 2:
            assert self._proto is not None
            self._proto.ping()
            self._ping_at = now
            self._last_tx = now
