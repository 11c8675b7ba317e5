"""`read_file`: one walk serves the check and the header asked for."""

from __future__ import annotations

import pydicom

from targets.dicomnet import check
from tests.dicomgen import make_series

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
