"""The DICOMweb source against Orthanc's DICOMweb plugin (basic auth on)."""

from __future__ import annotations

from datetime import date

import pytest

from targets.kinds.dicomweb.query import write_parts
from targets.models import DicomWebTarget
from targets.query import Criteria, RetrieveRequest, SourceError
from tests.fixtures.query_peers import QR_PASSWORD, QR_USER
from tests.peers import free_port


def web_target(orthanc, **kw) -> DicomWebTarget:
    fields = dict(
        name="web",
        url=orthanc.dicomweb_url,
        auth="basic",
        username=QR_USER,
        password=QR_PASSWORD,
        direction="query",
        request_timeout=60,
    )
    fields.update(kw)
    return DicomWebTarget(**fields)


@pytest.fixture
def source(query_orthanc):
    return web_target(query_orthanc).query_source()


def accessions(search) -> set[str]:
    return {s.accession for s in search.studies}


def test_qido_by_patient_id_and_study_columns(source, query_studies):
    found = source.find_studies(Criteria(patient_id="P001"), 50)
    assert accessions(found) == {"ACC001", "ACC002"}
    study = next(s for s in found.studies if s.accession == "ACC001")
    assert study.study_uid == query_studies.by_accession("ACC001").study_uid
    assert study.patient_name == "DOE^JOHN"
    assert study.birth_date == "19700101"
    assert study.description == "CT CHEST"
    assert study.modalities == ["CT"]
    assert (study.series_count, study.instance_count) == (2, 5)


def test_qido_patient_name_wildcards(source):
    assert accessions(source.find_studies(Criteria(patient_name="DOE^*"), 50)) == {
        "ACC001",
        "ACC002",
        "ACC003",
    }
    assert accessions(source.find_studies(Criteria(patient_name="DOE^JA?E"), 50)) == {
        "ACC003"
    }


def test_qido_date_range_modality_description_uid(source, query_studies):
    found = source.find_studies(
        Criteria(date_from=date(2024, 1, 1), date_to=date(2024, 1, 31)), 50
    )
    assert accessions(found) == {"ACC001", "ACC_5%"}
    assert accessions(source.find_studies(Criteria(modality="MR"), 50)) == {
        "ACC002",
        "ACC004",
    }
    assert accessions(source.find_studies(Criteria(study_description="MR*"), 50)) == {
        "ACC002",
        "ACC004",
    }
    uid = query_studies.by_accession("ACC004").study_uid
    assert accessions(source.find_studies(Criteria(study_uid=uid), 50)) == {"ACC004"}


def test_qido_accession_list_with_missing_ones(source):
    found = source.find_studies(Criteria(accessions=["ACC003", "MISSING"]), 50)
    assert accessions(found) == {"ACC003"}
    assert found.missing_accessions == ["MISSING"]


def test_qido_limit_marks_truncation(source):
    found = source.find_studies(Criteria(), 3)
    assert len(found.studies) == 3 and found.truncated
    assert not source.find_studies(Criteria(), 50).truncated


def test_qido_series_drill_down(source, query_studies):
    facts = query_studies.by_accession("ACC001")
    series = source.find_series(facts.study_uid)
    assert [s.series_uid for s in series] == facts.series_uids
    assert [s.instance_count for s in series] == [3, 2]
    assert series[1].description == "CT CHEST series 2"


def test_wado_retrieves_a_study_instance_by_instance(source, query_studies, tmp_path):
    facts = query_studies.by_accession("ACC001")
    seen = []
    result = source.retrieve(
        RetrieveRequest(facts.study_uid), tmp_path, lambda d, t, f: seen.append((d, t))
    )
    assert (result.completed, result.failed) == (5, 0)
    written = sorted(p.name for p in tmp_path.rglob("*.dcm"))
    assert len(written) == 5
    assert sorted(p.name for p in result.series_folders) == sorted(facts.series_uids)
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)
    assert not list(tmp_path.glob(".part-*"))


def test_wado_of_one_series(source, query_studies, tmp_path):
    facts = query_studies.by_accession("ACC001")
    request = RetrieveRequest(facts.study_uid, series_uids=[facts.series_uids[0]])
    assert source.retrieve(request, tmp_path, lambda *a: None).completed == 3


def test_wrong_password_is_reported_as_401(query_orthanc):
    source = web_target(query_orthanc, password="wrong").query_source()
    with pytest.raises(SourceError, match="401: authentication failed") as err:
        source.find_studies(Criteria(), 10)
    assert "wrong" not in str(err.value)


def test_closed_port_is_reported_as_unreachable():
    source = DicomWebTarget(
        name="x", url=f"http://127.0.0.1:{free_port()}/dw"
    ).query_source()
    with pytest.raises(SourceError, match="Source unreachable"):
        source.find_studies(Criteria(), 10)


def test_multipart_parser_splits_parts_across_chunk_boundaries(tmp_path):
    parts = [b"A" * 1000, b"\r\n--not-the-boundary\r\n" * 3, b"", b"Z" * 5000]
    body = (
        b"preamble\r\n"
        + b"".join(
            b"--BND\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
            for p in parts
        )
        + b"--BND--\r\n"
    )
    written = []

    def stored(path):
        written.append(path.read_bytes())
        path.unlink()

    for size in (1, 7, 64, 100000):
        written.clear()
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert write_parts(chunks, b"BND", tmp_path, stored) == 4
        assert written == parts


def test_multipart_stream_cut_short_is_an_error(tmp_path):
    body = b"--BND\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 100
    with pytest.raises(SourceError, match="ended in the middle"):
        write_parts([body], b"BND", tmp_path, lambda p: None)
    assert not list(tmp_path.iterdir())


def test_qido_values_needing_encoding_still_match_exactly(source):
    # A space and `%`/`_` cannot reach Orthanc's plugin encoded: sent as `?`, then
    # checked exactly on the answers.
    assert accessions(
        source.find_studies(Criteria(study_description="CT CHEST"), 50)
    ) == {"ACC001"}
    assert accessions(source.find_studies(Criteria(accessions=["ACC_5%"]), 50)) == {
        "ACC_5%"
    }
    assert accessions(
        source.find_studies(Criteria(study_description="mr knee*"), 50)
    ) == {"ACC004"}
