"""A truncated DICOM file in a series that becomes a job (routing a received series,
`send_series --queue`, and `send_series` itself all go through `create_jobs`).

The file is never sent (right), and `send_series` prints "failed: <name>: corrupt
DICOM (...)". But the job does not count it: it is one of the "other files left
out", the job ends *done* with "0 failed", and `send_series` (direct or `--queue
--wait`) exits 0, although the README promises exit code 1 "if anything failed" and
issue 13 says a malformed file "fails that instance with words". The job's page and
`job_status` name neither the file nor the reason. Reported for routing (the job
rows are made in dispatch/jobs/services.py and files.py; the states and counts in
the engine). Fixed on issue13-finish: a corrupt file found by the scan is a failed
instance of the job, named with the reason.
"""

from __future__ import annotations

import pytest

from dispatch.jobs import services
from dispatch.jobs.models import InstanceState, State
from targets.models import DicomTarget
from tests.dicomgen import make_series


@pytest.mark.django_db(transaction=True)
def test_a_truncated_instance_fails_the_job_by_name(tmp_path, storescp, immediate_huey):
    series = make_series(tmp_path / "in", 3)
    broken = sorted(series.folder.glob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:-1000])
    target = DicomTarget.objects.create(
        name="qa-corrupt", host="127.0.0.1", port=storescp.port,
        called_aet=storescp.aet, retry_max_attempts=1,
    )  # fmt: skip

    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)

    job.refresh_from_db()
    assert job.sent == 2
    assert job.state != State.DONE, "a series missing an instance is not done"
    assert job.instances.filter(
        path__endswith=broken.name,
        state=InstanceState.FAILED,
        message__contains="corrupt DICOM",
    ).exists()
