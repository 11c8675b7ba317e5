"""The receiver's bookkeeping in the database: rows of the series it receives, its
status for the admin, folders adopted after a crash, complete series handed to
routing (in process: the receiver with the database bookkeeper, huey immediate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.utils import timezone

from dispatch.jobs.models import Job, State
from dispatch.receiving import bookkeeping
from dispatch.receiving.bookkeeping import DatabaseBookkeeper
from dispatch.receiving.models import ReceiverStatus
from dispatch.routing import services as routing
from dispatch.routing.models import ReceivedSeries
from tests.dicomgen import make_series
from tests.dispatch.helpers import folder_target, modality_is, rule
from tests.fixtures.receive_peers import storescu

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_folder_whose_row_was_never_written_is_adopted(spool):
    incoming = spool / "incoming"
    series = make_series(incoming / "orphan", 2)
    (incoming / "orphan.series.json").write_text(json.dumps({
        "series_uid": series.series_uid, "calling_aet": "US_1", "called_aet": "X",
        "peer_address": "10.0.0.9:4000",
        "first_received": timezone.now().isoformat(),
    }))  # fmt: skip

    restored = bookkeeping.restore_open_series(incoming)

    (row,) = ReceivedSeries.objects.all()
    assert (row.calling_aet, row.called_aet, row.instance_count) == ("US_1", "X", 2)
    assert row.state == ReceivedSeries.State.RECEIVING
    assert [s.pk for s in restored] == [row.pk]
    assert restored[0].instance_count == 2


def test_received_in_process_routed_and_delivered_then_the_spool_is_removed(
    receiver, tmp_path, spool, immediate_huey
):
    """Receiver with the database bookkeeper → quiet period → route → Folder target."""
    out = tmp_path / "out"
    rule("ct", [folder_target(out)], modality_is("CT"))
    series = make_series(tmp_path / "ct", 5)
    rx = receiver(spool_dir=spool, quiet_seconds=0.5,
                  bookkeeper=DatabaseBookkeeper("test"))  # fmt: skip

    assert storescu(rx.port, [series.folder], extra=["+sd"]).returncode == 0

    row = _wait(lambda: ReceivedSeries.objects.filter(state="routed").first())
    (job,) = row.jobs.all()
    _wait(lambda: Job.objects.get(pk=job.pk).state == State.DONE)
    assert len([p for p in out.rglob("*.dcm")]) == 5
    assert row.instance_count == 5 and row.calling_aet == "MODALITY"
    assert row.peer_address.startswith("127.0.0.1:")
    _wait(lambda: not Path(row.folder).exists())
    routing.purge_expired()
    row.refresh_from_db()
    assert row.folder_removed_at is not None
    assert not Path(f"{row.folder}.series.json").exists()


def _wait(condition, timeout: float = 60):
    import time

    from django.db import OperationalError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except OperationalError as exc:
            # The test database is SQLite in memory with a shared cache: a read
            # while the receiver's thread writes fails at once instead of waiting.
            if "locked" not in str(exc):
                raise
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {condition}")


def test_the_receiver_reports_refusals_and_heartbeats_for_the_admin(spool):
    bookkeeper = DatabaseBookkeeper("COURIER@11112")
    bookkeeper.restore(spool / "incoming")
    bookkeeper.refused("spool disk nearly full (5 bytes free)", 2)
    bookkeeper.refused("spool disk nearly full (3 bytes free)", 1)
    bookkeeper.heartbeat({"stored": 7})

    status = ReceiverStatus.objects.get(name="COURIER@11112")
    assert status.refused_count == 3
    assert status.last_refusal.endswith("(3 bytes free)") and status.last_refusal_at
    assert status.info == {"stored": 7}


def test_a_description_file_with_control_characters_is_adopted_clean(spool):
    incoming = spool / "incoming"
    series = make_series(incoming / "odd", 2)
    (incoming / "odd.series.json").write_text(json.dumps({
        "series_uid": series.series_uid + "\x00", "calling_aet": "US\x001",
        "called_aet": "X\n", "peer_address": "10.0.0.9:4000",
    }))  # fmt: skip
    (incoming / "broken.series.json").write_text("{not json")
    (incoming / "broken").mkdir()

    restored = bookkeeping.restore_open_series(incoming)

    (row,) = ReceivedSeries.objects.all()
    assert row.series_uid == series.series_uid
    assert (row.calling_aet, row.called_aet) == ("US1", "X\n")
    assert [s.pk for s in restored] == [row.pk]
