"""An outsider's attacks on the receiver's write-ahead journal (issue 15): the spool
disk too small or full, segments damaged on disk before a start, two receivers on one
spool. Every instance acknowledged with Success must survive, byte for byte; damage is
named in the log; nothing is written as an instance that was not received.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from dispatch.receiving.journal import _RECORD, SEGMENT_BYTES, _aligned
from dispatch.receiving.receiver import SpoolInUse
from tests.dicomgen import make_series
from tests.dispatch.receiving.test_receiver import send_raw, stored_files


def crash(rx) -> None:
    """What SIGKILL leaves in-process: no final tick, no checkpoint; the spool's lock
    goes with the process."""
    rx._server.shutdown()
    rx._server = None
    rx._release_spool()


def record_offsets(segment: Path) -> list[tuple[int, int]]:
    """(offset, length) of each record from the top of a segment."""
    out, offset = [], 4096
    with open(segment, "rb") as f:
        while True:
            f.seek(offset)
            raw = f.read(_RECORD.size)
            if len(raw) < _RECORD.size or raw[:4] != b"CJR1":
                return out
            _m, _g, _s, path_len, size, _c = _RECORD.unpack(raw)
            total = _RECORD.size + path_len + size
            out.append((offset, total))
            offset += _aligned(total)


def acknowledged_then_lost(receiver, tmp_path, n: int):
    """`n` instances acknowledged, then a crash that lost their files from the page
    cache (as a power cut does before the once-a-second sync)."""
    series = make_series(tmp_path / "ct", n)
    spool = tmp_path / "spool"
    rx = receiver(spool_dir=spool, tick_seconds=3600)
    assert send_raw(rx.port, series.files) == [0] * n
    files = stored_files(rx)
    originals = {f.name: f.read_bytes() for f in files}
    crash(rx)
    for f in files:
        f.unlink()
    segment = spool / "incoming" / ".journal" / "segment-0"
    return spool, segment, originals


def test_a_segment_truncated_on_disk_lets_the_receiver_start_and_replays_the_rest(
    receiver, tmp_path, caplog
):
    spool, segment, originals = acknowledged_then_lost(receiver, tmp_path, 3)
    (first, length), *_ = record_offsets(segment)
    # Cut at the end of the first record (a copy that ran out of space, a repair).
    os.truncate(segment, first + _aligned(length))
    caplog.set_level(logging.INFO, "courier.receiver")

    again = receiver(spool_dir=spool)  # used to die: struct.error

    restored = {f.name: f.read_bytes() for f in stored_files(again)}
    assert len(restored) == 1
    assert restored.items() <= originals.items()
    assert "event=journal_segment_damaged segment=segment-0" in caplog.text
    # And it keeps receiving (the short segment grows again).
    more = make_series(tmp_path / "more", 2)
    assert send_raw(again.port, more.files) == [0, 0]


def test_a_record_damaged_on_disk_is_named_and_the_later_ones_are_replayed(
    receiver, tmp_path, caplog
):
    spool, segment, originals = acknowledged_then_lost(receiver, tmp_path, 3)
    records = record_offsets(segment)
    assert len(records) == 3
    offset, length = records[1]
    with open(segment, "r+b") as f:  # one flipped byte inside the second instance
        f.seek(offset + length - 100)
        byte = f.read(1)
        f.seek(offset + length - 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    caplog.set_level(logging.INFO, "courier.receiver")

    again = receiver(spool_dir=spool)

    restored = {f.name: f.read_bytes() for f in stored_files(again)}
    # The first and the third come back byte for byte; the damaged one is not
    # written as an instance, and is named.
    assert len(restored) == 2
    assert restored.items() <= originals.items()
    (lost,) = set(originals) - set(restored)
    ignored = [r for r in caplog.records if "journal_record_ignored" in r.msg]
    assert len(ignored) == 1 and ignored[0].levelno == logging.ERROR
    assert lost in ignored[0].getMessage()
    assert "damaged on disk" in ignored[0].getMessage()


def test_a_segment_whose_headers_are_both_damaged_is_kept_aside_and_named(
    receiver, tmp_path, caplog
):
    spool, segment, _ = acknowledged_then_lost(receiver, tmp_path, 2)
    with open(segment, "r+b") as f:
        f.write(b"\xff" * 1024)
    caplog.set_level(logging.INFO, "courier.receiver")

    again = receiver(spool_dir=spool)

    assert stored_files(again) == []  # nothing written from an unknown generation
    assert (segment.parent / "damaged-segment-0").stat().st_size == SEGMENT_BYTES
    assert "event=journal_segment_damaged segment=segment-0" in caplog.text
    assert send_raw(again.port, make_series(tmp_path / "b", 1).files) == [0]


def test_a_second_receiver_on_the_same_spool_refuses_to_start(receiver, tmp_path):
    spool = tmp_path / "spool"
    first = receiver(spool_dir=spool)
    with pytest.raises(SpoolInUse, match="another receiver is running on the spool"):
        receiver(spool_dir=spool)
    # The first one is untouched; once it stops, the spool can be taken again.
    assert send_raw(first.port, make_series(tmp_path / "a", 1).files) == [0]
    first.stop()
    receiver(spool_dir=spool)


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of the given size, mounted for the test."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                        str(folder)], check=True)  # fmt: skip
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_spool_disk_with_no_room_for_a_segment_still_takes_instances(
    receiver, tmp_path, tmpfs
):
    spool = tmpfs("20m")  # smaller than one journal segment (32 MiB)
    series = make_series(tmp_path / "ct", 3)
    rx = receiver(spool_dir=spool, min_free_bytes=0)

    # Used to be refused with 0xA700, a half-written segment filling the disk.
    assert send_raw(rx.port, series.files) == [0, 0, 0]
    stored = {f.read_bytes()[-2000:] for f in stored_files(rx)}
    assert stored == {p.read_bytes()[-2000:] for p in series.files}
    assert not list((spool / "incoming" / ".journal").glob("*.new"))


def test_a_spool_disk_that_fills_refuses_with_0xa700_and_keeps_what_it_acknowledged(
    receiver, tmp_path, tmpfs
):
    spool = tmpfs("80m")
    rx = receiver(spool_dir=spool, min_free_bytes=0)
    assert send_raw(rx.port, make_series(tmp_path / "a", 1).files) == [0]
    assert (spool / "incoming" / ".journal" / "segment-0").exists()
    # Leave about 3 MB: the next 30 instances (3.9 MB) fill it mid-series.
    free = os.statvfs(spool).f_bavail * os.statvfs(spool).f_frsize
    with open(spool / "filler", "wb") as f:
        f.write(bytes(free - 3_000_000))
    series = make_series(tmp_path / "ct", 30, size=256)  # ~130 KB each

    statuses = send_raw(rx.port, series.files)

    assert set(statuses) == {0, 0xA700}, statuses
    tails = {p.read_bytes()[-2000:] for p in series.files}
    stored = [f for f in stored_files(rx) if f.stat().st_size > 100_000]
    assert len(stored) == statuses.count(0)
    for f in stored:  # each acknowledged instance whole (the dataset ends the file)
        assert f.read_bytes()[-2000:] in tails
    # And once space is freed, the same instances are taken (the receiver asks
    # the disk again after half a second).
    (spool / "filler").unlink()
    time.sleep(0.6)
    assert send_raw(rx.port, series.files) == [0] * 30


def test_a_replacement_made_durable_without_the_journal_is_not_undone_by_a_replay(
    receiver, tmp_path
):
    """The same SOP Instance UID again with other bytes replaces the earlier file.
    The first copy (small) went through the journal; the second (over 256 KiB)
    through the classic path. A crash (a SIGKILL will do: the files are intact)
    before the next checkpoint used to replay the first copy's record over the
    second: the older instance came back, the one acknowledged last was lost."""
    first = make_series(tmp_path / "small", 1)
    ds = pydicom.dcmread(make_series(tmp_path / "big", 1, size=512).files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = first.sop_uids[0]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = first.study_uid, first.series_uid
    second = tmp_path / "second.dcm"
    ds.save_as(second, enforce_file_format=True)
    spool = tmp_path / "spool"
    rx = receiver(spool_dir=spool, tick_seconds=3600)

    assert send_raw(rx.port, [first.files[0]]) == [0]
    assert send_raw(rx.port, [second]) == [0]
    (stored,) = stored_files(rx)
    latest = stored.read_bytes()
    assert latest.endswith(second.read_bytes()[-4096:])
    crash(rx)

    again = receiver(spool_dir=spool)

    assert [f.read_bytes() for f in stored_files(again)] == [latest]


def test_a_journal_record_naming_no_series_file_is_refused_by_name_at_replay(
    receiver, tmp_path, caplog
):
    """A record is file data that becomes a path at start-up: only `<series
    folder>/<file>` is written. A record naming the journal's own segment, the
    partial files' folder or a file at the root used to be written there."""
    from dispatch.receiving.journal import Journal

    spool = tmp_path / "spool"
    rx = receiver(spool_dir=spool, tick_seconds=3600)
    assert send_raw(rx.port, make_series(tmp_path / "ct", 1).files) == [0]
    (kept,) = stored_files(rx)
    crash(rx)
    escape = Path(f"/qa15-journal-escape-{os.getpid()}.dcm")
    hostile = [".journal/segment-0", ".partial/x.dcm", str(escape), "a\x00b/c.dcm"]
    journal = Journal(spool / "incoming")
    journal.open()
    for path in hostile:
        journal.done(journal.append(path, b"not an instance"))
    journal.close()
    caplog.set_level(logging.INFO, "courier.receiver")

    try:
        again = receiver(spool_dir=spool)
        assert not escape.exists()
    finally:
        escape.unlink(missing_ok=True)

    segment = spool / "incoming" / ".journal" / "segment-0"
    assert segment.stat().st_size == SEGMENT_BYTES
    assert not (spool / "incoming" / ".partial" / "x.dcm").exists()
    assert stored_files(again) == [kept]
    refused = [r.getMessage() for r in caplog.records if "not a spool path" in r.msg
               or "not a spool path" in r.getMessage()]  # fmt: skip
    assert len(refused) == len(hostile)
