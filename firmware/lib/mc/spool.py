"""Crash-safe store-and-forward spool of signed readings in the board's flash.

Layout: one append-only log file of records

    0xA5 | kind (1) | body length (2) | seq (4) | body | CRC-32 of kind..body (4)

with kinds R (a signed reading), A (the reading `seq` was acknowledged by the edge agent)
and M (spool counters: readings dropped by thinning, overflow flag pending).

- A reading is deleted only after the edge agent acknowledged it end to end (its
  committed watermark, see mc.uplink): `ack()` / `ack_through()` mark it, the next
  `commit()` appends an A record, and compaction later rewrites the log without it.
- Writes are batched: new readings wait in RAM until `commit()`, which the app calls
  once `batch` readings are waiting (or a deadline passes).  A reading acknowledged
  while still in RAM never touches flash, so a board with a healthy uplink writes
  almost nothing.  A reading is "kept" once `commit()` has returned.
- On open the log is scanned; the first record that is short, has a bad magic or a bad
  CRC ends it (a torn tail from a power cut) and the log is rewritten without the tail.
  Compaction writes a new file and renames it over the log, so a power cut leaves
  either the old or the new log, never a mix.
- Bounded: at `max_records` live readings the oldest half is thinned (every second
  reading dropped; the energy registers are cumulative, so the totals stay exact and
  only resolution is lost), `dropped` counts them and `overflow` asks the app to flag
  the next reading with FLAG_SPOOL_OVERFLOW.

RAM: an index of 10 bytes per durable reading plus one record buffer.
"""

import struct
from array import array
from binascii import crc32

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_MAGIC = const(0xA5)
_KIND_READING = const(0x52)
_KIND_ACK = const(0x41)
_KIND_META = const(0x4D)
_HDR = ">BBHI"
_HDR_LEN = const(8)
_CRC_LEN = const(4)
_META_LEN = const(5)
_DEAD = const(0xFFFFFFFF)
_ACK_BATCH = const(32)  # acknowledgements buffered before they force a write
_COMPACT_MIN = const(4096)  # dead bytes worth a rewrite of the log


class SpoolError(Exception):
    """A reading cannot be stored (too large, or flash refused the write)."""


class Spool:
    """The spool in `flash` under `<name>.log`; see the module docstring."""

    def __init__(self, flash, max_records: int = 512, record_max: int = 480, name: str = "spool"):
        if max_records < 4:
            raise ValueError("max_records must be >= 4")
        self._flash = flash
        self._log = name + ".log"
        self._new = name + ".new"
        self._max = max_records
        self._record_max = record_max
        self._buf = bytearray(_HDR_LEN + record_max + _CRC_LEN)
        self._mv = memoryview(self._buf)
        self._seqs = array("I")
        self._offs = array("I")
        self._lens = array("H")
        self._live = 0  # durable readings not yet acknowledged
        self._end = 0  # bytes of valid log
        self._dead = 0  # bytes of log that compaction would drop
        self._pending = []  # [seq, bytes] waiting for commit, in sequence order
        self._acks = []  # seqs of durable readings acknowledged since the last commit
        self._meta_dirty = False
        self._torn = False  # a write failed part-way: rewrite before appending again
        self.dropped = 0  # readings removed by thinning, over the board's life
        self.overflow = False  # the next reading must carry FLAG_SPOOL_OVERFLOW
        self.max_seq = 0  # highest sequence number ever stored
        self.repaired = 0  # bytes of torn tail cut at open
        self.corrupt = 0  # readings dropped because they failed their CRC on re-read
        self._open()

    # -- state ---------------------------------------------------------------

    def __len__(self) -> int:
        """Readings not yet acknowledged (durable and in RAM)."""
        return self._live + len(self._pending)

    @property
    def durable_count(self) -> int:
        return self._live

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def needs_commit(self, batch: int) -> bool:
        """True once `batch` readings wait in RAM or enough acknowledgements piled up."""
        return len(self._pending) >= batch or len(self._acks) >= _ACK_BATCH

    def dirty(self) -> bool:
        return bool(self._pending or self._acks or self._meta_dirty or self._torn)

    # -- open / scan ---------------------------------------------------------

    def _open(self) -> None:
        flash = self._flash
        if flash.exists(self._new):
            if flash.exists(self._log):
                flash.remove(self._new)  # a compaction that never reached its rename
            else:
                # Only a complete new log is ever renamed; a missing log means the
                # rename fallback (remove, rename) was cut between its two steps.
                flash.replace(self._new, self._log)
        size = flash.size(self._log)
        if size <= 0:
            return
        end = 0
        with flash.open(self._log, "rb") as f:
            while True:
                total = self._read_record(f, end, size)
                if total <= 0:
                    total = self._corrupt_length(f, end, size)
                    if total <= 0:
                        break  # the torn tail of an interrupted write
                    self.corrupt += 1  # damaged in place: skip it, keep what follows
                    self._dead += total
                else:
                    self._apply(end, total)
                end += total
                f.seek(end)
        self._end = end
        if end < size:
            self.repaired = size - end
            self._torn = True  # appending after the torn tail would be lost at the next open
            self._try_compact()

    def _read_record(self, f, off: int, size: int) -> int:
        """Read the record at `off` into the buffer; its total size, or 0 if invalid."""
        mv = self._mv
        if off + _HDR_LEN + _CRC_LEN > size:
            return 0
        if f.readinto(mv[:_HDR_LEN]) != _HDR_LEN:
            return 0
        magic, _, length, _ = struct.unpack_from(_HDR, self._buf, 0)
        if magic != _MAGIC or length > self._record_max:
            return 0
        total = _HDR_LEN + length + _CRC_LEN
        if off + total > size:
            return 0
        if f.readinto(mv[_HDR_LEN:total]) != total - _HDR_LEN:
            return 0
        end = _HDR_LEN + length
        if struct.unpack_from(">I", self._buf, end)[0] != crc32(mv[1:end]) & 0xFFFFFFFF:
            return 0
        return total

    def _corrupt_length(self, f, off: int, size: int) -> int:
        """Length of a record at `off` that fails its CRC but is followed by a valid one.

        A power cut can only tear the last record; a bad record with a good one after it
        was damaged in place (bit rot), so only it is dropped.  0 when that is not the case.
        """
        f.seek(off)
        if f.readinto(self._mv[:_HDR_LEN]) != _HDR_LEN:
            return 0
        magic, _, length, _ = struct.unpack_from(_HDR, self._buf, 0)
        total = _HDR_LEN + length + _CRC_LEN
        if magic != _MAGIC or length > self._record_max or off + total >= size:
            return 0
        f.seek(off + total)
        return total if self._read_record(f, off + total, size) > 0 else 0

    def _apply(self, off: int, total: int) -> None:
        _, kind, length, seq = struct.unpack_from(_HDR, self._buf, 0)
        if kind == _KIND_READING:
            self._seqs.append(seq)
            self._offs.append(off)
            self._lens.append(total)
            self._live += 1
            if seq > self.max_seq:
                self.max_seq = seq
        elif kind == _KIND_ACK:
            self._dead += total
            i = self._find(seq)
            if i >= 0:
                self._kill(i)
        elif kind == _KIND_META and length == _META_LEN:
            self._dead += total  # superseded by the next M record or a rewrite
            self.dropped, overflow = struct.unpack_from(">IB", self._buf, _HDR_LEN)
            self.overflow = bool(overflow)
            if seq > self.max_seq:
                self.max_seq = seq

    # -- index ---------------------------------------------------------------

    def _find(self, seq: int) -> int:
        """Index of the live durable reading `seq`, or -1 (binary search: seqs ascend)."""
        seqs = self._seqs
        lo = 0
        hi = len(seqs)
        while lo < hi:
            mid = (lo + hi) >> 1
            if seqs[mid] < seq:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(seqs) and seqs[lo] == seq and self._offs[lo] != _DEAD:
            return lo
        return -1

    def _kill(self, i: int) -> None:
        self._offs[i] = _DEAD
        self._dead += self._lens[i]
        self._live -= 1

    # -- readings ------------------------------------------------------------

    def add(self, seq: int, data) -> None:
        """Queue a signed reading; it is kept (survives power loss) after the next commit()."""
        if len(data) > self._record_max:
            raise SpoolError("reading of %d bytes exceeds the spool record size" % len(data))
        if len(self) >= self._max:
            self._thin()
        self._pending.append([seq, data])
        if seq > self.max_seq:
            self.max_seq = seq

    def ack_through(self, seq: int) -> int:
        """The edge agent committed everything up to `seq`: forget those; how many went.

        One pass over the index (sequence numbers ascend), so a watermark that covers a
        full spool after an outage costs O(n), not O(n^2).
        """
        n = 0
        seqs = self._seqs
        offs = self._offs
        for i in range(len(seqs)):
            if seqs[i] > seq:
                break
            if offs[i] != _DEAD:
                self._kill(i)
                self._acks.append(seqs[i])
                n += 1
        pending = self._pending
        if pending and pending[0][0] <= seq:
            kept = [rec for rec in pending if rec[0] > seq]
            n += len(pending) - len(kept)
            self._pending = kept
        return n

    def ack(self, seq: int) -> bool:
        """The edge agent acknowledged `seq`: forget it.  False if it is not (or no longer) here."""
        pending = self._pending
        for i in range(len(pending)):
            if pending[i][0] == seq:
                pending.pop(i)
                return True
        i = self._find(seq)
        if i < 0:
            return False
        self._kill(i)
        self._acks.append(seq)
        return True

    def next_unsent(self, after: int) -> int:
        """Lowest stored sequence number above `after`, or -1 (durable ones are all older)."""
        seqs = self._seqs
        offs = self._offs
        lo = 0
        hi = len(seqs)
        while lo < hi:
            mid = (lo + hi) >> 1
            if seqs[mid] <= after:
                lo = mid + 1
            else:
                hi = mid
        while lo < len(seqs):
            if offs[lo] != _DEAD:
                return seqs[lo]
            lo += 1
        for rec in self._pending:
            if rec[0] > after:
                return rec[0]
        return -1

    def payload(self, seq: int):
        """The signed reading `seq` (valid until the next spool call), or None if gone.

        A durable reading is re-read from flash and re-checked against its CRC; one that
        fails is dropped and counted in `corrupt` rather than sent.
        """
        for rec in self._pending:
            if rec[0] == seq:
                return rec[1]
        i = self._find(seq)
        if i < 0:
            return None
        total = self._lens[i]
        with self._flash.open(self._log, "rb") as f:
            f.seek(self._offs[i])
            ok = self._read_record(f, self._offs[i], self._end) == total
        if not ok or struct.unpack_from(_HDR, self._buf, 0)[3] != seq:
            self._kill(i)
            self.corrupt += 1
            return None
        return self._mv[_HDR_LEN : total - _CRC_LEN]

    def take_overflow(self) -> bool:
        """True once after thinning: the caller flags its next reading FLAG_SPOOL_OVERFLOW."""
        if not self.overflow:
            return False
        self.overflow = False
        self._meta_dirty = True
        return True

    # -- writing -------------------------------------------------------------

    def _record(self, kind: int, seq: int, body) -> int:
        """Frame one record in the buffer; returns its total length."""
        n = 0
        if body is not None:
            n = len(body)
            self._mv[_HDR_LEN : _HDR_LEN + n] = body
        struct.pack_into(_HDR, self._buf, 0, _MAGIC, kind, n, seq)
        end = _HDR_LEN + n
        struct.pack_into(">I", self._buf, end, crc32(self._mv[1:end]) & 0xFFFFFFFF)
        return end + _CRC_LEN

    def _meta_body(self) -> bytes:
        return struct.pack(">IB", self.dropped, 1 if self.overflow else 0)

    def commit(self) -> None:
        """Make every queued reading, acknowledgement and counter durable, in one append.

        Raises SpoolError if flash refused the write (or the rewrite a failed write or a
        failed compaction left due); nothing already kept is lost and the queued readings
        stay queued for the next attempt.  Never raises OSError.
        """
        if self._torn and not self._try_compact():
            raise SpoolError("flash refused the spool rewrite")
        if not (self._pending or self._acks or self._meta_dirty):
            return
        if not self._pending and self._live == 0:
            # Everything durable has been acknowledged: a rewrite is shorter than tombstones.
            if not self._try_compact():
                raise SpoolError("flash refused the spool rewrite")
            return
        off = self._end
        added = []
        try:
            with self._flash.open(self._log, "ab") as f:
                for seq in self._acks:
                    n = self._record(_KIND_ACK, seq, None)
                    f.write(self._mv[:n])
                    off += n
                    self._dead += n
                if self._meta_dirty:
                    n = self._record(_KIND_META, self.max_seq, self._meta_body())
                    f.write(self._mv[:n])
                    off += n
                    self._dead += n
                for rec in self._pending:
                    n = self._record(_KIND_READING, rec[0], rec[1])
                    f.write(self._mv[:n])
                    added.append((rec[0], off, n))
                    off += n
                self._flash.durable(f)
        except OSError as exc:
            self._torn = True
            raise SpoolError("flash write failed: %s" % exc)
        for seq, o, n in added:
            self._seqs.append(seq)
            self._offs.append(o)
            self._lens.append(n)
        self._live += len(added)
        self._end = off
        self._pending = []
        self._acks = []
        self._meta_dirty = False
        if self._dead >= _COMPACT_MIN and self._dead * 2 >= self._end:
            self._try_compact()  # the append is durable either way; a failure retries later

    def _try_compact(self) -> bool:
        """Compact; on a flash error keep the log as it is and retry before the next append."""
        try:
            self._compact()
            return True
        except OSError:
            self._torn = True
            return False

    def _compact(self) -> None:
        """Rewrite the log with only the live readings (and counters), then swap it in."""
        flash = self._flash
        if self._live == 0 and not self.dropped and not self.overflow:
            flash.remove(self._log)
            self._reset_index(array("I"), array("I"), array("H"), 0)
            return
        seqs = array("I")
        offs = array("I")
        lens = array("H")
        off = 0
        src = flash.open(self._log, "rb") if self._live else None
        try:
            with flash.open(self._new, "wb") as out:
                n = self._record(_KIND_META, self.max_seq, self._meta_body())
                out.write(self._mv[:n])
                off += n
                for i in range(len(self._seqs)):
                    if self._offs[i] == _DEAD or src is None:
                        continue
                    src.seek(self._offs[i])
                    n = self._read_record(src, self._offs[i], self._end)
                    if n != self._lens[i]:
                        self.corrupt += 1  # bit rot since it was written: do not copy it
                        continue
                    out.write(self._mv[:n])
                    seqs.append(self._seqs[i])
                    offs.append(off)
                    lens.append(n)
                    off += n
                flash.durable(out)
        finally:
            if src is not None:
                src.close()
        flash.replace(self._new, self._log)
        self._reset_index(seqs, offs, lens, off)

    def _reset_index(self, seqs, offs, lens, end: int) -> None:
        self._seqs = seqs
        self._offs = offs
        self._lens = lens
        self._live = len(seqs)
        self._end = end
        self._dead = 0
        self._torn = False
        self._acks = []  # the rewritten log no longer holds the acknowledged readings
        self._meta_dirty = False  # the rewrite carries the current counters

    def _thin(self) -> None:
        """Drop every second reading of the oldest half; count them and raise the flag."""
        half = len(self) // 2
        k = 0
        for i in range(len(self._seqs)):
            if k >= half:
                break
            if self._offs[i] == _DEAD:
                continue
            if k & 1:
                self._kill(i)
                self.dropped += 1
            k += 1
        if k < half:
            # The oldest half reaches into RAM: thin the queued readings the same way.
            kept = []
            for rec in self._pending:
                if k < half and k & 1:
                    self.dropped += 1
                else:
                    kept.append(rec)
                k += 1
            self._pending = kept
        self.overflow = True
        self._meta_dirty = True
        self._try_compact()
