"""A truncated DICOM file in a series that becomes a job (routing a received series,
`send_series --queue`, and `send_series` itself all go through `create_jobs`).

The file is never sent, to any kind of target (a damaged copy must not replace a
good one there). It used to be counted as one of the "other files left out": the job
ended *done* with "0 failed", and `send_series` (direct or `--queue --wait`) exited
0, although the README promises exit code 1 "if anything failed" and issue 13 says a
malformed file "fails that instance with words". Now it is an instance of the job,
failed from the start with its reason: the job fails naming it (in `job_status`, on
the job's page), no attempt retries it, and `send_series` exits 1. Non-DICOM files
stay "other files" (left out by DICOM kinds, delivered by Folder ones).
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from dispatch.jobs import services
from dispatch.jobs.models import InstanceState, Job, State
from targets.models import DicomTarget, FolderTarget
from tests.dicomgen import make_series

pytestmark = pytest.mark.django_db(transaction=True)

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def series_with_a_truncated_file(folder: Path):
    series = make_series(folder, 3)
    broken = sorted(series.folder.glob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:-1000])
    (series.folder / "preview.png").write_bytes(PNG)
    (series.folder / "results.json").write_text('{"ok": true}')
    return series, broken


def dicom_target(storescp) -> DicomTarget:
    return DicomTarget.objects.create(
        name="qa-corrupt", host="127.0.0.1", port=storescp.port,
        called_aet=storescp.aet, retry_max_attempts=3,
    )  # fmt: skip


def test_a_truncated_instance_fails_the_job_by_name(
    tmp_path, storescp, immediate_huey, admin_client
):
    series, broken = series_with_a_truncated_file(tmp_path / "in")
    target = dicom_target(storescp)

    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)

    job.refresh_from_db()
    assert (job.sent, job.failed, job.total) == (2, 1, 3)
    assert job.state == State.FAILED, "a series missing an instance is not done"
    # Failed for good: retries (3 allowed) cannot mend a damaged file.
    assert job.attempt_count == 1
    assert f"1 of 3 instances failed: {broken.name}: corrupt DICOM" in job.last_error
    assert job.instances.filter(
        path__endswith=broken.name,
        state=InstanceState.FAILED,
        message__contains="runs past the end",
    ).exists()
    # PNG and JSON: other files, left out by a DICOM target as before.
    assert job.skipped == 2

    out = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("job_status", str(job.pk), stdout=out)
    assert exited.value.code == 1
    assert f"{broken.name}: corrupt DICOM" in out.getvalue()
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("job_status", str(job.pk), "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert (report["failed"], report["instances"], report["left_out"]) == (1, 3, 2)

    page = admin_client.get(reverse("admin:dispatch_job_change", args=[job.pk]))
    body = page.content.decode()
    assert "1 file not sent (1 failed)" in body
    assert broken.name in body and "runs past the end" in body


def test_an_operator_retry_fails_it_again_in_words(tmp_path, storescp, immediate_huey):
    series, broken = series_with_a_truncated_file(tmp_path / "in")
    (job,) = services.create_jobs(
        series.folder, [dicom_target(storescp)], owned_spool=False
    )

    services.retry_now([Job.objects.get(pk=job.pk)])

    job.refresh_from_db()
    assert job.state == State.FAILED and job.attempt_count == 2
    (row,) = job.instances.filter(state=InstanceState.FAILED)
    assert row.path.endswith(broken.name) and "runs past the end" in row.message


@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queue-wait"])
def test_send_series_names_the_file_and_exits_1(
    tmp_path, storescp, immediate_huey, queued
):
    series, broken = series_with_a_truncated_file(tmp_path / "in")
    dicom_target(storescp)
    out, err = StringIO(), StringIO()
    args = ["--queue", "--wait"] if queued else []

    with pytest.raises(CommandError) as failed:
        call_command(
            "send_series", "qa-corrupt", str(series.folder), *args,
            stdout=out, stderr=err,
        )  # fmt: skip

    assert failed.value.returncode == 1
    assert f"failed: {broken.name}: corrupt DICOM" in err.getvalue()
    assert "left out 2 files" in err.getvalue()
    assert "2 sent, 0 already present, 0 warnings, 1 failed of 3 instances" in (
        out.getvalue()
    )
    assert f"{broken.name}: corrupt DICOM" in str(failed.value)
    arrived = {p.name for p in storescp.files()}
    assert sum(any(u in n for n in arrived) for u in series.sop_uids) == 2


def test_a_folder_target_gets_the_rest_of_the_folder_but_not_the_damaged_copy(
    tmp_path, immediate_huey
):
    """A byte copy of the damaged file would be "the folder as it is", but it could
    replace a good copy at the target: it is not copied, and the job says so."""
    series, broken = series_with_a_truncated_file(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    target = FolderTarget.objects.create(name="qa-folder", path=str(out))

    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)

    job.refresh_from_db()
    assert job.state == State.FAILED
    assert (job.sent, job.failed, job.other_sent, job.skipped) == (2, 1, 2, 0)
    assert f"{broken.name}: corrupt DICOM" in job.last_error
    delivered = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"preview.png", "results.json"} <= delivered
    assert len([n for n in delivered if n.endswith(".dcm")]) == 2


def test_an_excluded_corrupt_file_is_left_alone(tmp_path, storescp, immediate_huey):
    series, broken = series_with_a_truncated_file(tmp_path / "in")
    target = dicom_target(storescp)
    target.exclude = broken.name
    target.save()

    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)

    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    assert (job.sent, job.failed, job.total) == (2, 0, 2)
