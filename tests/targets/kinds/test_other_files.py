"""A series folder's other files (reports, previews, results) reach the file kinds.

The product page: the exclusion filter exists because "if a processing step produces
dicoms, pngs and json, `*.png,*.json` will skip the png and json files from being
sent". So Folder, SFTP, rsync and S3 deliver every file of the folder but the excluded
ones, checked here on each real peer's side; DICOM sends the instances and says how
many other files it left out.
"""

from __future__ import annotations

import uuid
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from dispatch.jobs import direct
from dispatch.jobs.models import Job, State
from targets.models import (
    DicomTarget,
    FolderTarget,
    RsyncTarget,
    S3Target,
    SftpTarget,
    Target,
)
from targets.ssh import pin_host_key
from tests.dicomgen import GeneratedSeries, make_series

pytestmark = pytest.mark.django_db(transaction=True)

PDF = b"%PDF-1.4\n% a report\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
JSON = b'{"volume_ml": 12.5}\n'
EXCLUDE = "*.png,*.json"


@pytest.fixture
def series(tmp_path) -> GeneratedSeries:
    """Three CT instances, a PDF report, a PNG preview and JSON results in a subfolder."""
    generated = make_series(tmp_path / "processed", 3)
    (generated.folder / "report.pdf").write_bytes(PDF)
    (generated.folder / "preview.png").write_bytes(PNG)
    (generated.folder / "results").mkdir()
    (generated.folder / "results" / "measurements.json").write_bytes(JSON)
    return generated


def expected(series: GeneratedSeries, exclude: str) -> dict[str, bytes]:
    files = {
        f"{uid}.dcm": path.read_bytes()
        for uid, path in zip(series.sop_uids, series.files, strict=True)
    }
    files["report.pdf"] = PDF
    if not exclude:
        files["preview.png"] = PNG
        files["results/measurements.json"] = JSON
    return files


def read_tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


class FolderPeer:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "archive"
        self.root.mkdir()

    def target(self, exclude: str) -> Target:
        return FolderTarget.objects.create(
            name=f"folder-{uuid.uuid4().hex[:8]}", path=str(self.root), exclude=exclude
        )

    def received(self, target: Target, series: GeneratedSeries) -> dict[str, bytes]:
        return read_tree(self.root / series.study_uid / series.series_uid)


class SshPeer:
    def __init__(self, sshd, model: type[Target]):
        self.sshd = sshd
        self.model = model

    def target(self, exclude: str) -> Target:
        target = self.model.objects.create(
            name=f"{self.model.KIND}-{uuid.uuid4().hex[:8]}",
            host="127.0.0.1",
            port=self.sshd.port,
            username=self.sshd.key_user,
            private_key_path=str(self.sshd.client_key),
            path=f"incoming-{uuid.uuid4().hex[:8]}",
            exclude=exclude,
        )
        pin_host_key(target, self.sshd.host_key_fingerprint)
        return target

    def received(self, target: Target, series: GeneratedSeries) -> dict[str, bytes]:
        home = self.sshd.home(self.sshd.key_user)
        return read_tree(home / target.path / series.study_uid / series.series_uid)


class S3Peer:
    def __init__(self, seaweedfs):
        self.s3 = seaweedfs
        self.bucket = seaweedfs.create_bucket(f"other-{uuid.uuid4().hex[:10]}")

    def target(self, exclude: str) -> Target:
        return S3Target.objects.create(
            name=f"s3-{uuid.uuid4().hex[:8]}",
            bucket=self.bucket,
            region="us-east-1",
            prefix=f"results/{uuid.uuid4().hex[:8]}",
            endpoint_url=self.s3.endpoint_url,
            addressing_style="path",
            access_key_id=self.s3.admin.access_key,
            secret_key=self.s3.admin.secret_key,
            exclude=exclude,
        )

    def received(self, target: Target, series: GeneratedSeries) -> dict[str, bytes]:
        prefix = f"{target.prefix}/{series.study_uid}/{series.series_uid}/"
        client = self.s3.client()
        found = {}
        for key in self.s3.objects(self.bucket, prefix):
            obj = client.get_object(Bucket=self.bucket, Key=key)
            found[key.removeprefix(prefix)] = obj["Body"].read()
            if key.endswith(".pdf"):
                assert obj["ContentType"] == "application/pdf"
        return found


@pytest.fixture(params=["folder", "sftp", "rsync", "s3"])
def peer(request, tmp_path):
    if request.param == "folder":
        return FolderPeer(tmp_path)
    if request.param == "s3":
        return S3Peer(request.getfixturevalue("seaweedfs"))
    sshd = request.getfixturevalue("sshd")
    return SshPeer(sshd, SftpTarget if request.param == "sftp" else RsyncTarget)


@pytest.mark.parametrize("exclude", ["", EXCLUDE], ids=["everything", "excluded"])
def test_the_file_kinds_deliver_the_whole_folder_minus_the_exclusion_filter(
    peer, series, exclude
):
    target = peer.target(exclude)
    report = direct.send_series(target, series.folder)

    job = report.job
    assert job.state == State.DONE, job.last_error
    assert peer.received(target, series) == expected(series, exclude)
    delivered = 1 if exclude else 3
    assert (job.total, job.sent, job.other_files, job.other_sent) == (
        3,
        3,
        delivered,
        delivered,
    )
    assert job.skipped == 3 - delivered
    left_out = sorted(p.name for p, _ in report.left_out)
    assert left_out == ([] if not exclude else ["measurements.json", "preview.png"])
    assert all("exclusion filter" in why for _, why in report.left_out)


def test_a_dicom_target_sends_the_instances_and_says_what_it_left_out(storescp, series):
    DicomTarget.objects.create(
        name="pacs",
        host="127.0.0.1",
        port=storescp.port,
        called_aet=storescp.aet,
    )
    out, err = StringIO(), StringIO()
    call_command("send_series", "pacs", str(series.folder), stdout=out, stderr=err)

    received = " ".join(p.name for p in storescp.files())
    assert all(uid in received for uid in series.sop_uids)
    assert "3 sent" in out.getvalue() and "3 files left out" in out.getvalue()
    assert (
        "left out 3 files: 3 DICOM targets send DICOM instances only "
        "(e.g. preview.png, report.pdf, measurements.json)"
    ) in err.getvalue()
    job = Job.objects.get(target__name="pacs")
    assert "(3 instances; 3 files left out) → pacs" in str(job)
    assert job.other_files == 0 and job.skipped == 3
