"""Storage Commitment against a real Storage Commitment SCP: Orthanc 1.10.

Orthanc answers the N-ACTION at once and sends its report later on a new association
that it opens to the requester, looked up by calling AE title in its DicomModalities
(PEERS.md, section 10). So Courier's Source AET is registered there with the address
of Courier's receiver, which takes the report and records it for the waiting job,
as an admin sets it up on a PACS (README, "Storage Commitment").
"""

from __future__ import annotations

import pytest

from dispatch.jobs import services
from dispatch.jobs.models import Commitment, State, StorageCommitment
from dispatch.receiving.bookkeeping import DatabaseBookkeeper
from targets.models import DicomTarget
from tests.dicomgen import make_series
from tests.peers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

COURIER_AET = "COURIER_SC"


@pytest.fixture
def orthanc_knows_courier(orthanc, receiver):
    """Courier's receiver, registered in the session Orthanc as modality COURIER_SC."""
    port = free_port()
    receiver(ae_title="COURIER", port=port, bookkeeper=DatabaseBookkeeper("commit"))
    orthanc.rest(
        "/modalities/courier-commit",
        "PUT",
        {"AET": COURIER_AET, "Host": "127.0.0.1", "Port": port},
    )
    yield orthanc
    orthanc.rest("/modalities/courier-commit", "DELETE")


def test_orthanc_commits_a_series_with_its_report_sent_to_the_receiver(
    orthanc_knows_courier, tmp_path, immediate_huey
):
    orthanc = orthanc_knows_courier
    series = make_series(tmp_path / "in", 3)
    target = DicomTarget.objects.create(
        name="orthanc-commit",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
        calling_aet=COURIER_AET,
        request_commitment=True,
        retry_base_delay=3600,
    )
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    assert job.committed_label == "3 of 3 committed"
    assert set(job.instances.values_list("commitment", flat=True)) == {
        Commitment.COMMITTED
    }
    # The report came on Orthanc's own association, to the receiver.
    (row,) = StorageCommitment.objects.all()
    assert row.outcome == StorageCommitment.Outcome.COMMITTED
    assert row.reported_by == orthanc.aet
    assert sorted(i for _, i in row.committed) == sorted(series.sop_uids)
    for uid in series.sop_uids:
        assert orthanc.find_instance(uid)


def test_orthanc_reports_what_it_does_not_hold_and_courier_sends_it_again(
    orthanc_knows_courier, tmp_path, immediate_huey, monkeypatch
):
    """Orthanc loses an instance between storing and committing (deleted through
    its REST API, as a PACS might drop one): it reports it failed, Courier names
    it, sends it again and Orthanc commits it on the next attempt."""
    orthanc = orthanc_knows_courier
    series = make_series(tmp_path / "in", 3)
    lost = series.sop_uids[1]
    target = DicomTarget.objects.create(
        name="orthanc-commit",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
        calling_aet=COURIER_AET,
        request_commitment=True,
        retry_base_delay=3600,
    )
    from targets.kinds.dicom.handler import DicomHandler

    original = DicomHandler.request_commitment
    calls = []

    def delete_then_ask(self, *args, **kwargs):
        if not calls:
            orthanc.rest(f"/instances/{orthanc.find_instance(lost)}", "DELETE")
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DicomHandler, "request_commitment", delete_then_ask)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.RETRY_WAIT
    assert job.committed_label == "2 of 3 committed"
    assert job.last_error.startswith(
        f"1 of 3 instances not committed by {orthanc.aet} ("
    )
    assert "no such object instance (0x0112)" in job.last_error
    assert orthanc.find_instance(lost) is None

    assert services.retry_now([job]) == 1
    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    assert job.committed_label == "3 of 3 committed"
    assert orthanc.find_instance(lost)
    assert len(calls) == 2
