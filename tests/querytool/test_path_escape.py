"""Retrieval never writes outside its folder, whatever UIDs the source holds.

A real Orthanc holds a study whose SeriesInstanceUIDs are '../../../../tmp/x...' and
'..' and whose SOP Instance UIDs hold slashes (tests/hostile.py); it is retrieved by
C-GET, WADO-RS and from a local folder, through the worker's service function, into
the download folder and into the spool for a Folder target. Every folder is nested
deep in the test's tmp_path, so each escape would land inside tmp_path and be seen.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from querytool import services, tasks
from querytool.models import RetrievalJob, RetrievalState
from targets.models import DicomTarget, DicomWebTarget, FolderTarget
from tests.hostile import files_under, named_with, sop_uid_of

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]

DEEP = ("a", "b", "c", "d", "e", "f")


@pytest.fixture
def dirs(settings, tmp_path) -> Path:
    root = tmp_path.joinpath(*DEEP)
    for name, setting in (
        ("spool", "COURIER_SPOOL_DIR"),
        ("downloads", "COURIER_DOWNLOAD_DIR"),
        ("data", "DATA_DIR"),
    ):
        (root / name).mkdir(parents=True)
        setattr(settings, setting, root / name)
    return root


@pytest.fixture
def boss(django_user_model):
    return django_user_model.objects.create_superuser("boss", "b@example.org", "x")


def retrieve(source, user, study_uid, series=(), **destination) -> RetrievalJob:
    (job,) = services.start_retrieval(
        source,
        [services.RetrieveItem(study_uid, list(series), "../../label")],
        user,
        **destination,
    )
    return tasks.run_retrieval(job.pk)


def assert_contained(tmp_path: Path, allowed: list[Path], token: str) -> None:
    outside = {
        p
        for p in files_under(tmp_path)
        if not any(p.is_relative_to(a) for a in allowed)
    }
    assert not outside, f"written outside the destination: {sorted(outside)}"
    stray = {
        p
        for p in named_with(tmp_path, token)
        if not any(p.is_relative_to(a) for a in allowed)
    }
    assert not stray, sorted(stray)
    assert not list(Path("/tmp").glob(f"courier-x{token}*"))


def assert_clean_names(folder: Path) -> None:
    for path in files_under(folder):
        for part in path.relative_to(folder).parts:
            assert part not in (".", "..") and not part.startswith(".")


def test_c_get_of_a_study_with_path_uids_stays_in_the_download_folder(
    hostile_pacs, dirs, boss, tmp_path
):
    pacs = DicomTarget.objects.create(
        name="Hostile",
        host="127.0.0.1",
        port=hostile_pacs.orthanc.dicom_port,
        called_aet=hostile_pacs.orthanc.aet,
        direction="query",
        dimse_timeout=60,
    )
    crafted = hostile_pacs.crafted

    job = retrieve(pacs, boss, crafted.study_uid, download=True)

    assert job.state == RetrievalState.DONE, job.message
    dest = Path(job.output_path)
    assert dest.parent == (dirs / "downloads").resolve()
    assert_contained(tmp_path, [dest], crafted.token)
    assert_clean_names(dest)
    got = {sop_uid_of(p) for p in files_under(dest)}
    # Every instance arrived, with its own UID inside, and "1.2/3" and "1.2_3" did
    # not overwrite each other although both clean to "1.2_3".
    assert got == set(crafted.series_of)


def test_wado_rs_of_a_series_named_dot_dot_stays_in_the_download_folder(
    hostile_pacs, dirs, boss, tmp_path
):
    web = DicomWebTarget.objects.create(
        name="HostileWeb", url=hostile_pacs.orthanc.dicomweb_url, direction="query"
    )
    crafted = hostile_pacs.crafted

    # Orthanc answers the series URL ending in ".." with the whole study; before
    # the fix each instance went to dest/<its SeriesInstanceUID>/<its SOP UID>.dcm.
    job = retrieve(web, boss, crafted.study_uid, [".."], download=True)

    dest = Path(job.output_path)
    assert_contained(tmp_path, [dest], crafted.token)
    assert_clean_names(dest)
    assert job.state == RetrievalState.DONE, job.message
    assert {sop_uid_of(p) for p in files_under(dest)} <= set(crafted.series_of)
    assert job.done == len(files_under(dest)) > 0


def test_a_series_uid_with_slashes_is_one_url_segment_for_wado_rs(
    hostile_pacs, dirs, boss, tmp_path
):
    web = DicomWebTarget.objects.create(
        name="HostileWeb", url=hostile_pacs.orthanc.dicomweb_url, direction="query"
    )
    crafted = hostile_pacs.crafted
    series = next(s for s in crafted.series_of.values() if "/" in s)

    job = retrieve(web, boss, crafted.study_uid, [series], download=True)

    # Orthanc cannot address it by URL: a failure in words, nothing written astray.
    assert_contained(tmp_path, [Path(job.output_path)], crafted.token)
    assert job.state == RetrievalState.FAILED
    assert "WADO-RS answered 404" in job.message


def test_a_local_folder_with_path_uids_is_retrieved_into_the_download_folder(
    hostile_pacs, dirs, boss, tmp_path
):
    crafted = hostile_pacs.crafted
    source_folder = tmp_path / "watched"
    source_folder.mkdir()
    for path in crafted.files:
        shutil.copy(path, source_folder / path.name)
    local = DicomWebTarget.objects.create(
        name="Local", url=f"file://{source_folder}", direction="query"
    )

    job = retrieve(local, boss, crafted.study_uid, download=True)

    assert job.state == RetrievalState.DONE, job.message
    dest = Path(job.output_path)
    assert_contained(tmp_path, [dest, source_folder], crafted.token)
    assert_clean_names(dest)
    assert {sop_uid_of(p) for p in files_under(dest)} == set(crafted.series_of)


def test_c_get_into_the_spool_then_a_folder_target_keeps_every_file_inside(
    hostile_pacs,
    dirs,
    boss,
    tmp_path,
    immediate_huey,
    django_capture_on_commit_callbacks,
):
    pacs = DicomTarget.objects.create(
        name="Hostile",
        host="127.0.0.1",
        port=hostile_pacs.orthanc.dicom_port,
        called_aet=hostile_pacs.orthanc.aet,
        direction="query",
        dimse_timeout=60,
    )
    out = dirs / "delivered"
    out.mkdir()
    folder = FolderTarget.objects.create(
        name="Out",
        path=str(out),
        layout="{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}",
        direction="store",
    )
    crafted = hostile_pacs.crafted

    with django_capture_on_commit_callbacks(execute=True):
        services.start_retrieval(
            pacs,
            [services.RetrieveItem(crafted.study_uid, [], "x")],
            boss,
            destination=folder,
        )

    job = RetrievalJob.objects.get()
    assert job.state == RetrievalState.DONE, job.message
    assert_contained(tmp_path, [dirs / "spool", out], crafted.token)
    assert_clean_names(out)
    assert {sop_uid_of(p) for p in files_under(out)} == set(crafted.series_of)
