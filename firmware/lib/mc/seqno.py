"""Reading sequence numbers that never repeat across reboots and power cuts.

The board persists a reservation limit *before* handing out any number below it, in
blocks of `block` numbers.  After a reboot it starts at the stored limit, skipping
whatever was left of the block: a few numbers are wasted per reboot (gaps are
allowed, repeats are not) and flash sees one small write per `block` readings.
"""

from .slots import SlotStore


class Sequencer:
    """Hands out strictly increasing sequence numbers, starting at 1 on a fresh board."""

    def __init__(self, flash, block: int = 64, floor: int = 0, name: str = "seq") -> None:
        if block < 1:
            raise ValueError("block must be >= 1")
        self._store = SlotStore(flash, name)
        self._block = block
        stored = self._store.values
        limit = stored[0] if stored else 1
        # `floor` is one above the highest number found elsewhere (the spool): a
        # defence in depth should the reservation store ever be lost.
        self._next = limit if limit > floor else floor
        self._limit = self._next  # nothing reserved in this boot yet

    def next(self) -> int:
        if self._next >= self._limit:
            limit = self._next + self._block
            self._store.save((limit,))  # durable before any number below it is used
            self._limit = limit
        n = self._next
        self._next = n + 1
        return n

    def peek(self) -> int:
        """The number the next call to `next` will return."""
        return self._next
