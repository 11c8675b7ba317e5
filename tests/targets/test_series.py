"""Reading a series folder: one pass per file checks it and reads its header without
pydicom; pydicom's own reading of the same files is the reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword

from targets import series as series_module
from targets.series import HEADER_TAG_NUMBERS, HEADER_TAGS, Series, scan_folder
from tests.dicomgen import pydicom_test_files

ROOT = Path(__file__).resolve().parents[2]


def _pydicom_scan(folder: Path) -> Series:
    """The folder read the way Courier read it before: pydicom, then the check."""
    slow = Series(root=folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        series_module._scan_slowly(slow, path)
    return slow


def test_the_header_tag_table_is_pydicoms_dictionary():
    assert list(HEADER_TAG_NUMBERS) == HEADER_TAGS
    for keyword, tag in HEADER_TAG_NUMBERS.items():
        assert tag_for_keyword(keyword) == tag, keyword


def test_pydicoms_test_files_read_as_pydicom_reads_them(tmp_path):
    """Every bundled file (odd, damaged and non-DICOM ones included) lands in the
    same place (instance, other file, corrupt) with the same UIDs, transfer syntax,
    size and header tags as when pydicom reads it."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    files = [f for f in pydicom_test_files() if f.is_file()]
    for f in files:
        shutil.copy(f, folder / f.name)
    assert len(files) > 60
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, slow = scan_folder(folder), _pydicom_scan(folder)
    assert len(fast.instances) > 50
    assert [(i.path, i.sop_class_uid, i.sop_instance_uid) for i in fast.instances] == [
        (i.path, i.sop_class_uid, i.sop_instance_uid) for i in slow.instances
    ]
    for a, b in zip(fast.instances, slow.instances, strict=True):
        assert (a.transfer_syntax, a.size, a.tags) == (
            b.transfer_syntax,
            b.size,
            b.tags,
        ), a.path.name
    assert sorted(p for p, _ in fast.corrupt) == sorted(p for p, _ in slow.corrupt)
    assert sorted(o.path for o in fast.others) == sorted(o.path for o in slow.others)
    # The truncated copies pydicom ships are refused, named.
    assert {p.name for p, _ in fast.corrupt} >= {
        "rtplan_truncated.dcm",
        "MR_truncated.dcm",
    }


@pytest.mark.parametrize(
    "charset, name",
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"),
        ("ISO_IR 192", "M\u00fcller^G\u00fcnther"),
        ("ISO_IR 100", "M\u00fcller^G\u00fcnther"),
        ("GB18030", "Wang^XiaoDong=\u738b^\u5c0f\u6771"),
    ],
)
def test_names_in_any_character_set_read_as_pydicom_reads_them(tmp_path, charset, name):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.SeriesDescription = name.split("=")[0]
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "a.dcm")
    (inst,) = scan_folder(tmp_path).instances
    assert inst.tags["PatientName"] == str(back.PatientName) == name
    assert inst.tags["SeriesDescription"] == str(back.SeriesDescription)


def test_reading_a_folder_of_dicom_files_does_not_import_pydicom(tmp_path):
    """The send path's scan imports neither pydicom nor numpy (a quarter of a
    second of start-up for every send_series)."""
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "notes.txt").write_text("a report")
    code = (
        "import sys\n"
        "from targets.series import scan_folder\n"
        f"s = scan_folder({str(tmp_path)!r})\n"
        "assert len(s.instances) == 1 and len(s.others) == 1, s\n"
        "print(sorted(m for m in ('pydicom', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("size", [0, 100, 131])
def test_a_file_shorter_than_a_preamble_is_an_other_file(tmp_path, size):
    (tmp_path / "short").write_bytes(b"x" * size)
    series = scan_folder(tmp_path)
    assert not series.instances and not series.corrupt
    (other,) = series.others
    assert other.size == size and other.reason.startswith("not DICOM")
