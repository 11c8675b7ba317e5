"""Rules that forward as instances arrive, in process: a job that grows with its
series, yields while it waits, and ends only once the series is complete.

The receiver's side is `tasks.forward_received` called as its bookkeeping calls
it (the worker adds the files that landed when it claims the job); the process-level test (receiver, worker, Orthanc) is
tests/dispatch/receiving/test_end_to_end.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dispatch.jobs import growing
from dispatch.jobs.models import InstanceState, Job, JobInstance, State
from dispatch.jobs.services import create_jobs, retry_refusal
from dispatch.jobs.status import job_report
from dispatch.jobs.tasks import run_job, run_jobs_from, sweep
from dispatch.routing import services as routing
from dispatch.routing.models import ReceivedSeries
from dispatch.routing.tasks import forward_received
from tests.dicomgen import make_series
from tests.dispatch.helpers import folder_target, modality_is, rule

pytestmark = pytest.mark.django_db(transaction=True)


def arriving(spool: Path, tmp_path: Path, count: int = 6):
    """A series whose files land in its spool folder as the test moves them in."""
    full = make_series(tmp_path / "modality", count)
    folder = spool / "incoming" / "series-1"
    folder.mkdir(parents=True)
    row = ReceivedSeries.objects.create(
        series_uid=full.series_uid, study_uid=full.study_uid, folder=str(folder),
        calling_aet="CT_1", called_aet="PACS", state=ReceivedSeries.State.RECEIVING,
    )  # fmt: skip

    def land(files):
        for f in files:
            shutil.move(f, folder / f.name)

    return row, full.files, land


def delivered(folder: Path) -> int:
    return len(list(folder.rglob("*.dcm")))


def test_a_job_grows_with_its_series_yields_and_ends_once_routed(tmp_path, spool):
    now_t = folder_target(tmp_path / "now")
    later_t = folder_target(tmp_path / "later")
    streaming = rule("ct as it arrives", [now_t], modality_is("CT"))
    streaming.stream = True
    streaming.save()
    rule("ct when complete", [now_t, later_t], modality_is("CT"))
    mr = rule("mr as it arrives", [later_t], modality_is("MR"))
    mr.stream = True
    mr.save()
    row, files, land = arriving(spool, tmp_path)

    land(files[:2])
    fwd = forward_received(row.pk)
    (job,) = Job.objects.all()
    assert job.series_open and job.total == 2 and job.target == now_t
    assert job.calling_aet == "CT_1" and job.called_aet == "PACS"
    assert fwd == [job.pk] and forward_received(row.pk) == [job.pk]

    # It sends what is there and waits, holding no worker and no lease.
    job = run_job(job.pk)
    assert job.state == State.FOLLOWING and not job.lease_owner
    assert delivered(tmp_path / "now") == 2
    assert job_report(job)["waiting"].startswith("2 of 2 sent so far")
    assert "next instances" in retry_refusal(job)
    assert run_job(job.pk) is None  # a message for a waiting job claims nothing

    land(files[2:5])
    forward_received(row.pk, fwd)
    job.refresh_from_db()
    assert (job.state, job.total) == (State.QUEUED, 2)
    job = run_job(job.pk)  # takes the three new files
    assert job.total == 5
    assert job.state == State.FOLLOWING and delivered(tmp_path / "now") == 5
    assert Path(row.folder).is_dir()  # kept: the series is not complete

    land(files[5:])
    assert routing.complete_series(row.pk)
    result = routing.route_series(row.pk)
    # The streamed target gets no second job; the other rule's target gets one.
    assert result.state == ReceivedSeries.State.ROUTED
    assert sorted(result.rules) == ["ct as it arrives", "ct when complete"]
    (later,) = Job.objects.exclude(pk=job.pk)
    assert later.target == later_t and not later.series_open
    job.refresh_from_db()
    assert (job.state, job.total, job.series_open) == (State.QUEUED, 6, False)

    job = run_job(job.pk)
    assert job.state == State.DONE and job.sent == 6
    assert delivered(tmp_path / "now") == 6
    # Each instance was sent once, over the three attempts.
    assert sum(a.sent for a in job.attempts.all()) == 6
    assert Path(row.folder).is_dir()  # the other job is not done yet
    assert run_job(later.pk).state == State.DONE
    assert not Path(row.folder).exists()


def test_no_streaming_rule_leaves_routing_to_completion_and_the_default_target(
    tmp_path, spool, settings
):
    settings.COURIER_UNROUTED_DEFAULT_TARGET = "catch-all"
    catch = folder_target(tmp_path / "catch", name="catch-all")
    mr = rule("mr as it arrives", [folder_target(tmp_path / "mr")], modality_is("MR"))
    mr.stream = True
    mr.save()
    row, files, land = arriving(spool, tmp_path, 2)
    land(files)

    assert forward_received(row.pk) == []
    assert not Job.objects.exists()
    routing.complete_series(row.pk)
    result = routing.route_series(row.pk)
    assert [Job.objects.get(pk=pk).target for pk in result.job_ids] == [catch]


def test_a_waiting_job_is_woken_by_what_came_while_it_sent_or_by_the_sweep(
    tmp_path, spool
):
    target = folder_target(tmp_path / "out")
    r = rule("all as it arrives", [target])
    r.stream = True
    r.save()
    row, files, land = arriving(spool, tmp_path, 3)
    land(files[:1])
    fwd = forward_received(row.pk)
    (job,) = Job.objects.all()
    JobInstance.objects.filter(job=job).update(state=InstanceState.SENT)
    Job.objects.filter(pk=job.pk).update(state=State.SENDING)
    land(files[1:2])
    # A file landed while a worker sends: the receiver cannot queue a sending job...
    forward_received(row.pk, fwd)
    assert Job.objects.get(pk=job.pk).state == State.SENDING
    # ... the worker that yields finds it and goes on.
    Job.objects.filter(pk=job.pk).update(state=State.FOLLOWING)
    assert growing.wake_if_due(job.pk)
    assert Job.objects.get(pk=job.pk).state == State.QUEUED
    # Every file has its row, none pending, the series open: it stays waiting,
    # even for the sweep.
    growing.add_files([job.pk], row.folder)
    JobInstance.objects.filter(job=job).update(state=InstanceState.SENT)
    Job.objects.filter(pk=job.pk).update(state=State.FOLLOWING)
    assert not growing.wake_if_due(job.pk)
    sweep()
    assert Job.objects.get(pk=job.pk).state == State.FOLLOWING
    # Closed with its wake-up message lost: the sweep queues it.
    Job.objects.filter(pk=job.pk).update(series_open=False)
    assert sweep() >= 1
    assert Job.objects.get(pk=job.pk).state == State.QUEUED


def test_instances_added_to_a_job_that_failed_are_named_when_the_series_closes(
    tmp_path, spool
):
    target = folder_target(tmp_path / "out")
    r = rule("all as it arrives", [target])
    r.stream = True
    r.save()
    row, files, land = arriving(spool, tmp_path, 3)
    land(files[:1])
    fwd = forward_received(row.pk)
    (job,) = Job.objects.all()
    Job.objects.filter(pk=job.pk).update(state=State.FAILED, last_error="refused")
    land(files[1:])
    forward_received(row.pk, fwd)
    routing.complete_series(row.pk)
    routing.route_series(row.pk)

    job.refresh_from_db()
    assert job.total == 3 and not job.series_open
    late = job.instances.filter(state=InstanceState.FAILED)
    assert late.count() == 3  # (the first was never sent either)
    assert all("had failed before this instance arrived" in m for m in
               late.values_list("message", flat=True))  # fmt: skip
    assert not job.instances.filter(state=InstanceState.PENDING).exists()


def test_an_open_job_of_one_file_is_never_taken_into_a_batch(tmp_path, spool):
    """A batch sends one-file jobs as they are; an open job of one file must grow
    first (a batch would find nothing new, wake it and take it again)."""
    target = folder_target(tmp_path / "out")
    r = rule("all as it arrives", [target])
    r.stream = True
    r.save()
    row, files, land = arriving(spool, tmp_path, 3)
    land(files[:1])
    (job_id,) = forward_received(row.pk)
    other = make_series(tmp_path / "other", 1)
    (single,) = create_jobs(other.folder, [target], owned_spool=False)
    land(files[1:])

    run_jobs_from(single.pk)

    job = Job.objects.get(pk=job_id)
    assert (job.state, job.total, job.sent) == (State.FOLLOWING, 3, 3)
    assert job.attempts.count() <= 2


# The same steps on PostgreSQL, in one site process (one Django start-up): the
# conditional UPDATEs, the recount subquery, the batch's NOT series_open.
PG_STEPS = """
import json, shutil
from pathlib import Path
from dispatch.jobs import growing
from dispatch.jobs.models import Job, State
from dispatch.jobs.tasks import run_job, sweep
from dispatch.routing import services
from dispatch.routing.models import ReceivedSeries, Rule
from dispatch.routing.tasks import forward_received
from targets.models import Target
files = sorted(Path(SRC).glob('*.dcm'))
folder = Path(SPOOL) / 'incoming' / 'series-pg'
folder.mkdir(parents=True)
t = Target(name='out', kind='folder', path=OUT)
t.save()
r = Rule.objects.create(name='all', stream=True)
r.targets.set([t])
row = ReceivedSeries.objects.create(series_uid='1.2.3', folder=str(folder),
    calling_aet='CT_1', state='receiving')
shutil.move(files[0], folder / files[0].name)
(job_id,) = forward_received(row.pk)
seen = [run_job(job_id).state]
for f in files[1:]:
    shutil.move(f, folder / f.name)
forward_received(row.pk, [job_id])
seen.append(run_job(job_id).state)
seen.append(growing.due_following())
services.complete_series(row.pk)
services.route_series(row.pk)
job = run_job(job_id)
print(json.dumps(seen + [job.state, job.total, job.sent, Path(folder).exists()]))
"""


def test_streaming_steps_on_postgresql(courier_site, postgres_server, tmp_path):
    url = postgres_server.create_database(f"stream_{tmp_path.name[-8:].lower()}")
    site = courier_site(database_url=url, pg=postgres_server).migrate()
    src = make_series(tmp_path / "modality", 3)
    (tmp_path / "out").mkdir()
    code = (
        f"SRC, SPOOL, OUT = {str(src.folder)!r}, {str(site.spool)!r}, "
        f"{str(tmp_path / 'out')!r}\n" + PG_STEPS
    )
    assert site.python(code) == [
        "following", "following", [], "done", 3, 3, False
    ]  # fmt: skip
