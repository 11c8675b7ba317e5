"""Storage Commitment results, as peers report them (the hook the receiver calls).

Courier asks a target to commit what it sent (N-ACTION, the sending side) and the
target answers with an N-EVENT-REPORT, on the same association or on a new one to
Courier's receiver (Orthanc always opens a new one). The receiver hands every report
it takes to `record_report`; the sending side reads the `StorageCommitment` row by
the transaction UID it chose.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from config.safetext import db_text, log_fields

from .models import StorageCommitment

log = logging.getLogger("courier.dispatch")


def record_report(
    transaction_uid: str,
    committed: Iterable[tuple[str, str]],
    failed: Iterable[tuple[str, str, int]],
    *,
    reported_by: str = "",
    reported_from: str = "",
) -> StorageCommitment | None:
    """Keep a peer's report of a commitment transaction; return its row.

    `committed`: (SOP Class UID, SOP Instance UID) of each instance the peer
    committed; `failed`: (SOP Class UID, SOP Instance UID, failure reason) of each
    it did not. A transaction reported again keeps the latest report (a report may
    come twice: once on the association it was asked on, once on a new one).
    Only transactions Courier asked for have a row (made before the N-ACTION); a
    report on any other UID is logged and dropped (None), so that whoever may
    associate with the receiver cannot grow the table without limit. A row made
    with the AE title its report must come from (`reported_by`: the target's) takes
    reports from that AE title only; one from any other is logged and dropped
    (None): whoever saw a Transaction UID cannot mark a waiting job committed.
    """
    committed_rows = [[db_text(c, 64), db_text(i, 64)] for c, i in committed]
    failed_rows = [[db_text(c, 64), db_text(i, 64), int(r)] for c, i, r in failed]
    outcome = (
        StorageCommitment.Outcome.FAILED
        if failed_rows
        else StorageCommitment.Outcome.COMMITTED
    )
    # As stored and as logged: a UID is at most 64 characters (PS3.5 9.1); a
    # longer one from a peer would make a line as long as it.
    uid = db_text(transaction_uid, 64)
    with transaction.atomic():
        row = (
            StorageCommitment.objects.select_for_update()
            .filter(transaction_uid=uid)
            .first()
        )
        if row is None:
            log.warning(
                "event=commitment_report_unsolicited %s",
                log_fields(
                    transaction=uid,
                    calling_aet=reported_by,
                    peer=reported_from,
                    committed=len(committed_rows),
                    failed=len(failed_rows),
                ),
            )
            return None
        expected = row.reported_by.strip()
        if expected and reported_by.strip() != expected:
            log.warning(
                "event=commitment_report_wrong_peer %s",
                log_fields(
                    transaction=uid,
                    calling_aet=reported_by,
                    expected_aet=expected,
                    peer=reported_from,
                    committed=len(committed_rows),
                    failed=len(failed_rows),
                ),
            )
            return None
        row.outcome = outcome
        row.committed = committed_rows
        row.failed = failed_rows
        row.reported_at = timezone.now()
        row.reported_by = db_text(reported_by, 16)
        row.reported_from = db_text(reported_from, 100)
        row.save()
    return row


def purge_commitments(now=None) -> int:
    """Delete transactions older than `COURIER_COMMITMENT_RETENTION_DAYS`; return
    how many. A worker waits for a report minutes at most
    (`COURIER_COMMITMENT_WAIT`), so an older row, answered or not, is history."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=float(settings.COURIER_COMMITMENT_RETENTION_DAYS))
    deleted, _ = StorageCommitment.objects.filter(created_at__lt=cutoff).delete()
    return deleted
