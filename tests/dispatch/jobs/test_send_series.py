"""`manage.py send_series`: through call_command, and as a real process."""

from __future__ import annotations

import io
import urllib.request
from io import StringIO

import pydicom
import pytest
from django.core.management import CommandError, call_command

from dispatch.jobs.models import Job, JobOrigin, State
from targets.models import FolderTarget
from tests.dicomgen import make_series

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def target(tmp_path):
    (tmp_path / "out").mkdir()
    return FolderTarget.objects.create(name="Folder-A", path=str(tmp_path / "out"))


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("send_series", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_it_sends_a_folder_and_prints_a_summary_and_records_the_job(tmp_path, target):
    series = make_series(tmp_path / "in", 4)
    (series.folder / "readme.txt").write_text("not dicom")
    (series.folder / "thumb.png").write_bytes(b"\x89PNG")
    out, err = run("folder-a", str(series.folder), "--calling-aet", "MOD1")
    assert "4 sent" in out and "0 failed of 4 instances" in out and "MB in" in out
    assert "2 of 2 other files delivered" in out and "left out" not in out + err
    job = Job.objects.get()
    assert job.source == JobOrigin.SEND_SERIES and job.state == State.DONE
    assert job.calling_aet == "MOD1"
    assert job.attempts.get().sent == 4
    (folder,) = {p.parent for p in (tmp_path / "out").rglob("*.dcm")}
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".dcm") == [
        "readme.txt",
        "thumb.png",
    ]


def test_an_unknown_target_is_a_clear_error(tmp_path, target):
    with pytest.raises(CommandError, match="no target named 'nope'.*Folder-A"):
        run("nope", str(tmp_path))


def test_an_empty_folder_is_a_clear_error(tmp_path, target):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="no DICOM files"):
        run("Folder-A", str(tmp_path / "empty"))


def test_a_missing_folder_is_a_clear_error(tmp_path, target):
    with pytest.raises(CommandError, match="does not exist"):
        run("Folder-A", str(tmp_path / "missing"))


def test_a_failed_send_exits_non_zero_with_the_reason(tmp_path, target):
    series = make_series(tmp_path / "in", 2)
    FolderTarget.objects.filter(pk=target.pk).update(path=str(tmp_path / "gone"))
    with pytest.raises(CommandError, match="does not exist"):
        run("Folder-A", str(series.folder))
    job = Job.objects.get()
    assert job.state == State.FAILED  # the command does not retry by itself


def test_queue_prints_the_job_id_instead_of_waiting(
    tmp_path, target, monkeypatch, spool
):
    from dispatch.jobs import tasks

    sent = []
    monkeypatch.setattr(tasks, "run_job_task", lambda job_id: sent.append(job_id))
    series = make_series(tmp_path / "in", 3)
    out, _ = run("Folder-A", str(series.folder), "--queue")
    job = Job.objects.get()
    assert out.startswith(f"queued job {job.pk}: 3 instances to Folder-A")
    assert job.state == State.QUEUED and job.source == JobOrigin.QUEUE
    assert sent == [job.pk]
    # The job reads its own copy in the spool, which Courier deletes when done.
    assert job.owned_spool and job.folder.startswith(str(spool))


def test_it_sends_a_mixed_study_to_orthanc_with_the_pass_incoming_aet(
    orthanc, tmp_path
):
    from targets.models import DicomTarget
    from tests.dicomgen import make_mixed_study

    study = make_mixed_study(tmp_path / "study", ct=6, mr=4)
    DicomTarget.objects.create(
        name="pacs",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
        pass_calling_aet=True,
    )
    out, _ = run("PACS", str(tmp_path / "study"), "--calling-aet", "MODALITY1")
    assert "10 sent" in out and "0 failed of 10 instances" in out
    for series in study:
        for uid in series.sop_uids:
            oid = orthanc.find_instance(uid)
            assert oid
    # The dataset arrived intact (Orthanc writes its own preamble and meta header),
    # sent with the incoming calling AET.
    first = study[0]
    oid = orthanc.find_instance(first.sop_uids[0])
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(oid)))
    original = pydicom.dcmread(first.files[0])
    assert stored.PixelData == original.PixelData
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    url = f"{orthanc.base_url}/instances/{oid}/metadata/RemoteAET"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read().decode() == "MODALITY1"
    job = Job.objects.get()
    assert job.calling_aet == "MODALITY1" and job.state == State.DONE


def test_the_command_exits_non_zero_when_anything_failed(courier_site, tmp_path):
    site = courier_site().migrate()
    out = tmp_path / "out"
    out.mkdir()
    site.add_target(name="disk", kind="folder", path=str(out))
    series = make_series(tmp_path / "in", 3)

    ok = site.manage("send_series", "disk", str(series.folder))
    assert ok.returncode == 0 and "3 sent" in ok.stdout

    unknown = site.manage("send_series", "nope", str(series.folder), check=False)
    assert unknown.returncode == 1 and "no target named 'nope'" in unknown.stderr

    out.rename(tmp_path / "unmounted")
    failed = site.manage("send_series", "disk", str(series.folder), check=False)
    assert failed.returncode == 1
    assert "does not exist" in failed.stderr
