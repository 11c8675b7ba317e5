"""A DICOM file that fails the structural check is never sent, nor replaces a good copy.

pydicom ships truncated copies of two of its files (`rtplan_truncated.dcm`,
`MR_truncated.dcm`, same SOP Instance UIDs as `rtplan.dcm` and `MR_small.dcm`):
their headers read, their data ends early. Crafted cuts of pydicom's CT example add
the other ways a copy goes wrong.
"""

from __future__ import annotations

import shutil
from io import StringIO
from pathlib import Path

import pydicom
import pytest
from django.core.management import CommandError, call_command
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from targets.dicomnet.check import CorruptDataset, check_file
from targets.models import DicomTarget, FolderTarget
from targets.series import scan_folder

pytestmark = pytest.mark.django_db

PAIRS = [("rtplan.dcm", "rtplan_truncated.dcm"), ("MR_small.dcm", "MR_truncated.dcm")]


def fresh_ct(path: Path) -> tuple[Path, str]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def cut(path: Path, size: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:size])


def dataset_start(path: Path) -> int:
    """Where the dataset begins (after preamble and file meta)."""
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        return f.tell()


@pytest.mark.parametrize(
    "where",
    ["inside the pixel data", "inside an element header", "right after file meta"],
)
def test_crafted_cuts_read_as_dicom_but_fail_the_check(tmp_path, where):
    path, _ = fresh_ct(tmp_path / "ct.dcm")
    size = path.stat().st_size
    start = dataset_start(path)
    cut_at = {
        "inside the pixel data": size - 1000,
        "inside an element header": start + 3,
        "right after file meta": start,
    }[where]
    cut(path, cut_at)

    series = scan_folder(tmp_path)

    assert series.instances == []
    [(bad, reason)] = series.corrupt
    assert bad == path and reason.startswith("corrupt DICOM")


def test_every_intact_pydicom_file_passes_and_its_truncated_ones_fail(tmp_path):
    for good, truncated in PAIRS:
        check_file(get_testdata_file(good))
        with pytest.raises(CorruptDataset, match="runs past the end"):
            check_file(get_testdata_file(truncated))
    # A UN element of undefined length holds an implicit VR sequence (PS3.5 6.2.2).
    check_file(get_testdata_file("UN_sequence.dcm"))


def test_a_truncated_copy_never_replaces_the_good_one_at_a_folder_target(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = FolderTarget.objects.create(name="Archive", path=str(out))
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good_dir.mkdir()
    bad_dir.mkdir()
    for good, truncated in PAIRS:
        shutil.copy(get_testdata_file(good), good_dir / good)
        # The same names and SOP Instance UIDs, cut short.
        shutil.copy(get_testdata_file(truncated), bad_dir / good)
    call_command("send_series", "Archive", str(good_dir))
    delivered = {p.name: p.read_bytes() for p in out.rglob("*.dcm")}
    assert len(delivered) == 2

    with pytest.raises(CommandError, match="2 corrupt DICOM files refused"):
        call_command("send_series", "Archive", str(bad_dir))
    # With an intact file beside them, the send goes on, names what it refused and
    # fails: the series did not reach the target whole.
    fresh_ct(bad_dir / "ct.dcm")
    err = StringIO()
    with pytest.raises(CommandError, match="2 of 3 instances failed: MR_small.dcm"):
        call_command("send_series", "Archive", str(bad_dir), stderr=err)
    assert "failed: rtplan.dcm: corrupt DICOM (element (300A,00B0)" in err.getvalue()

    after = {p.name: p.read_bytes() for p in out.rglob("*.dcm")}
    assert {k: after[k] for k in delivered} == delivered
    assert len(after) == 3
    assert target.pk


def test_a_corrupt_file_is_never_sent_to_a_dicom_target(storescp, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    _, good_uid = fresh_ct(folder / "good.dcm")
    bad, bad_uid = fresh_ct(folder / "bad.dcm")
    cut(bad, bad.stat().st_size - 2000)
    DicomTarget.objects.create(
        name="Peer", host="127.0.0.1", port=storescp.port, called_aet=storescp.aet
    )

    with pytest.raises(CommandError, match="1 of 2 instances failed: bad.dcm"):
        call_command("send_series", "Peer", str(folder), stderr=StringIO())

    names = [p.name for p in storescp.files()]
    assert any(good_uid in n for n in names)
    assert not any(bad_uid in n for n in names)


def test_a_file_cut_inside_its_first_element_header_fails_by_name(tmp_path):
    # The preamble, "DICM" and 9 bytes: pydicom's reader ran out of bytes with a
    # struct.error, which stopped the whole scan (and with it send_series).
    fresh_ct(tmp_path / "good.dcm")
    cut_short = tmp_path / "cut.dcm"
    cut_short.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 9)
    series = scan_folder(tmp_path)
    assert [i.path.name for i in series.instances] == ["good.dcm"]
    ((path, why),) = series.corrupt
    assert path == cut_short and why.startswith("corrupt DICOM")
