"""Rescans of a local folder: every change is noticed though unchanged folders are
skipped by their digest (new, changed, vanished, renamed, unreadable files and
folders), a scan cut short, an index from before the digests, study rows."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from targets.kinds.dicomweb import index as index_module
from targets.kinds.dicomweb.index import FolderIndex
from targets.models import DicomWebTarget
from targets.query import Criteria
from tests.dicomgen import make_series
from tests.nobody import as_nobody


@pytest.fixture
def folder(query_studies, tmp_path) -> Path:
    out = query_studies.copy_to(tmp_path / "archive")
    (out / "notes.txt").write_text("not DICOM")
    return out


@pytest.fixture
def data_dir(settings, tmp_path) -> Path:
    settings.DATA_DIR = tmp_path / "data"
    settings.DATA_DIR.mkdir()
    settings.COURIER_INDEX_MAX_AGE = 3600  # scans only where a test asks for one
    return settings.DATA_DIR


def study(folder: Path, accession: str):
    source = DicomWebTarget(
        name="archive", url=f"file://{folder}", direction="query"
    ).query_source()
    found = source.find_studies(Criteria(accessions=[accession]), 10).studies
    return found[0] if found else None


def test_a_file_rewritten_in_place_is_read_again_though_its_folder_did_not_change(
    folder, data_dir
):
    index = FolderIndex(folder)
    index.scan()
    path = sorted((folder / "study4").rglob("*.dcm"))[0]
    before = path.stat()
    folder_time = path.parent.stat().st_mtime_ns
    data = path.read_bytes()
    changed = data.replace(b"MR KNEE LEFT", b"MR KNEE LEFX")  # the same size
    assert changed != data
    with open(path, "r+b") as f:  # in place: same name, same inode
        f.write(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert path.parent.stat().st_mtime_ns == folder_time

    report = index.scan()

    assert (report.updated, report.added, report.removed, report.read) == (1, 0, 0, 1)
    assert report.unchanged == report.seen - 1
    assert study(folder, "ACC004").description == "MR KNEE LEFX"


def test_new_vanished_and_renamed_folders_are_noticed_and_studies_recounted(
    folder, query_studies, data_dir
):
    index = FolderIndex(folder)
    index.scan()
    acc2 = query_studies.by_accession("ACC002")
    shutil.rmtree(folder / "study1" / "series2")  # 2 instances of ACC001
    (folder / "study3").rename(folder / "study3-moved")  # ACC003's 3 instances
    make_series(
        folder / "study2" / "series9",
        4,
        kind="mr",
        study_uid=acc2.study_uid,
        patient_id="P001",
        tags={"AccessionNumber": "ACC002", "StudyDate": acc2.study_date},
    )

    report = index.scan()

    assert (report.added, report.removed, report.updated) == (4 + 3, 2 + 3, 0)
    one = study(folder, "ACC001")
    assert (one.series_count, one.instance_count) == (1, 3)
    two = study(folder, "ACC002")
    assert (two.series_count, two.instance_count) == (2, 2 + 4)
    assert study(folder, "ACC003").instance_count == 3
    with index.connect() as db:
        paths = {r[0] for r in db.execute("SELECT path FROM dirs")}
        orphans = db.execute("SELECT count(*) FROM files WHERE dir_id IS NULL")
        assert orphans.fetchone()[0] == 0
    assert "study3-moved/series1" in paths and "study3/series1" not in paths
    assert "study1/series2" not in paths

    # The folder of a study removed whole: the study goes from the search.
    shutil.rmtree(folder / "study3-moved")
    assert index.scan().removed == 3
    assert study(folder, "ACC003") is None


def test_a_file_that_cannot_be_read_is_listed_and_indexed_once_it_can_be(
    shared_tmp, query_studies
):
    archive = query_studies.copy_to(shared_tmp / "archive")
    for path in [archive, *archive.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    locked = sorted((archive / "study2").rglob("*.dcm"))[0]
    locked.chmod(0o000)
    rel = str(locked.relative_to(archive))

    def scan():
        return FolderIndex(archive).scan()

    status, first = as_nobody(scan)
    assert status == "ok", first
    assert first.problems == [(rel, "cannot be read: Permission denied")]
    assert first.added == query_studies.instances - 1

    locked.chmod(0o644)  # permissions only: size and modification time as before
    status, second = as_nobody(scan)
    assert status == "ok", second
    assert (second.added, second.read, second.problems) == (1, 1, [])
    _, third = as_nobody(scan)
    assert third.read == 0 and third.unchanged == query_studies.instances


def test_a_scan_cut_short_leaves_the_rest_to_the_next_scan(
    folder, query_studies, data_dir, monkeypatch
):
    index = FolderIndex(folder)
    monkeypatch.setattr(index_module, "_CHUNK", 3)
    real = index_module._read_chunk
    calls = []

    def dies_at_the_second_chunk(paths):
        calls.append(paths)
        if len(calls) == 2:
            raise OSError("the disk went away")
        return real(paths)

    monkeypatch.setattr(index_module, "_read_chunk", dies_at_the_second_chunk)
    with pytest.raises(OSError):
        index.scan()
    assert index.counts()["instances"] + index.counts()["problems"] == 3

    monkeypatch.setattr(index_module, "_read_chunk", real)
    report = index.scan()

    files = query_studies.instances + 1  # and notes.txt
    assert report.read == files - 3 and report.unchanged == 3
    assert index.counts() == {"instances": query_studies.instances, "problems": 1}
    assert index.scan().read == 0


# The schema of an index written before folders had digests (version 1).
V1_SCHEMA = """
CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, transfer_syntax TEXT NOT NULL DEFAULT '', {columns});
CREATE INDEX files_study ON files (study_uid);
CREATE INDEX files_series ON files (series_uid);
CREATE INDEX files_patient ON files (patient_id);
CREATE INDEX files_accession ON files (accession);
CREATE INDEX files_date ON files (study_date);
CREATE TABLE problems (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_an_index_of_version_1_is_upgraded_without_reading_the_files_again(
    folder, query_studies, data_dir, tmp_path
):
    current = FolderIndex(folder, index_path=tmp_path / "current.sqlite3")
    current.scan()
    names = ", ".join(c for c, _ in index_module.COLUMNS)
    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as db:
        db.executescript(
            V1_SCHEMA.format(
                columns=", ".join(f"{c} TEXT" for c, _ in index_module.COLUMNS)
            )
        )
        db.execute("ATTACH ? AS cur", (str(current.path),))
        db.execute(
            f"INSERT INTO files SELECT path, size, mtime_ns, transfer_syntax, {names} "
            "FROM cur.files"
        )
        db.execute(
            "INSERT INTO problems SELECT path, size, mtime_ns, reason FROM cur.problems"
        )
        db.execute("INSERT INTO meta VALUES ('last_scan', '1')")
    gone = sorted((folder / "study1").rglob("*.dcm"))[0]
    gone.unlink()

    upgraded = FolderIndex(folder, index_path=old)
    assert study(folder, "ACC001") is not None  # searches work before any scan
    report = upgraded.scan()

    assert (report.read, report.removed) == (0, 1)
    assert report.unchanged == report.seen == query_studies.instances  # + notes - gone
    with upgraded.connect() as db:
        assert (
            db.execute("SELECT count(*) FROM files WHERE dir_id IS NULL").fetchone()[0]
            == 0
        )
        assert (
            db.execute("SELECT count(*) FROM dirs WHERE digest = x''").fetchone()[0]
            == 0
        )
        row = db.execute(
            "SELECT instance_count FROM studies WHERE accession='ACC001'"
        ).fetchone()
    assert row[0] == query_studies.by_accession("ACC001").instances - 1
    assert upgraded.scan().read == 0


def test_names_and_descriptions_match_without_regard_to_case_beyond_ascii(
    folder, data_dir
):
    make_series(
        folder / "unicode",
        1,
        tags={
            "SpecificCharacterSet": "ISO_IR 192",
            "PatientName": "MÜLLER^JÖRG",
            "StudyDescription": "CT THORAX ÜBERSICHT",
            "AccessionNumber": "UNI1",
        },
    )
    FolderIndex(folder).scan()
    source = DicomWebTarget(
        name="archive", url=f"file://{folder}", direction="query"
    ).query_source()

    def found(**criteria) -> set[str]:
        return {
            s.accession for s in source.find_studies(Criteria(**criteria), 50).studies
        }

    assert found(patient_name="müller^jörg") == {"UNI1"}
    assert found(patient_name="mÜl*") == {"UNI1"}
    assert found(study_description="*übersicht") == {"UNI1"}
    assert found(study_description="ct thorax übersicht") == {"UNI1"}
    assert found(patient_name="MULLER*") == set()


def test_the_walk_on_several_threads_lists_every_folder_once(tmp_path):
    expected = {}
    for a in range(6):
        for b in range(5):
            folder = tmp_path / f"p{a}" / f"s{b}"
            folder.mkdir(parents=True)
            for n in range(a + b):
                (folder / f"f{n}").write_bytes(b"x" * n)
            expected[f"p{a}/s{b}"] = sorted(f"f{n}" for n in range(a + b))
    (tmp_path / "top").write_bytes(b"top")
    expected[""] = ["top"]
    expected.update({f"p{a}": [] for a in range(6)})

    def listing(threads: int) -> dict:
        walked: dict[str, tuple] = {}
        for rel, names, stats, digest in index_module._walk(str(tmp_path), [], threads):
            assert rel not in walked
            walked[rel] = (sorted(names), digest)
            assert [stats[i] for i in range(0, len(stats), 2)] == [
                (tmp_path / rel / name).stat().st_size for name in names
            ]
        return walked

    one, four = listing(1), listing(4)
    assert {rel: names for rel, (names, _) in four.items()} == expected
    assert four == one  # the same digests whatever the number of threads
