"""Power cuts at every byte the firmware writes: no kept reading lost, no sequence number reused.

The app runs with the broker unreachable (so readings accumulate in flash) on a
flash that loses power after k bytes (CutFlash), for every k from 0 to the total the
run writes (spool records, sequence reservations, persisted registers).  The board
then reboots on what the flash holds, with the broker back, and must publish every
reading whose commit had returned before the cut, unchanged, and only fresh sequence
numbers for new readings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mcfakes
from conftest import board_config
from mc.app import App
from mc.config import load
from mc.flash import Flash
from mc.keystore import load as load_key
from mcfakes import CutFlash, PowerCut


def _run_until_cut(folder: Path, budget: int | None) -> tuple[dict[int, bytes], list[int], int]:
    """Boot 1: returns (readings kept in flash, sequence numbers signed, bytes written)."""
    flash = CutFlash(str(folder), budget)
    broker = mcfakes.FakeBroker()
    broker.up = False
    board = mcfakes.FakeBoard(flash=flash, broker=broker, echo=False)
    application = App(board, load(flash), load_key(flash))
    kept: dict[int, bytes] = {}
    commit = application.spool.commit

    def tracked_commit() -> None:
        commit()
        # commit() returned: everything the spool holds is now durable.
        seq = application.spool.next_unsent(0)
        while seq >= 0:
            kept[seq] = bytes(application.spool.payload(seq))
            seq = application.spool.next_unsent(seq)

    application.spool.commit = tracked_commit  # type: ignore[method-assign]
    try:
        application.run(cycles=5)
    except PowerCut:
        pass
    lines = [line for line in board.console_lines if line.startswith("MC-R ")]
    signed = [_seq_of(bytes.fromhex(line[5:])) for line in lines]
    return kept, signed, flash.events


def _seq_of(signed: bytes) -> int:
    import cbor2

    payload = cbor2.loads(cbor2.loads(signed).value[2])
    return int(payload[2])


def _reboot(folder: Path) -> dict[int, bytes]:
    flash = Flash(str(folder))
    broker = mcfakes.FakeBroker()
    board = mcfakes.FakeBoard(flash=flash, broker=broker, echo=False, unix_start=1767300000)
    App(board, load(flash), load_key(flash)).run(cycles=2)
    published: dict[int, bytes] = {}
    for _, payload in broker.messages:
        seq = _seq_of(payload)
        assert published.setdefault(seq, payload) == payload, f"seq {seq} sent with two bodies"
    return published


def test_power_cut_at_every_byte_the_app_writes(make_board_dir, tmp_path: Path) -> None:
    cfg = board_config(**{"spool.batch": 2, "seq_block": 2, "persist_s": 20})
    template = make_board_dir(cfg=cfg)
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    kept_all, signed_all, total = _run_until_cut(probe, None)
    assert len(signed_all) == 5 and set(kept_all) == set(signed_all)
    assert total > 5 * 100, "each reading's record bytes are cut points"

    work = tmp_path / "work"
    for budget in range(total + 1):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        kept, signed, _ = _run_until_cut(work, budget)
        published = _reboot(work)
        for seq, data in kept.items():
            assert published.get(seq) == data, f"cut at {budget}: kept reading {seq} lost"
        new = sorted(set(published) - set(signed))
        assert len(new) == 2, f"cut at {budget}: the reboot's own readings: {new}"
        if signed:
            assert min(new) > max(signed), f"cut at {budget}: sequence number reused"
        assert set(published) <= set(signed) | set(new)


SPOOL_CUT_UNDER_MICROPYTHON = """
import os
from mc.flash import Flash
from mc.spool import Spool
from mcfakes import CutFlash, PowerCut

def reading(seq):
    return bytes([(seq * 7 + i) & 0xFF for i in range(100)])

def fresh(name):
    try:
        for f in os.listdir(name):
            os.remove(name + "/" + f)
    except OSError:
        os.mkdir(name)
    spool = Spool(Flash(name))
    for seq in (1, 2, 3):
        spool.add(seq, reading(seq))
    spool.commit()

def cut_run(budget):
    fresh("w")
    spool = Spool(CutFlash("w", budget))
    spool.ack(2)
    spool.add(4, reading(4))
    spool.add(5, reading(5))
    try:
        spool.commit()
        return False
    except PowerCut:
        return True

budget = 0
while cut_run(budget):
    after = Spool(Flash("w"))
    found = {}
    seq = after.next_unsent(0)
    while seq >= 0:
        found[seq] = bytes(after.payload(seq))
        seq = after.next_unsent(seq)
    for seq in (1, 3):
        assert found.get(seq) == reading(seq), (budget, seq)
    for seq in found:
        assert found[seq] == reading(seq), (budget, seq)
    budget += 1
print("CUTS", budget)
"""


def test_spool_power_cuts_under_micropython(mpy, tmp_path: Path) -> None:
    out = mpy(SPOOL_CUT_UNDER_MICROPYTHON, fs_dir=tmp_path).check().stdout.split()
    assert out[0] == "CUTS" and int(out[1]) > 2 * 100
