"""The meter board's application: sample → reading → COSE_Sign1 → spool → publish, forever.

`main(board)` loads and validates the configuration and the key; any problem puts the
board in safe mode (a clear console message naming the bad key, no sampling, no
publishing, the REPL stays reachable for a fix).  Otherwise `App.run()` loops: every
interval it samples the meter and signs a reading; in between it keeps the uplink
draining the spool, polls the meter, syncs the clock, batches spool writes, saves
persisted totals and feeds the watchdog.

The board object is the HAL (`mc.hal.Board` on hardware, a fake or an emulated board
elsewhere); nothing here imports `machine`.
"""

import gc
import sys
from binascii import hexlify

from . import cose, reading
from .clock import Clock
from .errors import ConfigError
from .log import Log
from .meters import MeterError
from .meters import make as make_meter
from .porterrors import PERIPHERAL_ERRORS
from .seqno import Sequencer
from .slots import SlotStore
from .spool import Spool, SpoolError
from .uplink import Uplink

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


VERSION = "0.1.0"
# A small MicroPython heap wants a collection after each reading (less fragmentation);
# CPython (the emulated board) collects by itself, and a full collection there is costly.
_COLLECT = sys.implementation.name == "micropython"
_SLICE_MS = const(1000)  # longest wait between watchdog feeds and housekeeping
_POLL_MS = const(5000)  # meter poll cadence between samples
_DRAIN_MS = const(10000)  # how long a finite run waits for the last acknowledgements


class App:
    def __init__(self, board, cfg: dict, secret: int, log=None, interval_ms=None) -> None:
        self.board = board
        self.cfg = cfg
        self.log = log if log is not None else Log(board)
        flash = board.flash
        self.spool = Spool(flash, cfg["spool.max_records"])
        self.seq = Sequencer(flash, cfg["seq_block"], floor=self.spool.max_seq + 1)
        self.meter = make_meter(board, cfg, flash)
        self.clock = Clock(board, cfg["ntp.host"], cfg["ntp.resync_s"], self.log)
        if cfg["broker.tls"] and not flash.exists(cfg["broker.ca"]):
            raise ConfigError(
                "config.json", "broker.ca", "%s not found in flash: the board cannot verify "
                "the broker (provision with --broker-ca)" % cfg["broker.ca"]
            )
        # Acknowledgements up to the last number reserved before this boot are believable.
        self.uplink = Uplink(board, cfg, self.spool, self.log, self.clock, self.seq.peek() - 1)
        self._last = SlotStore(flash, "last")  # last good (import Wh, export Wh)
        self._good = self._last.values
        self._saved_good = self._good
        self._secret = secret
        self._meter_id = cfg["meter_id"]
        self._kid = self._meter_id.encode()
        self._source = cfg["source"]
        self.interval_ms = cfg["interval_s"] * 1000 if interval_ms is None else interval_ms
        self._batch = cfg["spool.batch"]
        self._flush_ms = cfg["spool.flush_s"] * 1000
        self._persist_ms = cfg["persist_s"] * 1000
        self._print = cfg["console_readings"]
        self._tamper = board.pin_in(cfg["tamper_pin"]) if cfg["tamper_pin"] >= 0 else None
        self._dirty_since = None
        self._persist_at = board.ticks_add(board.ticks_ms(), self._persist_ms)
        self.readings = 0
        self.read_errors = 0
        self.skipped = 0  # samples lost because flash refused the sequence reservation
        self.last_seq = 0
        if self.spool.repaired:
            self.log.info("spool: cut a torn tail of %d bytes" % self.spool.repaired)
        self.log.info(
            "meter %s market %s: %d readings spooled, next seq %d"
            % (self._meter_id, cfg["market"], len(self.spool), self.seq.peek())
        )

    # -- one reading -----------------------------------------------------------

    def sample(self) -> int:
        """Read the meter, then build, sign and spool one reading; its sequence number (-1: none)."""
        flags = self.clock.flags()
        try:
            import_wh, export_wh, power_w, meter_flags = self.meter.sample()
            if import_wh < 0 or export_wh < 0:
                raise MeterError("negative energy register")
            flags |= meter_flags
            bound = reading.MAX_POWER_W
            if power_w > bound or power_w < -bound:
                # Beyond what any verifier accepts (a scaling bug or a broken meter): keep
                # the reading, clamp the power and say so.
                power_w = bound if power_w > 0 else -bound
                flags |= reading.FLAG_METER_READ_ERROR
            good = self._good
            if good is not None and (import_wh < good[0] or export_wh < good[1]):
                flags |= reading.FLAG_COUNTER_RESET  # a swapped or reset meter
            self._good = (import_wh, export_wh)
            if self.log.is_failing("meter"):
                self.log.recovered("meter", "meter reads again")
        except MeterError as exc:
            # No made-up values: repeat the last good registers, report no power, flag it.
            self.read_errors += 1
            self.log.failing("meter", "meter read failed: %s" % exc)
            flags |= reading.FLAG_METER_READ_ERROR
            good = self._good if self._good is not None else (0, 0)
            import_wh, export_wh, power_w = good[0], good[1], 0
        if self._tamper is not None and self._tamper.value():
            flags |= reading.FLAG_TAMPER  # enclosure switch open (pulled high)
        if self.spool.take_overflow():
            flags |= reading.FLAG_SPOOL_OVERFLOW
            self.log.error("spool full: oldest readings thinned, %d dropped so far" % self.spool.dropped)
        try:
            seq = self.seq.next()
        except OSError as exc:
            # No durable reservation, no number (a repeat would be worse than a gap): this
            # sample is lost, the cumulative registers carry its energy into the next one.
            self.skipped += 1
            self.log.failing("seq", "sequence reservation failed (flash): %s" % exc)
            return -1
        if self.log.is_failing("seq"):
            self.log.recovered("seq", "sequence reservations work again")
        payload = reading.encode(
            self._meter_id, seq, self.clock.now(), import_wh, export_wh, power_w, flags,
            self._source,
        )
        signed = cose.sign1(payload, self._secret, self._kid)
        try:
            self.spool.add(seq, signed)
        except SpoolError as exc:
            self.log.failing("spool", "reading %d not spooled: %s" % (seq, exc))
        self.readings += 1
        self.last_seq = seq
        if self._print:
            # The whole signed reading, so `meterchain board monitor --port` can verify it.
            self.board.console("MC-R " + hexlify(signed).decode())
        return seq

    # -- housekeeping ----------------------------------------------------------

    def commit(self) -> None:
        try:
            self.spool.commit()
        except SpoolError as exc:
            self.log.failing("spool", "spool write failed: %s" % exc)
            return
        if self.log.is_failing("spool"):
            self.log.recovered("spool", "spool writes again")

    def persist(self) -> None:
        """Save totals the board accumulates itself (S0, ATM90E32) and the last good registers."""
        try:
            self.meter.persist()
            if self._good is not None and self._good != self._saved_good:
                self._last.save(self._good)
                self._saved_good = self._good
        except OSError as exc:
            self.log.failing("persist", "saving counters failed: %s" % exc)

    def housekeeping(self) -> None:
        board = self.board
        now = board.ticks_ms()
        if self.spool.dirty():
            if self._dirty_since is None:
                self._dirty_since = now
            if self.spool.needs_commit(self._batch) or board.ticks_diff(now, self._dirty_since) >= self._flush_ms:
                self.commit()
                self._dirty_since = None
        else:
            self._dirty_since = None
        if board.ticks_diff(now, self._persist_at) >= 0:
            self.persist()
            self._persist_at = board.ticks_add(now, self._persist_ms)
        self.clock.service()

    # -- the loop --------------------------------------------------------------

    def run(self, cycles=None, watchdog=None) -> None:
        """Sample every interval; `cycles` readings then drain and stop (None: forever).

        Start-up order: the first reading at once (sampling never waits for the network),
        then WiFi and the clock, then the broker (TLS needs the time).
        """
        board = self.board
        wdt = watchdog
        if wdt is None and self.cfg["wdt_s"]:
            wdt = board.watchdog(self.cfg["wdt_s"] * 1000)
        uplink = self.uplink
        if wdt is not None:
            uplink.feed = wdt.feed
        interval = self.interval_ms
        next_sample = board.ticks_ms()
        next_poll = board.ticks_add(next_sample, _POLL_MS)
        done = 0
        started = False
        while cycles is None or done < cycles:
            now = board.ticks_ms()
            if board.ticks_diff(now, next_sample) >= 0:
                self.sample()
                done += 1
                next_sample = board.ticks_add(next_sample, interval)
                if board.ticks_diff(next_sample, now) < 0:
                    next_sample = board.ticks_add(now, interval)  # fell behind: no burst
                next_poll = board.ticks_add(now, _POLL_MS)
                if _COLLECT:
                    gc.collect()
            elif board.ticks_diff(now, next_poll) >= 0:
                try:
                    self.meter.poll()
                except MeterError:
                    pass  # the next sample reports the failure
                next_poll = board.ticks_add(now, _POLL_MS)
            if not started:
                started = True
                uplink.join_wifi()  # bounded; the clock needs it, the broker comes later
            self.housekeeping()
            if wdt is not None:
                wdt.feed()
            if uplink.reboot_due:
                self.reboot("nothing passed the uplink for %d s" % self.cfg["broker.reboot_after_s"])
            wait = board.ticks_diff(next_sample, board.ticks_ms())
            if cycles is not None and done >= cycles:
                wait = 0
            wait = min(max(wait, 0), _SLICE_MS, max(board.ticks_diff(next_poll, board.ticks_ms()), 0))
            uplink.service(wait)
        if cycles is not None:
            self.drain(_DRAIN_MS, wdt)
            self.shutdown()

    def reboot(self, why: str) -> None:
        """A clean reboot: everything durable first (the spool survives), then reset."""
        self.log.error("rebooting: %s" % why)
        self.shutdown()
        self.board.reset()

    def drain(self, timeout_ms: int, wdt=None) -> None:
        """Keep publishing until the agent acknowledged every reading or `timeout_ms` passed."""
        board = self.board
        deadline = board.ticks_add(board.ticks_ms(), timeout_ms)
        while len(self.spool) and board.ticks_diff(deadline, board.ticks_ms()) > 0:
            if wdt is not None:
                wdt.feed()
            # Short waits: return as soon as the last PUBACK is in.
            self.uplink.service(min(50, max(board.ticks_diff(deadline, board.ticks_ms()), 0)))
            self.housekeeping()

    def shutdown(self) -> None:
        """Make everything durable and close the connection (a clean stop, not a power cut)."""
        self.commit()
        self.persist()
        self.uplink.close()


def _unload(*names) -> None:
    """Drop boot-only modules (their code and tables) from RAM; the sampling loop never
    needs them again.  Saves several KB on a board that loads .mpy files."""
    import mc

    for name in names:
        sys.modules.pop("mc." + name, None)
        if name in mc.__dict__:
            del mc.__dict__[name]


def safe_mode(board, exc) -> None:
    """Tell the operator what is wrong and stay idle (no sampling, no publishing)."""
    board.console("MC SAFE MODE: %s" % exc)
    board.console("MC SAFE MODE: not sampling or publishing; fix it (mpremote / "
                  "`meterchain board provision`) and reset the board")


def boot(board, interval_ms=None):
    """Load and validate config and key, build the App; None (after the message) in safe mode."""
    from . import config, keystore, p256

    log = Log(board)
    log.info("MeterChain meter firmware %s, reset cause: %s" % (VERSION, board.reset_cause()))
    # The signer's 16 KB table first, while the heap is empty: built at the first reading
    # it needs ~44 KB of temporary heap between live objects (measured: a board survives
    # in 53 KB instead of 66 KB frozen, 96 KB instead of 117 KB from .mpy).
    try:
        p256.precompute()
    except MemoryError:
        log.error("no heap for the signing table now: the first signature builds it")
    if _COLLECT:
        gc.collect()
    try:
        cfg = config.load(board.flash)
        secret = keystore.load(board.flash)
        app = App(board, cfg, secret, log, interval_ms)
    except ConfigError as exc:
        safe_mode(board, exc)
        return None
    except PERIPHERAL_ERRORS as exc:
        # A pin or bus this chip lacks (ValueError from machine) or flash that refuses
        # to open the spool: stay reachable instead of restart-looping.
        safe_mode(board, "%s: %s" % (type(exc).__name__, exc))
        return None
    if _COLLECT:
        _unload("config", "keystore")
        gc.collect()
    return app


def main(board, cycles=None, interval_ms=None) -> int:
    """Start the board: 0 after a finite run, 2 in safe mode (never returns otherwise)."""
    app = boot(board, interval_ms)
    if app is None:
        return 2
    app.run(cycles)
    return 0
