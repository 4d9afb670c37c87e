"""Bridge from the ledger to the settlement contract (SC2, M5): re-execute one hour's settlement.

The ledger records, for a delivery hour, the committed clearing result, the
metered values its readings give and the settlement result. `execute` runs the
market's settlement contract on the first two and returns the canonical bytes
the third must equal, so every node re-executes the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping

from meterchain.ledger.transactions import TxError


def execute(clearing_result: bytes, metered: Mapping[str, Mapping[str, int]], hour: int) -> bytes:
    """Canonical CBOR bytes of the settlement of `hour` (energy in Wh, money in minor units)."""
    try:
        from meterchain.market import settlement
    except ImportError as exc:
        raise TxError(f"the settlement contract is not available in this build: {exc}") from exc
    raise TxError(f"settlement contract interface not wired yet ({settlement.__name__})")
