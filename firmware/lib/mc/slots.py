"""Small crash-safe state records in flash: two alternating slots, each with a counter and a CRC.

A save writes the slot that does *not* hold the newest record, so a power cut in the
middle of a write can only tear the older copy; load picks the valid slot with the
highest counter.  Used for sequence-number reservations and persisted meter totals,
which are a few integers written far less often than readings.
"""

import struct
from binascii import crc32

_MAGIC = b"MCS1"
_HEAD = ">4sIB"  # magic, write counter, number of values
_HEAD_LEN = 9


class SlotStore:
    """Up to 16 unsigned 64-bit integers kept in `<name>.a` / `<name>.b`."""

    def __init__(self, flash, name: str) -> None:
        self._flash = flash
        self._names = (name + ".a", name + ".b")
        self._counter = 0
        self._newest = 1  # index of the slot holding the newest record
        self.values = None  # tuple of ints once loaded and valid
        self._load()

    def _parse(self, data):
        if data is None or len(data) < _HEAD_LEN + 4:
            return None
        magic, counter, n = struct.unpack_from(_HEAD, data, 0)
        end = _HEAD_LEN + 8 * n
        if magic != _MAGIC or n > 16 or len(data) != end + 4:
            return None
        if struct.unpack_from(">I", data, end)[0] != crc32(data[:end]) & 0xFFFFFFFF:
            return None
        return counter, struct.unpack_from(">%dQ" % n, data, _HEAD_LEN)

    def _load(self) -> None:
        best = None
        for i in (0, 1):
            rec = self._parse(self._flash.read(self._names[i]))
            if rec is not None and (best is None or rec[0] > best[0]):
                best = (rec[0], rec[1], i)
        if best is not None:
            self._counter, self.values, self._newest = best

    def save(self, values) -> None:
        """Persist `values` durably; returns only after the write reached flash."""
        n = len(values)
        counter = self._counter + 1
        buf = bytearray(_HEAD_LEN + 8 * n + 4)
        struct.pack_into(_HEAD, buf, 0, _MAGIC, counter, n)
        for i in range(n):
            struct.pack_into(">Q", buf, _HEAD_LEN + 8 * i, values[i])
        end = _HEAD_LEN + 8 * n
        struct.pack_into(">I", buf, end, crc32(memoryview(buf)[:end]) & 0xFFFFFFFF)
        target = 1 - self._newest
        with self._flash.open(self._names[target], "wb") as f:
            f.write(buf)
            self._flash.durable(f)
        self._counter = counter
        self._newest = target
        self.values = tuple(values)
