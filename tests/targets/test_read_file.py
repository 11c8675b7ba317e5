"""`read_file`: one walk serves the check and the header asked for."""

from __future__ import annotations

import pydicom
import pytest

from targets.dicomnet import check
from tests.dicomgen import make_series, pydicom_test_files

PATIENT_ID, MODALITY = 0x00100020, 0x00080060


def test_the_tags_asked_for_are_merged_with_the_uids_once_per_distinct_ask(
    tmp_path,
):
    series = make_series(tmp_path / "ct", 3)
    asked = frozenset((PATIENT_ID, MODALITY))
    check._CAPTURES.clear()

    headers = [check.read_file(path, asked) for path in series.files]
    check.read_file(series.files[0], (PATIENT_ID,))

    for path, header in zip(series.files, headers, strict=True):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert header.values[PATIENT_ID].rstrip(b" \0").decode() == ds.PatientID
        assert header.values[MODALITY].rstrip(b" \0").decode() == ds.Modality
        # The UIDs every check needs are captured with them.
        assert check.TAG_SOP_INSTANCE in header.values
    assert len(check._CAPTURES) == 2  # built for two distinct asks, not four files
    assert check._capture(asked) is check._capture(asked)


def test_the_file_meta_alone_is_read_as_pydicom_reads_it_however_long(tmp_path):
    """`read_file_meta` (the receiver's Storage Commitment answers use it) gives
    pydicom's file meta for pydicom's own files, and reads on when the meta is
    longer than its first read (a big Private Information element)."""
    files = [f for f in pydicom_test_files("*.dcm") if "truncated" not in f.name]
    checked = 0
    for name in files:
        try:
            ds = pydicom.dcmread(name, stop_before_pixels=True)
        except Exception:
            continue
        if ds.preamble is None or "MediaStorageSOPClassUID" not in ds.file_meta:
            continue
        try:
            meta = check.read_file_meta(name)
        except check.CorruptDataset:
            continue  # files whose meta pydicom repairs; not what this is about
        raw = meta[0x00020002].rstrip(b"\0 ").decode()
        assert raw == ds.file_meta.MediaStorageSOPClassUID, name
        checked += 1
    assert checked > 50

    series = make_series(tmp_path / "ct", 1)
    ds = pydicom.dcmread(series.files[0])
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = b"\x01" * 10000
    long_meta = tmp_path / "long-meta.dcm"
    ds.save_as(long_meta, enforce_file_format=True)

    meta = check.read_file_meta(long_meta)
    assert meta[0x00020102] == b"\x01" * 10000
    assert meta[0x00020002].rstrip(b"\0 ").decode() == ds.SOPClassUID

    not_dicom = tmp_path / "note.txt"
    not_dicom.write_bytes(b"hello" * 100)
    with pytest.raises(check.NotPart10):
        check.read_file_meta(not_dicom)
