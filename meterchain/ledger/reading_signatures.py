"""Reading signature checks of a ledger pass, as a worker process runs them on a chunk of readings.

Kept apart from `chain` so that a worker process imports reading verification
alone, not the ledger rules and the market contracts (a third of a second of
CPU per worker at start-up). Everything a chunk needs travels as plain bytes
and strings.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from meterchain import reading
from meterchain.errors import RejectedReading
from meterchain.ledger.readings import ReadingFormatError, columns
from meterchain.registry import Meter, Registry, make_meter

MeterKeys = dict[str, tuple[bytes, str, str]]  # meter id -> (point, owner, source)


def first_bad_signature(coses: Sequence[bytes], keys: MeterKeys) -> tuple[int, str] | None:
    """Verify each reading against its meter's key: (index, "(meter:seq): reason") of the
    first that fails, or None when all verify."""
    registry = Registry(_meter(m, *key) for m, key in keys.items())
    verify = reading.verify
    for index, cose in enumerate(coses):
        try:
            verify(cose, registry)
        except RejectedReading as exc:
            return index, f"({_meter_seq(cose)}): {exc}"
    return None


def _meter_seq(cose: bytes) -> str:
    """`meter:seq` as the reading's payload says (the pass has held them to the stored columns)."""
    try:
        meter_id, seq = columns(cose)[:2]
    except ReadingFormatError:
        return "?"
    return f"{meter_id}:{seq}"


@functools.lru_cache(maxsize=1 << 16)
def _meter(meter_id: str, point: bytes, owner: str, source: str) -> Meter:
    """A meter with its key parsed once per worker process, not once per chunk it checks."""
    return make_meter(meter_id, point, owner, source)
