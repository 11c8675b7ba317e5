"""Dispatch services in process, with Folder targets (real files, no peer needed)."""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import OperationalError
from django.utils import timezone

from dispatch.jobs import direct, engine, files, outcomes, services, status, tasks
from dispatch.jobs.models import (
    Attempt,
    DispatchError,
    InstanceState,
    Job,
    JobInstance,
    State,
)
from dispatch.jobs.spool import expire_spool
from targets.kinds.base import SendContext
from targets.models import Direction, FolderTarget, Target
from targets.series import scan_folder
from tests.dicomgen import make_series

pytestmark = pytest.mark.django_db(transaction=True)


def folder_target(path: Path, **kw) -> Target:
    path.mkdir(parents=True, exist_ok=True)
    return FolderTarget.objects.create(
        name=kw.pop("name", f"folder-{path.name}"), path=str(path), **kw
    )


def delivered(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and ".courier" not in str(p)
    )


def test_a_queued_series_is_sent_and_recorded(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 5)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.DONE
    assert (job.total, job.sent, job.failed) == (5, 5, 0)
    assert job.bytes_sent == series.total_bytes
    assert len(delivered(tmp_path / "out")) == 5
    attempt = job.attempts.get()
    assert attempt.outcome == State.DONE and attempt.sent == 5 and attempt.ended_at
    assert not job.lease_owner


def test_a_jobs_rows_written_at_once_hold_what_the_orm_would_write(tmp_path):
    # files.insert_rows (one executemany) against the model instances of rows_for
    # saved by the ORM: every column alike, for instances, other files and a
    # corrupt file, header tags with a NUL included.
    series = make_series(tmp_path / "in", 3, tags={"SeriesDescription": "Lung\x00 B"})
    (tmp_path / "in" / "report.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "in" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 9)
    target = folder_target(tmp_path / "out")
    scanned = scan_folder(series.folder)
    assert len(scanned.instances) == 3 and scanned.others and scanned.corrupt
    others, _ = services.other_files_for(target, scanned)
    jobs = [Job.objects.create(target=target, folder=str(series.folder)) for _ in "ab"]
    files.insert_rows(jobs[0], scanned.instances, others, scanned.corrupt)
    JobInstance.objects.bulk_create(
        files.rows_for(jobs[1], scanned.instances, others, scanned.corrupt)
    )

    def rows(job):
        return [
            {k: v for k, v in row.items() if k not in ("id", "job_id", "updated_at")}
            for row in JobInstance.objects.filter(job=job).order_by("path").values()
        ]

    written, saved = rows(jobs[0]), rows(jobs[1])
    assert len(written) == 5 and written == saved
    assert {r["state"] for r in written} == {"pending", "failed"}
    assert [r["dicom"] for r in written].count(False) == 1
    assert written[0]["tags"]["SeriesDescription"] == "Lung B"
    stamps = JobInstance.objects.filter(job=jobs[0]).values_list(
        "updated_at", flat=True
    )
    assert all(stamps)


def test_a_retry_sends_only_the_instances_not_yet_confirmed(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 6)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, enqueue_now=False
    )
    # Two instances were confirmed by an earlier attempt.
    done = list(job.instances.order_by("path")[:2])
    for inst in done:
        inst.state = InstanceState.SENT
        inst.save()
    tasks.run_job(job.pk)
    job.refresh_from_db()
    assert job.state == State.DONE
    assert job.attempts.get().sent == 4
    assert len(delivered(tmp_path / "out")) == 4


def test_a_transient_error_waits_and_the_next_attempt_completes(
    tmp_path, immediate_huey
):
    series = make_series(tmp_path / "in", 3)
    out = tmp_path / "out"
    target = folder_target(out, retry_base_delay=1, retry_max_delay=2)
    out.rmdir()  # the mount is missing: a transient error
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.RETRY_WAIT
    assert "does not exist" in job.last_error
    assert job.not_before > timezone.now()
    out.mkdir()
    Job.objects.filter(pk=job.pk).update(not_before=timezone.now())
    tasks.sweep()
    job.refresh_from_db()
    assert job.state == State.DONE and job.attempt_count == 2
    assert [a.outcome for a in job.attempts.all()] == ["error", "done"]


def test_it_gives_up_after_the_targets_max_attempts(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out", retry_max_attempts=2)
    (tmp_path / "out").rmdir()
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    Job.objects.filter(pk=job.pk).update(not_before=timezone.now())
    tasks.run_job(job.pk)
    job.refresh_from_db()
    assert job.state == State.FAILED
    assert job.last_error.startswith("gave up after 2 attempts")


def test_a_permanent_error_fails_at_once_with_the_hint(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out")
    file_instead = tmp_path / "file"
    file_instead.write_text("x")
    Target.objects.filter(pk=target.pk).update(path=str(file_instead))
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.FAILED
    assert "is not a folder" in job.last_error
    assert job.attempt_count == 1


def test_a_paused_target_keeps_its_jobs_waiting_until_resumed(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 2)
    target = folder_target(tmp_path / "out", paused=True)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.PAUSED and "paused" in job.last_error
    assert not job.attempts.exists()
    services.resume_targets([target])
    job.refresh_from_db()
    assert job.state == State.DONE


def test_a_disabled_target_keeps_its_jobs_waiting(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out", enabled=False)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert job.state == State.PAUSED and "disabled" in job.last_error
    Target.objects.filter(pk=target.pk).update(enabled=True)
    tasks.sweep()
    job.refresh_from_db()
    assert job.state == State.DONE


def test_a_query_only_target_is_refused_with_the_reason(tmp_path):
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out")
    Target.objects.filter(pk=target.pk).update(direction=Direction.QUERY)
    target.refresh_from_db()
    with pytest.raises(DispatchError, match="query-only"):
        services.create_jobs(series.folder, [target])


def test_exactly_one_worker_claims_a_job(tmp_path):
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, enqueue_now=False
    )
    first = engine.claim(job.pk, "worker-a", True)
    second = engine.claim(job.pk, "worker-b", True)
    assert first is not None and second is None
    job.refresh_from_db()
    assert job.lease_owner == "worker-a" and job.state == State.SENDING


def test_the_per_target_limit_holds_jobs_back(tmp_path):
    target = folder_target(tmp_path / "out", max_connections=1)
    jobs = [
        services.create_jobs(
            make_series(tmp_path / f"in{i}", 1).folder,
            [target],
            owned_spool=False,
            enqueue_now=False,
        )[0]
        for i in range(2)
    ]
    assert engine.claim(jobs[0].pk, "a", True) is not None
    assert engine.claim(jobs[1].pk, "b", True) is None
    Target.objects.filter(pk=target.pk).update(max_connections=2)
    assert engine.claim(jobs[1].pk, "b", True) is not None


def test_an_expired_lease_is_taken_over_and_the_old_attempt_closed(
    tmp_path, immediate_huey
):
    series = make_series(tmp_path / "in", 3)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, enqueue_now=False
    )
    assert engine.claim(job.pk, "dead-worker", True)
    Attempt.objects.create(job=job, number=1, worker="dead-worker")
    Job.objects.filter(pk=job.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    tasks.sweep()
    job.refresh_from_db()
    assert job.state == State.DONE and job.lease_owner == ""
    first, second = job.attempts.all()
    assert first.outcome == "interrupted" and "dead-worker" in first.error
    assert second.outcome == "done" and second.sent == 3


def test_spool_is_deleted_only_when_every_job_of_the_series_is_done(
    tmp_path, spool, immediate_huey
):
    folder = spool / "series-1"
    make_series(folder, 2)
    good = folder_target(tmp_path / "good")
    bad = folder_target(tmp_path / "bad")
    (tmp_path / "bad").rmdir()
    jobs = services.create_jobs(folder, [good, bad], owned_spool=True)
    states = {j.target_id: Job.objects.get(pk=j.pk).state for j in jobs}
    assert states == {good.pk: State.DONE, bad.pk: State.RETRY_WAIT}
    assert folder.exists()
    (tmp_path / "bad").mkdir()
    Job.objects.filter(pk=jobs[1].pk).update(not_before=timezone.now())
    tasks.sweep()
    assert Job.objects.get(pk=jobs[1].pk).state == State.DONE
    assert not folder.exists()


def test_failed_spool_is_kept_until_the_retention_ends(tmp_path, spool, settings):
    folder = spool / "series-2"
    make_series(folder, 1)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(folder, [target], enqueue_now=False)
    services.cancel([job])
    expire_spool()
    assert folder.exists()
    Job.objects.filter(pk=job.pk).update(
        finished_at=timezone.now() - timedelta(days=15)
    )
    settings.COURIER_FAILED_RETENTION_DAYS = 14
    expire_spool()
    assert not folder.exists()


def test_a_folder_outside_the_spool_is_never_deleted(tmp_path, spool, immediate_huey):
    series = make_series(tmp_path / "mine", 1)
    target = folder_target(tmp_path / "out")
    services.create_jobs(series.folder, [target], owned_spool=True)
    assert series.folder.exists()


def test_the_incoming_aets_are_kept_on_the_job(tmp_path):
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(
        series.folder,
        [target],
        context=SendContext(calling_aet="MODALITY", called_aet="COURIER"),
        enqueue_now=False,
    )
    assert (job.calling_aet, job.called_aet) == ("MODALITY", "COURIER")


def test_backoff_doubles_with_jitter_and_stops_at_the_cap():
    target = Target(retry_base_delay=30, retry_max_delay=3600)
    delays = [outcomes.backoff_delay(target, n) for n in range(1, 10)]
    assert 24 <= delays[0] <= 36
    assert 48 <= delays[1] <= 72
    assert all(d <= 3600 for d in delays)
    assert delays[-1] >= 2880


def test_cancel_stops_a_job_and_retry_now_queues_it_again(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 2)
    target = folder_target(tmp_path / "out", paused=True)
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    assert services.cancel([job]) == 1
    job.refresh_from_db()
    assert job.state == State.CANCELLED
    Target.objects.filter(pk=target.pk).update(paused=False)
    services.retry_now([job])
    job.refresh_from_db()
    assert job.state == State.DONE


def test_the_summary_counts_states_and_failures_of_the_last_day(tmp_path):
    target = folder_target(tmp_path / "out")
    for state in (State.QUEUED, State.QUEUED, State.SENDING, State.FAILED):
        Job.objects.create(
            target=target,
            folder=str(tmp_path),
            source="queue",
            state=state,
            finished_at=timezone.now() if state == State.FAILED else None,
        )
    summary = status.status_summary()
    assert (summary["queued"], summary["sending"], summary["failed_24h"]) == (2, 1, 1)
    assert summary["oldest_queued_age_s"] is not None


def test_other_files_are_counted_to_deliver_or_left_out_in_the_job_name(tmp_path):
    series = make_series(tmp_path / "in", 1)
    (series.folder / "notes.txt").write_text("hello")
    (series.folder / "preview.png").write_bytes(b"\x89PNG\r\n")
    target = folder_target(tmp_path / "out", exclude="*.png")
    (job,) = services.create_jobs(series.folder, [target], enqueue_now=False)
    assert (job.total, job.other_files, job.skipped) == (1, 1, 1)
    assert "(1 instance + 1 other file; 1 file left out) → folder-out" in str(job)
    assert job.instances.filter(dicom=False).get().path.endswith("notes.txt")


def test_it_refuses_a_missing_folder(tmp_path):
    target = folder_target(tmp_path / "out")
    with pytest.raises(DispatchError, match="does not exist"):
        services.create_jobs(tmp_path / "nope", [target])


def test_a_big_job_takes_the_free_connections_and_small_ones_share_them(tmp_path):
    target = folder_target(tmp_path / "out", max_connections=3)

    def job(n: int, name: str) -> Job:
        folder = make_series(tmp_path / name, n).folder
        return services.create_jobs(
            folder, [target], owned_spool=False, enqueue_now=False
        )[0]

    small, big, other = job(1, "small"), job(5, "big"), job(1, "other")
    assert engine.claim(small.pk, "a", True).job.connections == 1
    assert engine.claim(big.pk, "b", True).job.connections == 2
    assert engine.claim(other.pk, "c", True) is None


def test_each_attempt_logs_one_parsable_line_without_secrets(
    tmp_path, caplog, immediate_huey
):
    import shlex

    series = make_series(tmp_path / "in", 2)
    target = folder_target(tmp_path / "out", password="hunter2-secret")
    with caplog.at_level("INFO", logger="courier.dispatch"):
        began = time.monotonic()
        (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
        elapsed = time.monotonic() - began
    lines = [r.getMessage() for r in caplog.records if "dispatch attempt" in r.message]
    assert len(lines) == 1
    fields = dict(p.split("=", 1) for p in shlex.split(lines[0])[2:])
    duration = fields.pop("duration")
    assert fields == {
        "job": str(job.pk),
        "attempt": "1",
        "target": target.name,
        "kind": "folder",
        "series": job.series_label,
        "outcome": "done",
        "state": "done",
        "sent": "2",
        "present": "0",
        "warnings": "0",
        "failed": "0",
        "bytes": str(series.total_bytes),
        "worker": job.attempts.get().worker,
        "error": "",
    }
    # Seconds with two decimals, and no more than the call took.
    assert re.fullmatch(r"\d+\.\d\d", duration)
    assert float(duration) <= elapsed + 0.01
    assert "hunter2" not in caplog.text


def test_a_worker_goes_on_with_its_targets_next_jobs(tmp_path):
    target = folder_target(tmp_path / "out", max_connections=1)
    jobs = [
        services.create_jobs(
            make_series(tmp_path / f"in{i}", 1).folder,
            [target],
            owned_spool=False,
            enqueue_now=False,
        )[0]
        for i in range(3)
    ]
    # The messages for the 2nd and 3rd job were consumed while the target was
    # busy; the worker that finishes the first job runs them.
    assert tasks.run_jobs_from(jobs[0].pk) == 3
    assert set(Job.objects.values_list("state", flat=True)) == {State.DONE}


def test_a_secret_in_an_error_message_is_blanked_out(tmp_path, immediate_huey):
    series = make_series(tmp_path / "in", 1)
    secret = "s3cret-passw0rd"
    missing = tmp_path / secret  # a path that happens to contain the secret
    target = folder_target(tmp_path / "out", password=secret)
    Target.objects.filter(pk=target.pk).update(path=str(missing))
    (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    assert "does not exist" in job.last_error
    assert secret not in job.last_error
    assert secret not in job.attempts.get().error


def test_a_secret_in_an_unexpected_exception_reaches_no_error_and_no_log(
    tmp_path, immediate_huey, caplog, monkeypatch
):
    from urllib.parse import quote

    from targets.kinds.folder.handler import FolderHandler

    secret = "p@ss/w0rd-42"

    def send(self, series, progress=None, context=None, connections=None):
        # A library error echoing the URL it was given, raw and quoted.
        raise RuntimeError(
            f"cannot open sftp://u:{secret}@host (u:{quote(secret, safe='')})"
        )

    monkeypatch.setattr(FolderHandler, "send", send)
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out", password=secret, retry_max_attempts=1)
    with caplog.at_level("DEBUG"):
        (job,) = services.create_jobs(series.folder, [target], owned_spool=False)
    job.refresh_from_db()
    attempt = job.attempts.get()
    assert job.state == State.FAILED
    assert job.last_error == (
        "gave up after 1 attempt: unexpected error: RuntimeError: "
        "cannot open sftp://u:********@host (u:********)"
    )
    assert attempt.error == (
        "unexpected error: RuntimeError: cannot open sftp://u:********@host "
        "(u:********)"
    )
    crash = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(crash) == 1 and crash[0].exc_info is None
    assert "error=RuntimeError" in crash[0].getMessage()
    assert "test_services.py:" in crash[0].getMessage()  # where it was raised
    for text in (caplog.text, job.last_error, attempt.error):
        assert "w0rd-42" not in text


def test_a_job_queued_by_the_query_tool_says_so(tmp_path):
    series = make_series(tmp_path / "in", 1)
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(
        series.folder, [target], owned_spool=False, source="query", enqueue_now=False
    )
    job.full_clean()  # "query" is one of the choices
    assert job.get_source_display() == "query tool"


def test_a_direct_send_waits_for_a_free_connection_ahead_of_queued_jobs(tmp_path):
    target = folder_target(tmp_path / "out", max_connections=1)

    def job(name: str) -> Job:
        folder = make_series(tmp_path / name, 1).folder
        return services.create_jobs(
            folder, [target], owned_spool=False, enqueue_now=False
        )[0]

    # Another worker sends on the target's only connection; another job waits.
    busy, queued = job("busy"), job("queued")
    assert engine.claim(busy.pk, "other-worker", True)
    by_hand = make_series(tmp_path / "direct", 2)
    waits: list[tuple[int, int]] = []
    reports: list[direct.SendReport] = []
    sender = threading.Thread(
        target=lambda: reports.append(
            direct.send_series(
                target, by_hand.folder, on_wait=lambda *w: waits.append(w)
            )
        )
    )
    sender.start()
    deadline = time.monotonic() + 60
    while not waits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waits == [(1, 1)]
    held = Job.objects.get(source="send_series")
    assert held.state == State.QUEUED and not held.attempts.exists()
    # The waiting send holds its place: a worker does not take the connection
    # for a queued job meanwhile.
    assert engine.claim(queued.pk, "worker-b", True) is None

    Job.objects.filter(pk=busy.pk).update(
        state=State.DONE, lease_owner="", lease_expires_at=None
    )
    sender.join(60)
    (report,) = reports
    assert report.job.state == State.DONE and report.job.sent == 2
    assert engine.claim(queued.pk, "worker-b", True) is not None


def test_a_lease_keeper_gives_up_the_job_when_it_is_taken_or_cannot_renew(
    tmp_path, settings, monkeypatch
):
    settings.COURIER_JOB_LEASE = 1.0
    target = folder_target(tmp_path / "out")
    (job,) = services.create_jobs(
        make_series(tmp_path / "in", 1).folder,
        [target],
        owned_spool=False,
        enqueue_now=False,
    )
    assert engine.claim(job.pk, "worker-a", True)

    def eventually_invalid(keeper) -> bool:
        deadline = time.monotonic() + 30
        while keeper.valid and time.monotonic() < deadline:
            time.sleep(0.05)
        keeper.stop()
        return not keeper.valid

    # Taken over (or cancelled): the next renewal finds the job is not its own.
    Job.objects.filter(pk=job.pk).update(lease_owner="worker-b")
    assert eventually_invalid(engine.keeper_for(job.pk, "worker-a").start())

    # The database does not answer: before the lease could have run out, the
    # worker stops counting on it.
    Job.objects.filter(pk=job.pk).update(lease_owner="worker-a")

    def away(*args, **kwargs):
        raise OperationalError("database is locked")

    monkeypatch.setattr(Job.objects, "filter", away)
    keeper = engine.keeper_for(job.pk, "worker-a").start()
    assert eventually_invalid(keeper)
    assert not keeper.lost.is_set()


def test_a_direct_send_is_watched_from_its_first_lease_renewal(
    tmp_path, settings, monkeypatch
):
    # A direct send queues the lease's watch (a message, and with it huey's
    # import) only once it is still sending at a renewal; should its process die
    # sooner, the sweep resumes the job when the lease has run out.
    watched: list[int] = []
    monkeypatch.setattr(tasks, "watch", lambda job_id, expires: watched.append(job_id))
    target = folder_target(tmp_path / "out")
    quick = direct.send_series(target, make_series(tmp_path / "quick", 3).folder)
    assert quick.job.state == State.DONE and watched == []

    settings.COURIER_JOB_LEASE = 1.0  # renewed every 0.2 s
    slow = direct.send_series(
        target,
        make_series(tmp_path / "slow", 3).folder,
        progress=lambda outcome: time.sleep(0.3),
    )
    assert slow.job.state == State.DONE and slow.job.sent == 3
    assert watched == [slow.job.pk]
