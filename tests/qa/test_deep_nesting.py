"""A file whose sequences nest hundreds of levels deep: valid DICOM that dcmtk
reads, sends (`dcmsend`) and stores, and that Courier's own receiver stores too.

Courier's element walker (targets/dicomnet/check.py) and pydicom recurse once per
level; beyond Python's recursion limit they raise RecursionError, which no caller
expected: `scan_folder` raised it, so `send_series` ended in a traceback and
`create_jobs` (routing a received series) too, and not one instance of the series
was sent. Now the file fails by name and the rest of the series goes on.
"""

from __future__ import annotations

import struct

import pytest

from dispatch.jobs import services
from targets.models import DicomTarget
from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.interop.corpus import _explicit_le, insert_elements

DEPTH = 800  # dcmdump lists all 800 levels; pydicom gives up near 300


def nested_private_sequence(depth: int) -> bytes:
    """(0013,1001) SQ of undefined length, each item holding the next one."""
    sq = struct.pack("<HH", 0x0013, 0x1001) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return (sq + item) * depth + (item_end + seq_end) * depth


def deepen(path, depth: int = DEPTH) -> None:
    raw = path.read_bytes()
    raw = insert_elements(raw, 0x00130010, _explicit_le(0x00130010, b"LO", b"QA"))
    path.write_bytes(insert_elements(raw, 0x00131001, nested_private_sequence(depth)))


def test_a_deeply_nested_file_is_listed_by_name_and_the_rest_is_scanned(tmp_path):
    series = make_series(tmp_path / "in", 3)
    deep = sorted(series.folder.glob("*.dcm"))[0]
    deepen(deep)

    scanned = scan_folder(series.folder)

    assert len(scanned.instances) == 2
    assert [p.name for p, _ in scanned.corrupt] == [deep.name]
    assert "nest too deeply" in scanned.corrupt[0][1], scanned.corrupt


@pytest.mark.django_db(transaction=True)
def test_a_series_with_a_deeply_nested_file_sends_the_others(
    tmp_path, storescp, immediate_huey
):
    series = make_series(tmp_path / "in", 3)
    deep = sorted(series.folder.glob("*.dcm"))[0]
    deepen(deep)
    target = DicomTarget.objects.create(
        name="qa-deep", host="127.0.0.1", port=storescp.port,
        called_aet=storescp.aet, retry_max_attempts=1,
    )  # fmt: skip

    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)

    job.refresh_from_db()
    arrived = {p.name for p in storescp.files()}
    sent = [u for u in series.sop_uids if any(u in name for name in arrived)]
    assert len(sent) == 2, (job.state, job.last_error)
    # Never sent, in any form, as a truncated file: a failed instance of the job,
    # named with the reason.
    assert job.skipped == 0 and job.failed == 1
    (row,) = job.instances.filter(path__endswith=deep.name)
    assert row.state == "failed" and "nest too deeply" in row.message


@pytest.mark.parametrize("vr", [b"SQ", b"UN"])
def test_the_walker_refuses_deep_nesting_in_words(vr):
    """At most `MAX_DEPTH` levels; beyond, words rather than a RecursionError (also
    inside a UN of undefined length, walked as Implicit VR)."""
    from targets.dicomnet.check import MAX_DEPTH, CorruptDataset, walk_dataset

    def raw(depth: int) -> bytes:
        if vr == b"SQ":
            return nested_private_sequence(depth)
        # UN: the levels inside are Implicit VR (tag, undefined length).
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        inner = struct.pack("<HHL", 0x0013, 0x1001, 0xFFFFFFFF) + item
        ends = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack(
            "<HHL", 0xFFFE, 0xE0DD, 0
        )
        head = struct.pack("<HH", 0x0013, 0x1001) + b"UN\0\0" + b"\xff" * 4
        return head + item + inner * (depth - 1) + ends * depth

    walk_dataset(raw(MAX_DEPTH), "1.2.840.10008.1.2.1")
    for depth in (MAX_DEPTH + 1, DEPTH):
        with pytest.raises(CorruptDataset, match=f"more than {MAX_DEPTH} levels deep"):
            walk_dataset(raw(depth), "1.2.840.10008.1.2.1")


def test_a_deeply_nested_file_is_a_problem_of_the_folder_index(tmp_path):
    from targets.kinds.dicomweb.index import FolderIndex

    series = make_series(tmp_path / "in", 3)
    deep = sorted(series.folder.glob("*.dcm"))[0]
    deepen(deep)

    report = FolderIndex(series.folder, tmp_path / "index.sqlite3").scan(workers=1)

    assert report.added == 2
    # The element walker's words (targets/dicomnet/check.py MAX_DEPTH).
    assert [
        (p, "nest more than 200 levels deep" in why) for p, why in report.problems
    ] == [(deep.name, True)], report.problems
