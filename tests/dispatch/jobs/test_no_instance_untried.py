"""A job never ends with instances untried: each is delivered or failed by name.

Broken files in a row (pydicom's truncated test files, a crafted cut, an odd-length
value) in the middle of a series, on the job's last attempt, against real peers
(dcmtk's storescp and Orthanc): every good instance after them is delivered, each
broken one is a failed instance of the job with its reason. A target that cannot be
reached on the last attempt fails every instance by name with that reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dispatch.jobs import services
from dispatch.jobs.models import InstanceState, State
from targets.models import DicomTarget
from tests.peers import held_port

pytestmark = pytest.mark.django_db(transaction=True)


def _ct(path: Path, study_uid: str) -> str:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def broken_series(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Three good CTs, four broken files in a row, three good CTs (in name order).

    Return the SOP Instance UIDs of the good ones (an odd-length one among them:
    it is repaired, not refused) and {broken file name: what its reason says}.
    """
    folder.mkdir()
    study = generate_uid()
    good = [_ct(folder / f"a{n}.dcm", study) for n in range(3)]
    shutil.copy(get_testdata_file("rtplan_truncated.dcm"), folder / "b1.dcm")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), folder / "b2.dcm")
    _ct(folder / "b3.dcm", study)
    data = (folder / "b3.dcm").read_bytes()
    (folder / "b3.dcm").write_bytes(data[:-1001])  # cut inside the pixel data
    _ct(folder / "b4.dcm", study)
    data = (folder / "b4.dcm").read_bytes()
    with open(folder / "b4.dcm", "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        start = f.tell()
    (folder / "b4.dcm").write_bytes(data[: start + 3])  # right after the file meta
    # An odd-length value at the end (a private element after the pixel data):
    # not valid on the wire as it is, repaired by re-encoding before it is sent.
    odd = _ct(folder / "b5.dcm", study)
    with open(folder / "b5.dcm", "ab") as f:
        f.write(b"\xe1\x7f\x10\x00LO\x03\x00ABC")
    good += [odd] + [_ct(folder / f"c{n}.dcm", study) for n in range(3)]
    broken = {
        "b1.dcm": "runs past the end of the file",
        "b2.dcm": "runs past the end of the file",
        "b3.dcm": "runs past the end of the file",
        "b4.dcm": "the file ends inside its file meta information",
    }
    return good, broken


def _check_job(job, good: list[str], broken: dict[str, str], delivered: set[str]):
    job.refresh_from_db()
    rows = {Path(r.path).name: r for r in job.instances.all()}
    assert job.state == State.FAILED
    assert (job.total, job.sent + job.warnings, job.failed) == (11, 7, 4)
    assert not [n for n, r in rows.items() if r.state == InstanceState.PENDING]
    for name, words in broken.items():
        row = rows[name]
        assert row.state == InstanceState.FAILED, name
        assert row.message.startswith("corrupt DICOM") and words in row.message
    assert set(good) <= delivered
    assert job.last_error.startswith("4 of 11 instances failed: ")
    for name in broken:
        assert name in job.last_error
    odd = rows["b5.dcm"]
    assert odd.state in (InstanceState.SENT, InstanceState.WARNING)
    assert "re-encoded before sending" in odd.message


def test_broken_files_in_a_row_on_the_last_attempt_fail_by_name_to_storescp(
    storescp, tmp_path, immediate_huey
):
    good, broken = broken_series(tmp_path / "in")
    target = DicomTarget.objects.create(
        name="scp",
        host="127.0.0.1",
        port=storescp.port,
        called_aet=storescp.aet,
        retry_max_attempts=1,
    )

    (job,) = services.create_jobs(tmp_path / "in", [target], owned_spool=False)

    stored = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in storescp.files()
    }
    _check_job(job, good, broken, stored)


def test_broken_files_in_a_row_on_the_last_attempt_fail_by_name_to_orthanc(
    orthanc, tmp_path, immediate_huey
):
    good, broken = broken_series(tmp_path / "in")
    target = DicomTarget.objects.create(
        name="orthanc",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
        retry_max_attempts=1,
    )

    (job,) = services.create_jobs(tmp_path / "in", [target], owned_spool=False)

    stored = {uid for uid in good if orthanc.find_instance(uid)}
    _check_job(job, good, broken, stored)


def test_a_target_unreachable_on_the_last_attempt_fails_each_instance_by_name(
    tmp_path, immediate_huey
):
    held = held_port()  # bound, never accepting: connection refused
    try:
        target = DicomTarget.objects.create(
            name="down",
            host="127.0.0.1",
            port=held.getsockname()[1],
            called_aet="DOWN",
            retry_max_attempts=1,
        )
        folder = tmp_path / "in"
        folder.mkdir()
        study = generate_uid()
        for n in range(3):
            _ct(folder / f"{n}.dcm", study)
        (job,) = services.create_jobs(folder, [target], owned_spool=False)
    finally:
        held.close()
    job.refresh_from_db()
    assert job.state == State.FAILED
    assert job.last_error.startswith("gave up after 1 attempt: connection refused")
    rows = list(job.instances.all())
    assert len(rows) == 3 and job.failed == 3
    for row in rows:
        assert row.state == InstanceState.FAILED
        assert row.message.startswith("not sent: connection refused")
