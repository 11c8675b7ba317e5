"""Folder targets, for real on the local file system (tests run as root: a read-only
folder is made with `chattr +i` or a read-only bind mount, a full disk with a tiny
tmpfs, since root ignores permission bits)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from targets.kinds.base import FAILED, PRESENT, SENT, TargetError
from targets.kinds.folder import handler as folder_module
from targets.kinds.folder.handler import TMP_PREFIX, FolderHandler
from targets.models import DicomTarget, FolderTarget
from targets.series import scan_folder
from tests.dicomgen import make_series


def folder_target(path: Path, **kwargs) -> FolderTarget:
    return FolderTarget(name="folder", path=str(path), **kwargs)


def visible(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith("."))


@pytest.fixture
def series(tmp_path):
    return make_series(tmp_path / "src", 5)


@pytest.fixture
def dest(tmp_path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


@pytest.fixture
def immutable_folder(tmp_path):
    """A folder even root cannot write into."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture
def read_only_mount(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(
        ["mount", "--bind", "-o", "ro", str(folder), str(folder)], check=True
    )
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KB file system: the second 39 KB instance does not fit."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], check=True
    )
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_it_writes_one_file_per_instance_under_study_and_series(series, dest):
    result = FolderHandler(folder_target(dest)).send(scan_folder(series.folder))

    assert result.sent == 5 and result.failed == 0
    series_dir = dest / series.study_uid / series.series_uid
    assert sorted(p.name for p in series_dir.iterdir()) == sorted(
        f"{uid}.dcm" for uid in series.sop_uids
    )
    for src in series.files:
        uid = next(u for u in series.sop_uids if u in src.read_bytes().decode("latin1"))
        assert (series_dir / f"{uid}.dcm").read_bytes() == src.read_bytes()
    assert visible(dest) == [series.study_uid]
    assert visible(dest / series.study_uid) == [series.series_uid]


def test_a_series_folder_appears_only_when_complete(series, dest, monkeypatch):
    """While files are written, only a hidden temporary folder exists."""
    seen_during_write: list[tuple[list[str], list[str]]] = []
    real_copy = folder_module._copy

    def spying_copy(src, dst):
        study_dir = dest / series.study_uid
        seen_during_write.append(
            (visible(study_dir), sorted(p.name for p in study_dir.iterdir()))
        )
        real_copy(src, dst)

    monkeypatch.setattr(folder_module, "_copy", spying_copy)
    reported_with_folder_visible = []

    def progress(outcome):
        reported_with_folder_visible.append(
            (dest / series.study_uid / series.series_uid).is_dir()
        )

    FolderHandler(folder_target(dest)).send(
        scan_folder(series.folder), progress=progress
    )

    assert len(seen_during_write) == 5
    for visible_names, all_names in seen_during_write:
        assert visible_names == []
        assert len(all_names) == 1 and all_names[0].startswith(TMP_PREFIX)
    # Outcomes are reported only once the files are in their final place.
    assert reported_with_folder_visible == [True] * 5
    assert sorted(p.name for p in (dest / series.study_uid).iterdir()) == [
        series.series_uid
    ]


def test_a_second_send_counts_existing_files_as_present_and_adds_new_ones(
    tmp_path, dest
):
    first = make_series(tmp_path / "a", 3)
    FolderHandler(folder_target(dest)).send(scan_folder(first.folder))
    # Two more instances of the same series arrive later.
    more = tmp_path / "b"
    more.mkdir()
    for f in first.files:
        (more / f.name).write_bytes(f.read_bytes())
    extra = make_series(tmp_path / "extra", 2)
    for i, f in enumerate(extra.files):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = first.study_uid
        ds.SeriesInstanceUID = first.series_uid
        ds.save_as(more / f"extra{i}.dcm")

    result = FolderHandler(folder_target(dest)).send(scan_folder(more))

    assert (result.present, result.sent) == (3, 2)
    series_dir = dest / first.study_uid / first.series_uid
    assert len(list(series_dir.iterdir())) == 5
    assert [p.name for p in (dest / first.study_uid).iterdir()] == [first.series_uid]


def test_a_layout_from_hostile_tag_values_stays_inside_the_folder(tmp_path, dest):
    gen = make_series(
        tmp_path / "src",
        2,
        patient_id="../../escaped",
        tags={"SeriesDescription": "a/b/../../c", "StudyDescription": ".."},
    )
    target = folder_target(
        dest, layout="{PatientID}/{StudyDescription}/{SeriesDescription}"
    )

    result = FolderHandler(target).send(scan_folder(gen.folder))

    assert result.sent == 2
    assert not (tmp_path / "escaped").exists()
    written = sorted(dest.rglob("*.dcm"))
    assert len(written) == 2
    for path in written:
        rel = path.relative_to(dest)
        assert len(rel.parts) == 4
        assert all(
            part not in ("", ".", "..") and "/" not in part for part in rel.parts
        )
    assert all(p.resolve().is_relative_to(dest.resolve()) for p in written)


def test_the_exclusion_filter_trims_spaces_around_globs(series, dest):
    target = folder_target(dest, exclude=" CT00001.dcm ,  CT0000[23].dcm ,")

    result = FolderHandler(target).send(scan_folder(series.folder))

    assert result.sent == 2
    written = {p.name for p in dest.rglob("*.dcm")}
    assert written == {f"{uid}.dcm" for uid in series.sop_uids[3:]}


def test_it_writes_a_complete_marker_when_asked(series, dest):
    FolderHandler(folder_target(dest, write_complete_marker=True)).send(
        scan_folder(series.folder)
    )
    series_dir = dest / series.study_uid / series.series_uid
    assert (series_dir / ".complete").is_file()
    assert len(list(series_dir.glob("*.dcm"))) == 5


def test_it_writes_no_marker_by_default(series, dest):
    FolderHandler(folder_target(dest)).send(scan_folder(series.folder))
    assert not list(dest.rglob(".complete"))


def test_a_missing_layout_tag_fails_those_instances_with_the_reason(series, dest):
    outcomes = []
    result = FolderHandler(folder_target(dest, layout="{AccessionNumber}x/")).send(
        scan_folder(series.folder), progress=outcomes.append
    )
    # The bundled CT has an empty AccessionNumber.
    assert result.failed == 5 and len(outcomes) == 5
    assert all("AccessionNumber" in o.message for o in outcomes)
    assert {o.status for o in outcomes} == {FAILED}


def test_the_check_passes_on_a_writable_folder_and_leaves_no_probe(dest):
    result = FolderHandler(folder_target(dest)).test()

    assert result.ok, result.as_dict()
    assert [c.name for c in result.checks] == [
        "folder exists",
        "is a folder",
        "writable",
        "free space",
    ]
    assert "free of" in result.checks[-1].message
    assert list(dest.iterdir()) == []


def test_the_check_fails_in_words_on_a_missing_folder(tmp_path):
    result = FolderHandler(folder_target(tmp_path / "nope")).test()
    assert not result.ok
    assert result.checks[0].name == "folder exists"
    assert "does not exist" in result.checks[0].message
    assert len(result.checks) == 1


def test_the_check_fails_on_a_file_instead_of_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = FolderHandler(folder_target(f)).test()
    assert not result.ok
    assert result.checks[-1].name == "is a folder"
    assert "not a folder" in result.checks[-1].message


def test_the_check_fails_on_a_folder_root_cannot_write(immutable_folder):
    result = FolderHandler(folder_target(immutable_folder)).test()
    assert not result.ok
    failed = result.checks[-1]
    assert failed.name == "writable"
    assert "permission denied" in failed.message


def test_the_check_fails_on_a_read_only_mount(read_only_mount):
    result = FolderHandler(folder_target(read_only_mount)).test()
    assert not result.ok
    assert result.checks[-1].name == "writable"
    assert "read-only file system" in result.checks[-1].message


def test_sending_to_a_folder_root_cannot_write_is_a_permanent_error(
    series, immutable_folder
):
    with pytest.raises(TargetError) as err:
        FolderHandler(folder_target(immutable_folder)).send(scan_folder(series.folder))
    assert err.value.permanent
    assert "permission denied" in str(err.value)


def test_a_full_disk_is_a_transient_error_and_leaves_nothing_half_written(
    series, tiny_disk
):
    outcomes = []
    with pytest.raises(TargetError) as err:
        FolderHandler(folder_target(tiny_disk)).send(
            scan_folder(series.folder), progress=outcomes.append
        )
    assert not err.value.permanent
    assert "disk full" in str(err.value)
    assert outcomes == []
    leftovers = [p for p in tiny_disk.rglob("*") if p.is_file()]
    assert leftovers == []
    assert visible(tiny_disk / series.study_uid) == []


def test_sending_to_a_missing_folder_is_retried_later_not_created(series, tmp_path):
    missing = tmp_path / "not-mounted"
    with pytest.raises(TargetError) as err:
        FolderHandler(folder_target(missing)).send(scan_folder(series.folder))
    assert not err.value.permanent
    assert "does not exist" in str(err.value)
    assert not missing.exists()


def test_files_present_with_the_same_content_are_not_rewritten(series, dest):
    handler = FolderHandler(folder_target(dest))
    handler.send(scan_folder(series.folder))
    series_dir = dest / series.study_uid / series.series_uid
    inodes = {p.name: p.stat().st_ino for p in series_dir.iterdir()}

    outcomes = []
    result = handler.send(scan_folder(series.folder), progress=outcomes.append)

    assert result.present == 5 and result.sent == 0
    assert {o.status for o in outcomes} == {PRESENT}
    assert {p.name: p.stat().st_ino for p in series_dir.iterdir()} == inodes
    assert not [p for p in (dest / series.study_uid).iterdir() if p.name[0] == "."]


@pytest.mark.parametrize("layout", ["", "/"], ids=["series-folder", "in-place"])
def test_a_corrected_file_of_the_same_size_replaces_the_old_one(series, dest, layout):
    handler = FolderHandler(folder_target(dest, layout=layout))
    handler.send(scan_folder(series.folder))
    # A corrected re-send: same SOP Instance UID, same size, one pixel changed.
    source = series.files[2]
    data = bytearray(source.read_bytes())
    data[-1] ^= 0xFF
    source.write_bytes(data)

    result = handler.send(scan_folder(series.folder))

    assert (result.present, result.sent) == (4, 1)
    [sent] = [o for o in result.outcomes if o.status == SENT]
    assert sent.sop_instance_uid == pydicom.dcmread(source).SOPInstanceUID
    written = dest if layout == "/" else dest / series.study_uid / series.series_uid
    assert (written / f"{sent.sop_instance_uid}.dcm").read_bytes() == bytes(data)
    assert not [p for p in written.parent.rglob(".*") if p.name != ".complete"]


@pytest.mark.django_db
def test_what_a_folder_target_wrote_is_accepted_by_a_dicom_peer(series, dest, orthanc):
    """The files are complete DICOM files: a DICOM target sends them on unchanged."""
    FolderHandler(folder_target(dest)).send(scan_folder(series.folder))
    written = scan_folder(dest)
    assert len(written) == 5 and not written.skipped

    dicom = DicomTarget(
        name="orthanc",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
    )
    result = dicom.handler.send(written)

    assert result.sent == 5 and result.failed == 0
    for uid in series.sop_uids:
        assert orthanc.find_instance(uid) is not None
    src = series.files[0]
    uid = series.sop_uids[0]
    copy = dest / series.study_uid / series.series_uid / f"{uid}.dcm"
    assert copy.read_bytes() == src.read_bytes()
    assert os.path.getsize(copy) == src.stat().st_size
    assert {o.status for o in result.outcomes} == {SENT}


def test_every_file_and_folder_is_fsynced_before_the_series_appears(
    series, dest, monkeypatch
):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    renamed_with: list[set[str]] = []
    real_rename = os.rename

    def recording_rename(src, dst, *args, **kwargs):
        renamed_with.append(set(synced))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(folder_module.os, "fsync", recording_fsync)
    monkeypatch.setattr(folder_module.os, "rename", recording_rename)

    FolderHandler(folder_target(dest, write_complete_marker=True)).send(
        scan_folder(series.folder)
    )

    assert len(renamed_with) == 1
    before = renamed_with[0]
    tmp_files = {p for p in before if "/" + TMP_PREFIX in p}
    names = {Path(p).name for p in tmp_files}
    assert names >= {f"{uid}.dcm" for uid in series.sop_uids} | {".complete"}
    assert any(Path(p).name.startswith(TMP_PREFIX) for p in before)  # the folder
    # and the parent folder after the rename
    assert str(dest / series.study_uid) in synced


def test_a_stale_temporary_folder_from_a_crash_is_removed(series, dest):
    study = dest / series.study_uid
    study.mkdir()
    stale = study / f"{TMP_PREFIX}{series.series_uid}-deadbeef0000"
    stale.mkdir()
    (stale / "half.dcm").write_bytes(b"x")
    os.utime(stale, (0, 0))
    running = study / f"{TMP_PREFIX}{series.series_uid}-0123456789ab"
    running.mkdir()

    FolderHandler(folder_target(dest)).send(scan_folder(series.folder))

    assert not stale.exists()
    assert running.exists()  # a send in progress elsewhere is left alone
