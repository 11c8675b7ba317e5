"""What a site's automation drives: `send_series --queue [--wait]`, `job_status`,
`test_target --on-worker`, as real processes beside a real `run_huey` worker."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from dispatch.jobs.models import Job, State
from targets.models import FolderTarget
from tests.dicomgen import make_series


def test_a_script_queues_deletes_its_folder_follows_and_checks_the_jobs(
    courier_site, tmp_path
):
    site = courier_site().migrate()
    out = tmp_path / "archive"
    out.mkdir()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the target's folder should be")
    site.python(
        "from targets.models import FolderTarget\n"
        f"FolderTarget.objects.create(name='disk', path={str(out)!r})\n"
        f"FolderTarget.objects.create(name='broken', path={str(blocker)!r})\n"
        "print(1)\n"
    )

    # Queued while no worker runs; the script deletes its folder at once.
    first = make_series(tmp_path / "first", 3)
    (first.folder / "report.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    queued = site.manage("send_series", "disk", str(first.folder), "--queue")
    job_id = int(re.search(r"queued job (\d+)", queued.stdout).group(1))
    assert "3 instances + 1 other file to disk" in queued.stdout
    shutil.rmtree(first.folder)
    waiting = site.manage("job_status", str(job_id), check=False)
    assert waiting.returncode == 2, waiting.stdout + waiting.stderr
    assert "state: Queued" in waiting.stdout

    worker = site.start_worker(2)
    # --wait follows a queued job to its end, with the summary and exit code of a
    # direct send.
    second = make_series(tmp_path / "second", 2)
    followed = site.manage(
        "send_series", "disk", str(second.folder), "--queue", "--wait"
    )
    assert "2 sent, 0 already present, 0 warnings, 0 failed of 2 instances" in (
        followed.stdout
    )
    failing = make_series(tmp_path / "third", 1)
    failed = site.manage(
        "send_series", "broken", str(failing.folder), "--queue", "--wait", check=False
    )
    assert failed.returncode == 1
    assert "sending to broken failed" in failed.stderr
    assert "is not a folder" in failed.stderr
    failed_id = int(re.search(r"queued job (\d+)", failed.stdout).group(1))

    site.wait_for(lambda: site.jobs()[0]["state"] == "done", what="first job done")
    status = site.manage("job_status", str(job_id), "--json")
    report = json.loads(status.stdout)
    assert report["state"] == "done" and report["finished"]
    assert (report["sent"], report["other_sent"], report["attempt_count"]) == (3, 1, 1)
    # Sent from Courier's own copy, which it removed once the job was done.
    (series_folder,) = {p.parent for p in out.rglob("*.dcm")} - {
        p.parent for p in out.rglob("*.dcm") if second.series_uid in str(p)
    }
    assert sorted(p.stem for p in series_folder.glob("*.dcm")) == sorted(first.sop_uids)
    assert (series_folder / "report.pdf").read_bytes() == b"%PDF-1.4\n%%EOF\n"
    # The failed job's copy is kept (for a retry, until the retention ends).
    ((kept,),) = site.query(
        "SELECT folder FROM dispatch_job WHERE id = ?", (failed_id,)
    )
    assert [str(p) for p in (site.spool / "queued").iterdir()] == [kept]

    tested = site.manage("test_target", "disk", "--on-worker")
    assert "Test of disk passed." in tested.stdout
    assert (
        f"ran on {socket.gethostname()} (worker process {worker.pid})" in tested.stdout
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "state, code",
    [
        (State.DONE, 0),
        (State.DONE_WITH_WARNINGS, 0),
        (State.FAILED, 1),
        (State.CANCELLED, 1),
        (State.QUEUED, 2),
        (State.SENDING, 2),
        (State.RETRY_WAIT, 2),
        (State.PAUSED, 2),
    ],
)
def test_job_status_exit_codes_say_done_failed_or_not_yet(tmp_path, state, code):
    target = FolderTarget.objects.create(name="disk", path=str(tmp_path))
    job = Job.objects.create(
        target=target, folder=str(tmp_path), source="queue", state=state, total=4
    )
    out = StringIO()
    with pytest.raises(SystemExit) if code else contextlib.nullcontext() as exited:
        call_command("job_status", str(job.pk), stdout=out)
    if code:
        assert exited.value.code == code
    assert f"job {job.pk}: 4 instances → disk" in out.getvalue()


@pytest.mark.django_db
@pytest.mark.parametrize("args", [["999999"], ["abc"], []])
def test_job_status_of_no_such_job_or_bad_usage_exits_3(args):
    with pytest.raises(CommandError) as raised:
        call_command("job_status", *args)
    assert raised.value.returncode == 3
