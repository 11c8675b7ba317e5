"""Retrievals on the dispatch engine's claim and lease: one worker runs a retrieval,
and one whose worker died is taken over when its lease runs out.

Source: a local folder (a `file://` DICOMweb target); destination: the download
folder. The dead worker is played by the row it leaves behind: running, leased to
a worker that no longer renews.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from querytool import services, tasks
from querytool.models import RetrievalJob, RetrievalState
from targets.models import DicomWebTarget

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_retrieval_whose_worker_died_is_taken_over_when_its_lease_runs_out(
    tmp_path, settings, django_user_model, query_studies
):
    settings.COURIER_DOWNLOAD_DIR = tmp_path / "downloads"
    settings.COURIER_SPOOL_DIR = tmp_path / "spool"
    boss = django_user_model.objects.create_superuser("boss", "b@example.org", "x")
    source = DicomWebTarget.objects.create(
        name="Archive",
        url=query_studies.copy_to(tmp_path / "archive").as_uri(),
        direction="query",
    )
    facts = query_studies.by_accession("ACC001")
    (job,) = services.start_retrieval(
        source, [services.RetrieveItem(facts.study_uid, [], "DOE")], boss, download=True
    )
    # Its worker claimed it, fetched one instance, and was killed.
    now = timezone.now()
    dead = "dead-host:4242:worker-1"
    RetrievalJob.objects.filter(pk=job.pk).update(
        state=RetrievalState.RUNNING,
        lease_owner=dead,
        lease_expires_at=now + timedelta(seconds=30),
        attempts=1,
        done=1,
    )

    # While its lease holds, no other worker takes it, and its watch looks later.
    assert tasks.run_retrieval(job.pk).lease_owner == dead
    tasks.watch_retrieval(job.pk)
    job.refresh_from_db()
    assert (job.state, job.lease_owner, job.attempts) == ("running", dead, 1)

    # The lease ran out: the watch takes the retrieval over and finishes it.
    RetrievalJob.objects.filter(pk=job.pk).update(
        lease_expires_at=now - timedelta(seconds=1)
    )
    tasks.watch_retrieval(job.pk)

    job.refresh_from_db()
    assert job.state == RetrievalState.DONE, job.message
    assert job.attempts == 2 and job.done == facts.instances
    assert (job.lease_owner, job.lease_expires_at) == ("", None)
    saved = sorted(p for p in (tmp_path / "downloads").rglob("*") if p.is_file())
    assert len(saved) == facts.instances
    # A finished retrieval is left alone by a watch that comes late.
    tasks.watch_retrieval(job.pk)
    job.refresh_from_db()
    assert job.state == RetrievalState.DONE and job.attempts == 2
