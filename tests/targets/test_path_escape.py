"""Every file-writing target keeps crafted tag values inside its destination.

One series of real files whose PatientID, SeriesInstanceUID and SOP Instance UIDs
are paths (tests/hostile.py) goes to a Folder target, the real sshd over SFTP and
rsync, the real SeaweedFS S3 gateway, the XNAT fake and a DICOMweb `file://` folder,
with a layout made of those tags. Nothing may land outside the destination, and the
two SOP Instance UIDs that clean to one name ("1.2/3", "1.2_3") stay two files.
"""

from __future__ import annotations

import uuid
import zipfile
from pathlib import Path

import pytest

from targets.kinds.base import FAILED
from targets.models import (
    DicomWebTarget,
    FolderTarget,
    RsyncTarget,
    S3Target,
    SftpTarget,
    XnatTarget,
)
from targets.paths import UnsafePath, inside, plain_name, remote_inside, uid_part
from targets.series import scan_folder
from targets.ssh import pin_host_key
from tests.fixtures.web_peers import XNAT_USERS
from tests.hostile import Crafted, files_under, named_with, sop_uid_of, write_crafted

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]

LAYOUT = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}"


@pytest.fixture
def crafted(tmp_path) -> Crafted:
    # The study UID is a path too here: nothing has to look it up on a PACS.
    return write_crafted(tmp_path / "src", study_uid="/etc/cron.d")


def assert_no_stray(roots: list[Path], allowed: Path, token: str) -> None:
    """Nothing carrying the token under `roots` (searched to depth 2) or in /tmp and
    / outside `allowed`."""
    stray = set()
    for root in roots:
        stray |= {p for p in named_with(root, token) if not p.is_relative_to(allowed)}
    for top in (Path("/"), Path("/tmp")):
        stray |= set(top.glob(f"*{token}*"))
    assert not stray, sorted(stray)


def assert_four_distinct(files: list[Path], crafted: Crafted) -> None:
    dicom = [f for f in files if f.suffix == ".dcm"]
    assert len(dicom) == 4
    assert {sop_uid_of(f) for f in dicom} == set(crafted.series_of)


def no_failures(result) -> None:
    assert not [o for o in result.outcomes if o.status == FAILED], result.outcomes


def test_a_folder_target_keeps_crafted_names_inside_and_apart(crafted, tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    out.mkdir(parents=True)
    target = FolderTarget(name="f", path=str(out), layout=LAYOUT)

    no_failures(target.handler.send(scan_folder(crafted.files[0].parent)))

    assert_no_stray([tmp_path], out, crafted.token)
    assert_four_distinct(sorted(files_under(out)), crafted)


def test_a_dicomweb_file_folder_keeps_crafted_names_inside_and_apart(crafted, tmp_path):
    out = tmp_path / "deep" / "er" / "web"
    out.mkdir(parents=True)
    target = DicomWebTarget(name="w", url=f"file://{out}")

    no_failures(target.handler.send(scan_folder(crafted.files[0].parent)))

    assert_no_stray([tmp_path], out, crafted.token)
    assert_four_distinct(sorted(files_under(out)), crafted)


def ssh_target(model, sshd, **fields):
    target = model.objects.create(
        name=f"t-{uuid.uuid4().hex[:8]}",
        host="127.0.0.1",
        port=sshd.port,
        username=sshd.key_user,
        private_key_path=str(sshd.client_key),
        path=f"incoming-{uuid.uuid4().hex[:8]}",
        layout=LAYOUT,
        **fields,
    )
    pin_host_key(target, sshd.host_key_fingerprint)
    return target


@pytest.mark.parametrize("model", [SftpTarget, RsyncTarget], ids=["sftp", "rsync"])
def test_sftp_and_rsync_keep_crafted_names_inside_the_remote_folder(
    model, crafted, sshd
):
    target = ssh_target(model, sshd)
    home = sshd.home(sshd.key_user)

    no_failures(target.handler.send(scan_folder(crafted.files[0].parent)))

    out = home / target.path
    assert_no_stray([home, home.parent], out, crafted.token)
    assert_four_distinct(sorted(files_under(out)), crafted)


def test_s3_keys_from_crafted_tags_have_no_dot_or_empty_segments(crafted, seaweedfs):
    bucket = seaweedfs.create_bucket(f"courier-{uuid.uuid4().hex[:10]}")
    target = S3Target.objects.create(
        name="s3",
        bucket=bucket,
        region="us-east-1",
        prefix="archive",
        endpoint_url=seaweedfs.endpoint_url,
        addressing_style="path",
        access_key_id=seaweedfs.admin.access_key,
        secret_key=seaweedfs.admin.secret_key,
        layout=LAYOUT,
    )

    no_failures(target.handler.send(scan_folder(crafted.files[0].parent)))

    keys = list(seaweedfs.objects(bucket))
    assert len(keys) == 4
    for key in keys:
        # A consumer syncing the bucket to disk (aws s3 sync) must meet no
        # '..', '.' or empty segment.
        assert key.startswith("archive/")
        assert not {"", ".", ".."} & set(key.split("/")), key


def test_xnat_zip_members_are_plain_distinct_file_names(crafted, xnat_fake, tmp_path):
    target = XnatTarget(
        name="x",
        url=xnat_fake.url,
        project="PROJ1",
        username="alice",
        password=XNAT_USERS["alice"],
    )

    no_failures(target.handler.send(scan_folder(crafted.files[0].parent)))

    [imported] = [i for i in xnat_fake.imports if i.subject.endswith(crafted.token)]
    assert len(imported.member_names) == 4
    assert len(set(imported.member_names)) == 4
    for name in imported.member_names:
        assert plain_name(name) == name and not name.startswith(".")
    # What XNAT's unzip (or anyone's) makes of them stays in its folder.
    archive = tmp_path / "members.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in imported.member_names:
            zf.writestr(name, b"x")
    unpacked = tmp_path / "unpacked" / "here"
    unpacked.mkdir(parents=True)
    for name in imported.member_names:
        assert (unpacked / name).resolve().parent == unpacked.resolve()


@pytest.mark.parametrize(
    "parts",
    [("..",), ("a", "../../b"), ("/etc",), ("a/../..",), (".",)],
)
def test_inside_refuses_every_way_out(tmp_path, parts):
    with pytest.raises(UnsafePath):
        inside(tmp_path, *parts)


def test_inside_refuses_a_symlink_leading_out(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath):
        inside(tmp_path / "root", "link", "x")


@pytest.mark.parametrize("parts", [("..",), ("a//b",), ("a", "."), ("a/../b",)])
def test_remote_paths_refuse_dot_and_empty_segments(parts):
    with pytest.raises(UnsafePath):
        remote_inside("/data", *parts)


def test_uid_part_keeps_valid_uids_and_separates_invalid_ones():
    assert uid_part("1.2.840.10008.1") == "1.2.840.10008.1"
    assert uid_part("1.2/3") != uid_part("1.2_3")
    assert uid_part("..").startswith("unknown-")
    assert uid_part("a" * 300) != uid_part("a" * 301)
    assert len(uid_part("a" * 300)) <= 128
