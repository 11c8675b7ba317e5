"""The DICOM source against a real Orthanc: C-FIND by each field, C-GET and C-MOVE."""

from __future__ import annotations

from datetime import date

import pydicom
import pytest

from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.models import DicomTarget
from targets.query import (
    Cancelled,
    Criteria,
    RetrieveRequest,
    SourceError,
)
from tests.peers import free_port


def dicom_target(orthanc, **kw) -> DicomTarget:
    fields = dict(
        name="pacs",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
        calling_aet="COURIER",
        direction="query",
        # generous: a loaded 2-core CI machine must not turn a slow answer into a
        # failure (tests of timeouts set their own)
        connect_timeout=10,
        acse_timeout=30,
        dimse_timeout=60,
    )
    fields.update(kw)
    return DicomTarget(**fields)


@pytest.fixture
def source(query_orthanc):
    return dicom_target(query_orthanc).query_source()


def accessions(search) -> set[str]:
    return {s.accession for s in search.studies}


def test_c_find_by_patient_id_returns_that_patients_studies(source):
    found = source.find_studies(Criteria(patient_id="P001"), 50)
    assert accessions(found) == {"ACC001", "ACC002"}
    assert not found.truncated


def test_c_find_fills_the_study_columns(source, query_studies):
    facts = query_studies.by_accession("ACC001")
    (study,) = source.find_studies(Criteria(accessions=["ACC001"]), 50).studies
    assert study.study_uid == facts.study_uid
    assert study.patient_name == "DOE^JOHN"
    assert study.birth_date == "19700101"
    assert study.study_date == "20240115"
    assert study.description == "CT CHEST"
    assert study.modalities == ["CT"]
    assert study.series_count == 2
    assert study.instance_count == 5


def test_c_find_matches_patient_name_wildcards(source):
    assert accessions(source.find_studies(Criteria(patient_name="DOE^*"), 50)) == {
        "ACC001",
        "ACC002",
        "ACC003",
    }
    assert accessions(source.find_studies(Criteria(patient_name="DOE^JA?E"), 50)) == {
        "ACC003"
    }


def test_c_find_by_date_range(source):
    found = source.find_studies(
        Criteria(date_from=date(2024, 1, 1), date_to=date(2024, 1, 31)), 50
    )
    assert accessions(found) == {"ACC001", "ACC_5%"}
    assert accessions(
        source.find_studies(Criteria(date_to=date(2022, 12, 31)), 50)
    ) == {"ACC004"}
    assert accessions(
        source.find_studies(Criteria(date_from=date(2024, 2, 1)), 50)
    ) == {"ACC002"}


def test_c_find_by_modality_description_and_uid(source, query_studies):
    assert accessions(source.find_studies(Criteria(modality="mr"), 50)) == {
        "ACC002",
        "ACC004",
    }
    assert accessions(source.find_studies(Criteria(study_description="CT*"), 50)) == {
        "ACC001",
        "ACC003",
        "ACC_5%",
    }
    uid = query_studies.by_accession("ACC003").study_uid
    assert accessions(source.find_studies(Criteria(study_uid=uid), 50)) == {"ACC003"}


def test_accession_list_reports_each_missing_one_and_shows_the_rest(source):
    found = source.find_studies(
        Criteria(accessions=["ACC001", "NOPE1", "ACC004", "NOPE2"]), 50
    )
    assert accessions(found) == {"ACC001", "ACC004"}
    assert found.missing_accessions == ["NOPE1", "NOPE2"]


def test_result_limit_marks_the_search_truncated(source):
    found = source.find_studies(Criteria(), 2)
    assert len(found.studies) == 2
    assert found.truncated


def test_series_drill_down(source, query_studies):
    facts = query_studies.by_accession("ACC001")
    series = source.find_series(facts.study_uid)
    assert [s.series_uid for s in series] == facts.series_uids
    assert [s.instance_count for s in series] == [3, 2]
    assert [s.number for s in series] == [1, 2]
    assert series[0].description == "CT CHEST series 1"


def test_c_get_retrieves_every_instance_of_a_study(source, query_studies, tmp_path):
    facts = query_studies.by_accession("ACC001")
    seen = []
    result = source.retrieve(
        RetrieveRequest(facts.study_uid),
        tmp_path,
        lambda done, total, failed: seen.append((done, total)),
    )
    assert (result.completed, result.failed) == (5, 0)
    assert sorted(p.name for p in result.series_folders) == sorted(facts.series_uids)
    assert len(list(tmp_path.rglob("*.dcm"))) == 5
    assert seen[-1][0] == 5
    assert any(total == 5 for _, total in seen)


def test_c_get_of_chosen_series_only(source, query_studies, tmp_path):
    facts = query_studies.by_accession("ACC001")
    request = RetrieveRequest(facts.study_uid, series_uids=[facts.series_uids[1]])
    result = source.retrieve(request, tmp_path, lambda *a: None)
    assert result.completed == 2
    assert [p.name for p in tmp_path.iterdir()] == [facts.series_uids[1]]


def test_c_get_files_name_courier_as_their_writer_and_keep_their_uids(
    source, query_studies, tmp_path
):
    facts = query_studies.by_accession("ACC001")
    source.retrieve(RetrieveRequest(facts.study_uid), tmp_path, lambda *a: None)

    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 5
    for path in files:
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert path.name == f"{ds.SOPInstanceUID}.dcm"


def test_c_move_sends_the_study_to_the_registered_destination(
    source, query_studies, query_storescp, tmp_path
):
    query_storescp.clear()
    facts = query_studies.by_accession("ACC_5%")
    result = source.retrieve(
        RetrieveRequest(facts.study_uid, move_aet="QRDEST"), tmp_path, lambda *a: None
    )
    assert (result.completed, result.failed) == (4, 0)
    assert len(query_storescp.files()) == 4
    assert not list(tmp_path.iterdir())


def test_c_move_to_an_unknown_destination_is_refused_in_words(source, query_studies):
    facts = query_studies.by_accession("ACC004")
    # Orthanc 1.10 answers 0xC000 rather than 0xA801: the words name the AE title.
    with pytest.raises(SourceError, match="C-MOVE refused.*'NOBODY'"):
        source.retrieve(
            RetrieveRequest(facts.study_uid, move_aet="NOBODY"), None, lambda *a: None
        )


def test_cancel_during_c_get_stops_the_retrieval(source, query_studies, tmp_path):
    facts = query_studies.by_accession("ACC_5%")

    def progress(done, total, failed):
        if done >= 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        source.retrieve(RetrieveRequest(facts.study_uid), tmp_path, progress)


def test_closed_port_is_reported_as_unreachable(query_orthanc):
    source = dicom_target(query_orthanc, port=free_port()).query_source()
    with pytest.raises(SourceError, match="Source unreachable"):
        source.find_studies(Criteria(patient_id="P001"), 10)


def test_wrong_called_aet_is_reported_as_rejected(tmp_path_factory):
    from tests.peers import Orthanc

    with Orthanc(
        tmp_path_factory.mktemp("qr-strict"), aet="STRICT", check_called_aet=True
    ) as strict:
        source = dicom_target(strict, called_aet="WRONG").query_source()
        with pytest.raises(
            SourceError, match="Association rejected.*check the target AET"
        ):
            source.find_studies(Criteria(), 10)


def test_c_find_refused_by_the_source_is_reported_in_words(tmp_path_factory):
    from tests.peers import Orthanc

    # Orthanc refuses C-FIND from an AET it does not know when not always allowed.
    with Orthanc(
        tmp_path_factory.mktemp("qr-nofind"),
        aet="NOFIND",
        extra={"DicomAlwaysAllowFind": False},
    ) as strict:
        source = dicom_target(strict).query_source()
        with pytest.raises(SourceError) as err:
            source.find_studies(Criteria(patient_id="P001"), 10)
    assert "C-FIND refused" in err.value.message
    assert "'COURIER'" in err.value.message


def test_c_get_with_some_instances_refused_is_reported_as_partial(
    source, query_studies, tmp_path
):
    facts = query_studies.by_accession("ACC001")
    # A file where the second series' folder should go: its instances cannot be
    # written, Courier answers "out of resources", Orthanc ends that series' C-GET
    # with a failure and its counts; the first series still arrives.
    (tmp_path / facts.series_uids[1]).write_text("in the way")
    result = source.retrieve(
        RetrieveRequest(facts.study_uid), tmp_path, lambda *a: None
    )
    assert (result.completed, result.failed) == (3, 2)
    assert result.partial
    assert "partly failed" in result.message
