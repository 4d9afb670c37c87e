"""Reading signatures checked by worker processes in tasks that span many blocks: a failure
is still named by its own block and position, and a meter's new key reaches the workers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from ledger_world import T0

from meterchain.keys import PrivateKey
from meterchain.ledger import chain as chain_module
from meterchain.ledger.chain import ChainError, verify_store
from meterchain.ledger.readings import HOUR, LedgerReading
from meterchain.ledger.sandbox import Chain, Sandbox, signed
from meterchain.ledger.store import open_store


def _forged(r: LedgerReading) -> LedgerReading:
    """`r` with one bit of its signature flipped (digest re-derived, so only ES256 can tell)."""
    cose = bytearray(r.cose)
    cose[-1] ^= 0x01
    return LedgerReading(hashlib.sha256(bytes(cose)).digest(), *r.row()[1:6], bytes(cose))


def _hours_of_readings(chain: Chain, sb: Sandbox, hours: range, forged: dict[int, int]) -> None:
    """A block an hour, 3 readings each of pv1 and pv2; reading `forged[h]` of hour h forged."""
    for h in hours:
        t = T0 + h * HOUR
        rs = [
            sb.reading(m, 3 * h + k + 1, t + 60 * k, 0, 10 * (3 * h + k), "pv")
            for m in ("pv1", "pv2")
            for k in range(3)
        ]
        if h in forged:
            rs[forged[h]] = _forged(rs[forged[h]])
        chain.commit_readings(rs, t + HOUR - 1, signatures=False)


@pytest.mark.parametrize("chunk", [6, chain_module._CHUNK])
def test_a_forged_signature_deep_in_a_many_block_task_names_its_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """In one task of 40 blocks, or (chunk 6) a task a block, so that the pass stops as soon
    as the task holding block 19 is collected, long before the end."""
    monkeypatch.setattr(chain_module, "_CHUNK", chunk)
    sb = Sandbox()
    chain = Chain(sb, open_store(str(tmp_path / "l.db")))
    chain.genesis(T0 - 10, [sb.participant("mg1", "microgrid", T0 - 10)])
    chain.commit([sb.meter(m, "mg1", "pv", T0 - 5) for m in ("pv1", "pv2")], T0 - 5)
    # 40 blocks of 6 readings, forgeries in blocks 19 and 33.
    _hours_of_readings(chain, sb, range(40), {17: 4, 31: 0})
    for workers in (1, 2):
        replayed: list[int] = []
        with pytest.raises(ChainError, match=r"^block 19: .* reading 4 \(pv2:53\): ES256"):
            verify_store(chain.store, workers=workers, progress=replayed.append)
        # Inline stops at block 19 itself; a task a block a few blocks later (tasks in flight).
        stopped = {(1, 6): 18, (1, chain_module._CHUNK): 18, (2, 6): 23}
        assert replayed[-1] == stopped.get((workers, chunk), 41)
    chain.store.close()


def test_a_meter_registered_again_with_a_new_key_is_checked_with_that_key(tmp_path: Path) -> None:
    """Keys change between blocks of one worker task: each reading meets its meter's key then."""
    sb = Sandbox()
    chain = Chain(sb, open_store(str(tmp_path / "l.db")))
    chain.genesis(T0 - 10, [sb.participant("mg1", "microgrid", T0 - 10)])
    chain.commit([sb.meter(m, "mg1", "pv", T0 - 5) for m in ("pv1", "pv2")], T0 - 5)
    _hours_of_readings(chain, sb, range(3), {})
    # pv1 leaves; its key goes to a new meter pv3 (allowed: no active meter holds it), whose
    # readings share a worker task with pv1's; then pv1 comes back with a new key.
    exit_terms = {"id": "pv1", "reason": "board replaced", "time": T0 + 3 * HOUR}
    chain.commit([signed(sb.market, "meter_exit", exit_terms, sb.regulator)], T0 + 3 * HOUR)
    old_key = sb.keys["pv3"] = sb.key("pv1")
    chain.commit([sb.meter("pv3", "mg1", "pv", T0 + 3 * HOUR + 1)], T0 + 3 * HOUR + 1)
    pv3 = [sb.reading("pv3", s, T0 + 3 * HOUR + 60 * s, 0, 10 * s, "pv") for s in (1, 2)]
    chain.commit_readings(pv3, T0 + 3 * HOUR + 600, signatures=False)
    sb.keys["pv1"] = PrivateKey.from_secret(0xC0FFEE)
    chain.commit([sb.meter("pv1", "mg1", "pv", T0 + 3 * HOUR + 700)], T0 + 3 * HOUR + 700)
    _hours_of_readings(chain, sb, range(4, 7), {})
    _, inline = verify_store(chain.store, workers=1)
    _, pooled = verify_store(chain.store, workers=2)
    assert pooled.signatures_checked == inline.signatures_checked == 38
    # ... and pv1's readings signed with its old key after the change are refused, in their
    # block (block 13; block 12 is in the same worker task, with the new key).
    _hours_of_readings(chain, sb, range(7, 8), {})
    sb.keys["pv1"] = old_key
    _hours_of_readings(chain, sb, range(8, 9), {})
    for workers in (1, 2):
        with pytest.raises(ChainError, match=r"^block 13: .* reading 0 \(pv1:25\): ES256"):
            verify_store(chain.store, workers=workers)
    chain.store.close()
