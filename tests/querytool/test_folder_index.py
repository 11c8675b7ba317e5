"""The local-folder index and the folder source: build, incremental scans, filters."""

from __future__ import annotations

import os
import subprocess
from datetime import date
from io import StringIO
from pathlib import Path

import pydicom
import pytest
from django.core.management import call_command

from targets.kinds.dicomweb.index import INDEX_NAME, FolderIndex, like_pattern
from targets.models import DicomWebTarget
from targets.query import Criteria, RetrieveRequest
from tests.dicomgen import make_series


@pytest.fixture
def folder(query_studies, tmp_path) -> Path:
    out = query_studies.copy_to(tmp_path / "archive")
    (out / "notes.txt").write_text("not DICOM")
    (out / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    return out


@pytest.fixture
def data_dir(settings, tmp_path) -> Path:
    settings.DATA_DIR = tmp_path / "data"
    settings.DATA_DIR.mkdir()
    return settings.DATA_DIR


def folder_source(folder: Path):
    return DicomWebTarget(
        name="archive", url=f"file://{folder}", direction="query"
    ).query_source()


def accessions(search) -> set[str]:
    return {s.accession for s in search.studies}


def test_first_scan_indexes_every_instance_and_lists_non_dicom_files(
    folder, query_studies, data_dir
):
    index = FolderIndex(folder)
    assert index.path == folder / INDEX_NAME
    report = index.scan()
    # The two files that are not DICOM are listed, not counted as added.
    assert (report.added, report.not_dicom) == (query_studies.instances, 2)
    assert index.counts() == {"instances": query_studies.instances, "problems": 2}
    problems = dict(report.problems)
    assert "not a DICOM file" in problems["notes.txt"]
    assert "broken.dcm" in problems
    with index.connect() as db:
        row = db.execute(
            "SELECT * FROM files WHERE accession='ACC001' LIMIT 1"
        ).fetchone()
    assert row["patient_name"] == "DOE^JOHN"
    assert row["birth_date"] == "19700101"
    assert row["study_description"] == "CT CHEST"
    assert row["modality"] == "CT"
    assert row["transfer_syntax"]
    assert row["sop_class_uid"] and row["sop_instance_uid"]
    assert row["size"] > 0 and row["series_number"] in (1, 2)


def test_unchanged_rescan_reads_no_header(folder, data_dir):
    index = FolderIndex(folder)
    index.scan()
    report = index.scan()
    assert (report.read, report.removed) == (0, 0)
    assert report.unchanged == report.seen


def test_rescan_reads_only_added_and_changed_files_and_drops_deleted_ones(
    folder, query_studies, data_dir
):
    index = FolderIndex(folder)
    index.scan()
    make_series(folder / "new", 3, patient_id="P900", tags={"AccessionNumber": "NEW1"})
    changed = sorted((folder / "study4").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(changed)
    ds.StudyDescription = "MR KNEE RIGHT (corrected)"
    ds.save_as(changed)
    os.utime(changed, ns=(1, 1_000_000_000))  # a different mtime even if size matched
    deleted = sorted((folder / "study3").rglob("*.dcm"))[0]
    deleted.unlink()
    (folder / "notes.txt").unlink()

    report = index.scan()
    assert (report.added, report.updated, report.removed) == (3, 1, 2)
    src = folder_source(folder)
    assert accessions(src.find_studies(Criteria(accessions=["NEW1"]), 10)) == {"NEW1"}
    (study3,) = src.find_studies(Criteria(accessions=["ACC003"]), 10).studies
    assert study3.instance_count == 2
    with index.connect() as db:
        descs = {
            r[0]
            for r in db.execute(
                "SELECT study_description FROM files WHERE accession='ACC004'"
            )
        }
    assert "MR KNEE RIGHT (corrected)" in descs
    assert dict(report.problems).keys() == {"broken.dcm"}


@pytest.fixture
def read_only_folder(folder):
    """The folder bind-mounted read-only: root cannot write there either."""
    mount = folder.parent / "read-only"
    mount.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_read_only_folder_keeps_its_index_in_the_data_dir(
    read_only_folder, data_dir, query_studies
):
    with pytest.raises(OSError):
        (read_only_folder / "probe").touch()
    index = FolderIndex(read_only_folder)
    assert index.path.parent == data_dir / "indexes"
    index.scan()
    assert index.counts()["instances"] == query_studies.instances
    assert not (read_only_folder / INDEX_NAME).exists()
    again = FolderIndex(read_only_folder)
    assert again.path == index.path
    assert again.scan().read == 0


def test_folder_search_filters(folder, data_dir):
    src = folder_source(folder)
    assert accessions(src.find_studies(Criteria(patient_id="P001"), 50)) == {
        "ACC001",
        "ACC002",
    }
    assert accessions(src.find_studies(Criteria(patient_name="doe^*"), 50)) == {
        "ACC001",
        "ACC002",
        "ACC003",
    }
    assert accessions(src.find_studies(Criteria(patient_name="DOE^JA?E"), 50)) == {
        "ACC003"
    }
    found = src.find_studies(
        Criteria(date_from=date(2024, 1, 1), date_to=date(2024, 1, 31)), 50
    )
    assert accessions(found) == {"ACC001", "ACC_5%"}
    assert accessions(src.find_studies(Criteria(modality="MR"), 50)) == {
        "ACC002",
        "ACC004",
    }


def test_folder_description_filters_really_filter(folder, data_dir):
    src = folder_source(folder)
    assert accessions(src.find_studies(Criteria(study_description="CT CHEST"), 50)) == {
        "ACC001"
    }
    assert accessions(src.find_studies(Criteria(study_description="mr*"), 50)) == {
        "ACC002",
        "ACC004",
    }
    assert accessions(src.find_studies(Criteria(study_description="*KNEE*"), 50)) == {
        "ACC004"
    }
    assert src.find_studies(Criteria(study_description="NOTHING*"), 50).studies == []


def test_sql_wildcard_characters_in_values_are_literal(folder, data_dir):
    src = folder_source(folder)
    assert accessions(src.find_studies(Criteria(accessions=["ACC_5%"]), 50)) == {
        "ACC_5%"
    }
    # `_` and `%` are not wildcards: "ACC_0*" must not match ACC001..ACC004.
    assert src.find_studies(Criteria(accessions=["ACC_0*"]), 50).studies == []
    assert like_pattern("A_%\\*?") == ("A\\_\\%\\\\%_", True)


def test_folder_study_columns_series_and_missing_accessions(
    folder, query_studies, data_dir
):
    src = folder_source(folder)
    found = src.find_studies(Criteria(accessions=["ACC001", "GONE", "ACC004"]), 50)
    assert found.missing_accessions == ["GONE"]
    study = next(s for s in found.studies if s.accession == "ACC001")
    assert (study.series_count, study.instance_count, study.modalities) == (
        2,
        5,
        ["CT"],
    )
    assert study.birth_date == "19700101"
    series = src.find_series(study.study_uid)
    assert [s.instance_count for s in series] == [3, 2]
    assert [s.series_uid for s in series] == query_studies.by_accession(
        "ACC001"
    ).series_uids


def test_folder_limit_is_reported(folder, data_dir):
    found = folder_source(folder).find_studies(Criteria(), 2)
    assert len(found.studies) == 2 and found.truncated


def test_folder_retrieve_copies_the_instances(
    folder, query_studies, data_dir, tmp_path
):
    facts = query_studies.by_accession("ACC001")
    result = folder_source(folder).retrieve(
        RetrieveRequest(facts.study_uid, [facts.series_uids[0]]),
        tmp_path / "out",
        lambda *a: None,
    )
    assert result.completed == 3
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3


def test_a_stale_index_is_rescanned_before_a_query(folder, data_dir, settings):
    src = folder_source(folder)
    settings.COURIER_INDEX_MAX_AGE = 3600
    src.find_studies(Criteria(), 50)
    make_series(folder / "late", 2, tags={"AccessionNumber": "LATE1"})
    assert src.find_studies(Criteria(accessions=["LATE1"]), 50).studies == []
    settings.COURIER_INDEX_MAX_AGE = 0
    assert accessions(src.find_studies(Criteria(accessions=["LATE1"]), 50)) == {"LATE1"}


@pytest.mark.django_db
def test_index_folder_command_scans_and_lists_problems(folder, data_dir, query_studies):
    DicomWebTarget.objects.create(
        name="Archive", url=f"file://{folder}", direction="query"
    )
    out = StringIO()
    call_command("index_folder", "archive", stdout=out)
    text = out.getvalue()
    files = query_studies.instances + 2
    assert (
        f"Archive: {files} files, {query_studies.instances} added, 0 changed, "
        "0 removed, 0 unchanged, 2 not DICOM or unreadable in"
    ) in text
    assert "notes.txt" in text and "broken.dcm" in text
    assert (folder / INDEX_NAME).exists()
    (folder / "later.json").write_text("{}")
    out = StringIO()
    call_command("index_folder", "archive", stdout=out)
    assert (
        f"{files + 1} files, 0 added, 0 changed, 0 removed, {files} unchanged, "
        "1 not DICOM or unreadable in" in out.getvalue()
    )


def test_fast_header_reader_agrees_with_pydicom(query_studies, tmp_path):
    from pydicom import examples
    from pydicom.uid import ImplicitVRLittleEndian

    from targets.kinds.dicomweb.index import fast_header, pydicom_header

    files = query_studies.files()
    implicit = examples.ct.copy()
    implicit.file_meta = implicit.file_meta.copy()
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(
        tmp_path / "implicit.dcm",
        implicit_vr=True,
        little_endian=True,
        enforce_file_format=True,
    )
    utf8 = examples.ct.copy()
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "MÜLLER^JÖRG"
    utf8.save_as(tmp_path / "utf8.dcm", enforce_file_format=True)
    files += [tmp_path / "implicit.dcm", tmp_path / "utf8.dcm"]
    for path in files:
        fast = fast_header(str(path))
        assert fast is not None, path
        assert fast == pydicom_header(str(path)), path
    assert fast_header(str(tmp_path / "utf8.dcm"))[2] == "MÜLLER^JÖRG"


def test_unusual_headers_fall_back_to_pydicom(tmp_path):
    from pydicom import examples
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from targets.kinds.dicomweb.index import fast_header, read_header

    ds = examples.ct.copy()
    ds.SpecificCharacterSet = "ISO_IR 144"  # Cyrillic: pydicom decodes it
    ds.PatientName = "Иванов^Иван"
    ds.ReferencedStudySequence = Sequence([Dataset()])
    ds.save_as(tmp_path / "cyrillic.dcm", enforce_file_format=True)
    assert fast_header(str(tmp_path / "cyrillic.dcm")) is None
    _, row = read_header(str(tmp_path / "cyrillic.dcm"))
    assert row[2] == "Иванов^Иван"


def test_the_index_reads_pydicoms_own_files_as_pydicom_does_and_names_broken_ones(
    tmp_path, data_dir
):
    """Every Part 10 file bundled with pydicom (found on disk, not downloaded; 11
    transfer syntaxes: big endian, deflated, implicit VR, JPEG..., a UN sequence of
    undefined length, character sets), indexed through the element walker and
    compared with pydicom's own reading of the indexed tags. The broken ones are
    named with the walk's reason, as the send path refuses them."""
    import shutil
    import warnings

    from targets.kinds.dicomweb.index import _INT_COLUMNS, COLUMNS
    from tests.interop import corpus

    archive = tmp_path / "pydicom"
    bundled = dict(corpus.bundled_files())
    for name, path in bundled.items():
        (archive / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, archive / name)
    # What no bundled file holds: a private sequence relayed as UN of undefined
    # length (PS3.5 6.2.2), an odd-length value, elements out of order.
    (archive / "extra").mkdir()
    raw = (corpus.PYDICOM_DATA / "test_files" / "CT_small.dcm").read_bytes()
    relayed = corpus.insert_elements(raw, 0x00090012, corpus.UN_CREATOR)
    relayed = corpus.insert_elements(relayed, 0x00091201, corpus.un_private_sequence())
    odd = corpus._explicit_le(0x00104000, b"LT", b"odd")
    for name, data in (
        ("un_sequence.dcm", relayed),
        ("odd_length.dcm", corpus.insert_elements(raw, 0x00104000, odd)),
        ("out_of_order.dcm", corpus.swap_first_two(raw, 0x00080020)),
    ):
        (archive / "extra" / name).write_bytes(data)
        bundled[f"extra/{name}"] = archive / "extra" / name
    index = FolderIndex(archive, tmp_path / "index.sqlite3")
    report = index.scan(workers=1)

    problems = dict(report.problems)
    assert problems == {
        "test_files/MR_truncated.dcm": "corrupt DICOM: element (7FE0,0010) runs "
        "past the end of the file (8192 bytes at byte 1500 of 9630)",
        "test_files/rtplan_truncated.dcm": "corrupt DICOM: element (300A,00B0) runs "
        "past the end of the file (976 bytes at byte 1418 of 2129)",
        # An Implicit VR dataset under a file meta that says JPEG Baseline (explicit
        # VR): pydicom guesses, Courier refuses to send it.
        "test_files/SC_rgb_jpeg.dcm": "corrupt DICOM: unknown VR b'\\x18\\x00' at "
        "byte 360",
    }
    with index.connect() as db:
        rows = {r["path"]: r for r in db.execute("SELECT * FROM files")}
    assert report.added == len(rows) == len(bundled) - 3
    syntaxes = {r["transfer_syntax"] for r in rows.values()}
    assert len(syntaxes) >= 11
    for name in (
        "test_files/MR_small_bigendian.dcm",
        "test_files/image_dfl.dcm",
        "test_files/MR_small_implicit.dcm",
        "extra/un_sequence.dcm",
        "extra/odd_length.dcm",
        "extra/out_of_order.dcm",
    ):
        assert name in rows
    keywords = [keyword for _, keyword in COLUMNS]
    for name, row in rows.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(
                bundled[name], stop_before_pixels=True, specific_tags=keywords
            )
        assert row["transfer_syntax"] == ds.file_meta.TransferSyntaxUID, name
        for column, keyword in COLUMNS:
            value = ds.get(keyword)
            if column in _INT_COLUMNS:
                expected = None if value in (None, "") else int(value)
            elif value is None:
                expected = ""
            elif isinstance(value, pydicom.multival.MultiValue):
                expected = "\\".join(str(v) for v in value)
            else:
                expected = str(value).strip()
            found = row[column]
            if keyword == "PatientName":
                # PS3.5 6.2: trailing empty component groups ("=") may be left
                # out; pydicom leaves them out, the index keeps the value as is.
                found, expected = found.rstrip("="), expected.rstrip("=")
            assert found == expected, (name, keyword)
