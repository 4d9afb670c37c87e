"""The flash spool: kept until PUBACK, torn tails cut, bounded by thinning, cut at every byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mc.flash import Flash
from mc.spool import Spool
from mcfakes import CutFlash, PowerCut


def reading(seq: int) -> bytes:
    # Distinct, seq-dependent bytes of a typical signed reading's size.
    return bytes((seq * 7 + i) & 0xFF for i in range(120 + seq % 13))


def live(spool: Spool) -> dict[int, bytes]:
    """Every stored reading, oldest first, as the uplink would fetch them."""
    found: dict[int, bytes] = {}
    seq = spool.next_unsent(0)
    while seq >= 0:
        data = spool.payload(seq)
        if data is not None:
            found[seq] = bytes(data)
        seq = spool.next_unsent(seq)
    return found


def test_kept_until_acknowledged_and_across_reopen(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash)
    for seq in range(1, 6):
        spool.add(seq, reading(seq))
    spool.commit()
    assert spool.ack(2) and spool.ack(4)
    spool.commit()
    again = Spool(flash)
    assert live(again) == {seq: reading(seq) for seq in (1, 3, 5)}
    assert again.max_seq == 5
    assert not again.ack(2), "an acknowledged reading is gone for good"


def test_reading_acked_before_commit_never_touches_flash(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash)
    spool.add(1, reading(1))
    spool.ack(1)
    spool.commit()
    assert flash.size("spool.log") == -1


def test_everything_acked_compacts_to_nothing(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash)
    for seq in range(1, 4):
        spool.add(seq, reading(seq))
    spool.commit()
    for seq in range(1, 4):
        spool.ack(seq)
    spool.commit()
    assert flash.size("spool.log") == -1
    assert len(Spool(flash)) == 0


def test_torn_tail_is_cut_at_open(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash)
    for seq in (1, 2, 3):
        spool.add(seq, reading(seq))
    spool.commit()
    log = tmp_path / "spool.log"
    data = log.read_bytes()
    log.write_bytes(data[:-10])  # the last record lost its end
    again = Spool(flash)
    assert live(again) == {1: reading(1), 2: reading(2)}
    assert again.repaired > 0
    assert Spool(flash).repaired == 0, "the cut is written back, once"


def test_bit_rot_in_the_middle_drops_one_record_not_the_rest(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash)
    for seq in (1, 2, 3):
        spool.add(seq, reading(seq))
    spool.commit()
    log = tmp_path / "spool.log"
    data = bytearray(log.read_bytes())
    first = 8 + len(reading(1)) + 4
    data[first + 30] ^= 0xFF  # inside the body of reading 2
    log.write_bytes(bytes(data))
    again = Spool(flash)
    assert live(again) == {1: reading(1), 3: reading(3)}
    assert again.corrupt == 1


def test_damaged_record_is_not_sent_after_open(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash)
    for seq in (1, 2):
        spool.add(seq, reading(seq))
    spool.commit()
    log = tmp_path / "spool.log"
    data = bytearray(log.read_bytes())
    data[20] ^= 0x01  # reading 1 rots after the spool indexed it
    log.write_bytes(bytes(data))
    assert spool.payload(1) is None
    assert spool.corrupt == 1
    assert live(spool) == {2: reading(2)}


def test_full_spool_thins_oldest_counts_drops_and_flags_once(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash, max_records=16)
    for seq in range(1, 101):
        spool.add(seq, reading(seq))
        if seq % 4 == 0:
            spool.commit()
        assert len(spool) <= 16
    spool.commit()
    kept = live(spool)
    assert spool.dropped == 100 - len(kept)
    assert 100 in kept and 99 in kept, "the newest readings are never thinned"
    assert spool.take_overflow() is True
    assert spool.take_overflow() is False, "the overflow flag goes on one reading"
    spool.commit()
    again = Spool(flash, max_records=16)
    assert again.dropped == spool.dropped, "the drop count survives a reboot"
    assert live(again) == kept
    assert again.overflow is False


def test_overflow_flag_survives_a_reboot_until_taken(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    spool = Spool(flash, max_records=8)
    for seq in range(1, 12):
        spool.add(seq, reading(seq))
        spool.commit()
    assert Spool(flash, max_records=8).overflow is True


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 3)),
            st.tuples(st.just("ack"), st.integers(0, 40)),
            st.tuples(st.just("commit"), st.just(0)),
            st.tuples(st.just("reopen"), st.just(0)),
        ),
        max_size=40,
    )
)
def test_matches_a_model_of_kept_readings(tmp_path_factory: pytest.TempPathFactory, ops) -> None:
    folder = tmp_path_factory.mktemp("spool")
    flash = Flash(str(folder))
    spool = Spool(flash, max_records=512)
    seq = 0
    pending: dict[int, bytes] = {}
    durable: dict[int, bytes] = {}
    for op, arg in ops:
        if op == "add":
            for _ in range(arg):
                seq += 1
                spool.add(seq, reading(seq))
                pending[seq] = reading(seq)
        elif op == "ack":
            spool.ack(arg)
            pending.pop(arg, None)
            durable.pop(arg, None)
        elif op == "commit":
            spool.commit()
            durable.update(pending)
            pending.clear()
        else:
            spool = Spool(flash, max_records=512)
            pending.clear()  # RAM is lost; only committed readings come back
            # An ack whose tombstone was not yet written comes back too (resent later).
            assert set(durable) <= set(live(spool))
            durable = dict(live(spool))
        assert live(spool) == dict(sorted({**durable, **pending}.items()))


# -- power cuts ---------------------------------------------------------------


def _count_events(template: Path, action) -> int:
    work = template.parent / "count"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    flash = CutFlash(str(work))
    action(flash)
    return flash.events


def _cut_at_every_event(tmp_path: Path, prepare, action, check) -> int:
    """Run `action` on a copy of the prepared flash, cut at every possible event."""
    template = tmp_path / "template"
    template.mkdir()
    prepare(Flash(str(template)))
    total = _count_events(template, action)
    assert total > 0
    for budget in range(total + 1):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        flash = CutFlash(str(work), budget)
        try:
            action(flash)
            assert budget == total, "the action finished although power was cut"
        except PowerCut:
            assert budget < total
        check(Spool(Flash(str(work))), budget == total)
    return total


def test_power_cut_at_every_byte_of_a_commit(tmp_path: Path) -> None:
    def prepare(flash: Flash) -> None:
        spool = Spool(flash)
        for seq in (1, 2, 3, 4):
            spool.add(seq, reading(seq))
        spool.commit()

    def action(flash: Flash) -> None:
        spool = Spool(flash)
        spool.ack(2)  # tombstone goes out with the next commit
        spool.add(5, reading(5))
        spool.add(6, reading(6))
        spool.commit()

    def check(after: Spool, finished: bool) -> None:
        found = live(after)
        for seq in (1, 3, 4):
            assert found.get(seq) == reading(seq), f"kept reading {seq} lost"
        assert set(found) <= {1, 2, 3, 4, 5, 6}
        for seq in (2, 5, 6):
            if seq in found:
                assert found[seq] == reading(seq)
        if 6 in found:
            assert 5 in found, "records land in order"
        if finished:
            assert set(found) == {1, 3, 4, 5, 6}
        assert after.max_seq >= 4

    total = _cut_at_every_event(tmp_path, prepare, action, check)
    assert total > 2 * 120  # every byte of both readings was a cut point


def test_power_cut_at_every_byte_of_a_compaction(tmp_path: Path) -> None:
    def prepare(flash: Flash) -> None:
        spool = Spool(flash)
        for seq in range(1, 41):
            spool.add(seq, reading(seq))
        spool.commit()

    def action(flash: Flash) -> None:
        spool = Spool(flash)
        for seq in range(1, 38):
            spool.ack(seq)  # enough dead bytes to rewrite the log
        spool.commit()

    def check(after: Spool, finished: bool) -> None:
        found = live(after)
        for seq in (38, 39, 40):
            assert found.get(seq) == reading(seq), f"kept reading {seq} lost"
        assert all(found[seq] == reading(seq) for seq in found)
        if finished:
            assert set(found) == {38, 39, 40}

    _cut_at_every_event(tmp_path, prepare, action, check)


def test_power_cut_at_every_byte_of_thinning(tmp_path: Path) -> None:
    def prepare(flash: Flash) -> None:
        spool = Spool(flash, max_records=8)
        for seq in range(1, 9):
            spool.add(seq, reading(seq))
        spool.commit()

    def action(flash: Flash) -> None:
        spool = Spool(flash, max_records=8)
        spool.add(9, reading(9))  # full: thins and rewrites
        spool.commit()

    def check(after: Spool, finished: bool) -> None:
        found = live(after)
        assert all(found[seq] == reading(seq) for seq in found)
        # Either the old log (all 8) or the thinned one; never fewer than thinning keeps.
        assert len(found) >= 6
        assert 8 in found
        if finished:
            assert 9 in found and after.dropped > 0

    _cut_at_every_event(tmp_path, prepare, action, check)


def test_ack_through_frees_durable_and_pending_up_to_the_watermark(tmp_path) -> None:
    from mc.flash import Flash
    from mc.spool import Spool

    spool = Spool(Flash(str(tmp_path)), max_records=64)
    for seq in range(1, 21):
        spool.add(seq, b"r%d" % seq)
    spool.commit()
    for seq in range(21, 26):
        spool.add(seq, b"r%d" % seq)  # still in RAM
    spool.ack(3)  # acknowledged earlier, one by one
    assert spool.ack_through(22) == 21 and len(spool) == 3
    assert spool.ack_through(22) == 0, "idempotent"
    assert spool.next_unsent(0) == 23
    spool.commit()
    reopened = Spool(Flash(str(tmp_path)), max_records=64)
    assert [reopened.next_unsent(0), len(reopened)] == [23, 3]
