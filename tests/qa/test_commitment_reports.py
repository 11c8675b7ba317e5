"""Storage Commitment reports arriving at the receiver, tried as an outsider would.

An N-EVENT-REPORT names a transaction by UID. Courier keeps a row for each transaction
it asked for (dispatch/jobs/committing.py creates it before the N-ACTION); a report on
any other UID is nobody's answer. Any host that may associate with the receiver can
send such reports, as many as it likes, each with thousands of references.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role
from pynetdicom.sop_class import StorageCommitmentPushModel

from dispatch.jobs.commitment import record_report
from dispatch.jobs.models import StorageCommitment
from dispatch.receiving.bookkeeping import DatabaseBookkeeper
from targets.dicomnet.commitment import STORAGE_COMMITMENT_INSTANCE

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _report(transaction_uid: str, instances: list[str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for uid in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = DicomSequence(items)
    return ds


@pytest.mark.django_db(transaction=True)
def test_reports_on_transactions_courier_never_asked_for_are_not_kept(receiver):
    """A stranger's N-EVENT-REPORTs with made-up transaction UIDs add no rows (on
    main every one became a StorageCommitment row: 200 reports of 50 references
    grew the database by about 1 MB, without limit), while a report on a
    transaction Courier asked for is still recorded."""
    rx = receiver(bookkeeper=DatabaseBookkeeper("qa"))
    asked = generate_uid()
    StorageCommitment.objects.create(transaction_uid=asked)

    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    assoc = stranger.associate("127.0.0.1", rx.port, ae_title="COURIER",
                               ext_neg=[role])  # fmt: skip
    assert assoc.is_established
    made_up = [generate_uid() for _ in range(5)]
    for uid in made_up:
        assoc.send_n_event_report(
            _report(uid, [generate_uid() for _ in range(20)]),
            1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE,
        )  # fmt: skip
    committed = generate_uid()
    status, _ = assoc.send_n_event_report(
        _report(asked, [committed]),
        1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE,
    )  # fmt: skip
    assoc.release()

    assert status.Status == 0x0000
    assert not StorageCommitment.objects.filter(transaction_uid__in=made_up).exists()
    row = StorageCommitment.objects.get(transaction_uid=asked)
    assert row.outcome == StorageCommitment.Outcome.COMMITTED
    assert row.committed == [[CT_IMAGE, committed]]
    assert StorageCommitment.objects.count() == 1


@pytest.mark.django_db
def test_record_report_keeps_nothing_for_an_unknown_transaction():
    assert record_report(generate_uid(), [(CT_IMAGE, "1.2.3")], []) is None
    assert not StorageCommitment.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_report_is_taken_from_the_targets_ae_title_only(receiver, caplog):
    """Whoever saw a Transaction UID could mark a waiting job committed (any AE
    title, any host; the latest report won). The row names the AE title its report
    must come from (the target's); a report from another is logged and dropped."""
    rx = receiver(bookkeeper=DatabaseBookkeeper("qa"))
    asked = generate_uid()
    # As dispatch/jobs/committing.py makes it for a target whose AE title is PACS.
    StorageCommitment.objects.create(transaction_uid=asked, reported_by="PACS")

    def report_as(aet: str, instance: str) -> None:
        peer = AE(ae_title=aet)
        peer.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        assoc = peer.associate("127.0.0.1", rx.port, ae_title="COURIER",
                               ext_neg=[role])  # fmt: skip
        assert assoc.is_established
        assoc.send_n_event_report(
            _report(asked, [instance]),
            1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE,
        )  # fmt: skip
        assoc.release()

    report_as("INTRUDER", generate_uid())

    row = StorageCommitment.objects.get(transaction_uid=asked)
    assert row.outcome == StorageCommitment.Outcome.WAITING
    assert (row.committed, row.reported_by) == ([], "PACS")
    (line,) = [r.getMessage() for r in caplog.records if "wrong_peer" in r.getMessage()]
    assert "calling_aet=INTRUDER" in line and "expected_aet=PACS" in line

    committed = generate_uid()
    report_as("PACS", committed)

    row.refresh_from_db()
    assert row.outcome == StorageCommitment.Outcome.COMMITTED
    assert row.committed == [[CT_IMAGE, committed]]
    # Reported again by someone else: the target's report stands.
    report_as("INTRUDER", generate_uid())
    row.refresh_from_db()
    assert row.committed == [[CT_IMAGE, committed]]


@pytest.mark.django_db
def test_the_sweep_purges_transactions_past_their_retention(settings):
    """StorageCommitment rows were never deleted: one per commitment request, for
    ever. The workers' sweep deletes those older than the retention."""
    from datetime import timedelta

    from django.utils import timezone

    from dispatch.jobs.tasks import sweep

    settings.COURIER_COMMITMENT_RETENTION_DAYS = 30
    now = timezone.now()
    old, recent = generate_uid(), generate_uid()
    StorageCommitment.objects.create(
        transaction_uid=old, created_at=now - timedelta(days=31),
        outcome=StorageCommitment.Outcome.COMMITTED,
    )  # fmt: skip
    StorageCommitment.objects.create(
        transaction_uid=recent, created_at=now - timedelta(days=29)
    )

    sweep(now)

    assert list(
        StorageCommitment.objects.values_list("transaction_uid", flat=True)
    ) == [recent]
