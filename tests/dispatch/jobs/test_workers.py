"""The dispatch engine with real worker processes and real peers.

Each test builds a Courier site in a temporary folder (its own database, queue and
spool), starts `manage.py run_huey` workers as subprocesses, queues work, and checks
what arrived on the peer and what the job tables say.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket

import pytest

from tests.dicomgen import make_series
from tests.peers import Orthanc, StoreSCP, free_port

FAST_RETRY = {"retry_base_delay": 1, "retry_max_delay": 2, "retry_max_attempts": 30}


def dicom_target(peer, **fields) -> dict:
    port = peer.dicom_port if isinstance(peer, Orthanc) else peer.port
    return {
        "name": fields.pop("name", f"{peer.name}-{port}"),
        "kind": "dicom",
        "host": "127.0.0.1",
        "port": port,
        "called_aet": peer.aet,
        **fields,
    }


def _hold(port: int) -> socket.socket:
    """Bind `port` on loopback without listening: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    return sock


def test_two_workers_on_postgres_and_redis_drain_one_queue_exactly_once(
    courier_site, postgres_server, redis_server, orthanc, tmp_path
):
    url = postgres_server.create_database("courier_scaleout")
    site = courier_site(
        database_url=url, redis_url=redis_server.url, pg=postgres_server
    )
    site.migrate()
    target = site.add_target(**dicom_target(orthanc, max_connections=4))
    series = [make_series(tmp_path / f"s{i}", 3) for i in range(16)]
    uids = {uid for s in series for uid in s.sop_uids}
    workers = [site.start_worker(2), site.start_worker(2)]
    site.wait_workers_ready()
    job_ids = site.queue_folders(target, [s.folder for s in series])

    site.wait_for(
        lambda: all(j["state"] == "done" for j in site.jobs()), what="all jobs done"
    )
    stored = orthanc.instance_uids()
    assert uids <= stored
    # The jobs' file rows (one executemany per job, files.insert_rows) as the
    # model has them on PostgreSQL: defaults, the scan's header tags as JSON.
    rows = site.query(
        "SELECT dicom, state, commitment, tags->>'SeriesInstanceUID', size > 0, "
        "stamp <> '', updated_at IS NOT NULL FROM dispatch_jobinstance"
    )
    assert len(rows) == len(uids)
    assert {r[3] for r in rows} == {s.series_uid for s in series}
    assert all(r[:3] == (True, "sent", "") and all(r[4:]) for r in rows), rows[:3]
    worker_pids = {str(w.pid) for w in workers}
    for job_id in job_ids:
        # Each job ran exactly once: one attempt, by one of the two workers, that
        # sent each instance once. Which worker took which job is the scheduler's
        # business and not asserted.
        (attempt,) = site.attempts(job_id)
        assert attempt["outcome"] == "done" and attempt["sent"] == 3
        assert attempt["worker"].split(":")[1] in worker_pids
    # Both consumers came up (wait_workers_ready) and are still running.
    assert [w.poll() for w in workers] == [None, None]
    status, report = site.python(
        "import json; from dispatch import overview; print(json.dumps(overview.health()))"
    )
    assert status == "ok" and report["database"] == report["queue"] == "ok"
    # The target's limit of 4 connections held across both processes: never more
    # than 4 jobs sending at once (each holds at least one connection).
    events = []
    for start, end in site.query("SELECT started_at, ended_at FROM dispatch_attempt"):
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    assert 1 < peak <= 4


def test_target_down_waits_to_retry_and_completes_when_it_is_back(
    courier_site, tmp_path
):
    peer = Orthanc(tmp_path / "orthanc")  # started only later in this test
    # Hold Orthanc's ports until it starts, so no other process takes them meanwhile:
    # a bound socket that does not listen refuses connections, as a stopped peer does.
    held = [_hold(peer.dicom_port), _hold(peer.http_port)]
    site = courier_site().migrate()
    target = site.add_target(**dicom_target(peer, **FAST_RETRY))
    series = make_series(tmp_path / "series", 12)
    (job_id,) = site.queue_folders(target, [series.folder])
    site.start_worker(1)

    site.wait_for(lambda: site.jobs()[0]["state"] == "retry-wait", what="retry-wait")
    job = site.jobs()[0]
    refused = (
        f"connection refused by 127.0.0.1:{peer.dicom_port}: is the DICOM service "
        "running, and the port right?"
    )
    assert re.fullmatch(re.escape(refused) + r" \(attempt \d+\)", job["last_error"])
    first = site.attempts(job_id)[0]
    assert first["outcome"] == "error" and first["sent"] == 0
    assert first["error"] == refused

    for sock in held:
        sock.close()
    with peer:
        site.wait_for(lambda: site.jobs()[0]["state"] == "done", what="done")
        assert peer.count_instances() == 12
        assert peer.instance_uids() == set(series.sop_uids)
    attempts = site.attempts(job_id)
    assert len(attempts) >= 2
    assert attempts[-1]["outcome"] == "done" and attempts[-1]["sent"] == 12


def test_a_killed_workers_job_is_resumed_by_a_live_worker_when_its_lease_ends(
    courier_site, tmp_path
):
    # Enough instances that the kill lands mid-series; a 3 s lease (renewed every
    # 0.6 s) so the test is quick. Periodic tasks are off in both workers: no sweep
    # can find the job, only the watch on its lease, and no worker is restarted.
    peer = Orthanc(tmp_path / "orthanc").start()
    try:
        site = courier_site(env={"COURIER_JOB_LEASE": "3"}).migrate()
        target = site.add_target(**dicom_target(peer))
        total = 400
        series = make_series(tmp_path / "series", total)
        workers = [site.start_worker(1, "--no-periodic") for _ in range(2)]
        site.wait_workers_ready()
        (job_id,) = site.queue_folders(target, [series.folder])
        done_at_kill = site.wait_for(
            lambda: (n := site.instances_done(job_id)) >= total // 4 and n,
            what="a quarter sent",
        )
        owner = site.jobs()[0]["lease_owner"].split(":")[1]
        (victim,) = [w for w in workers if str(w.pid) == owner]
        (survivor,) = [w for w in workers if w is not victim]
        site.kill_worker(victim)
        # What the killed worker had written down as confirmed; outcomes it held
        # in memory (written every second) are lost with it and sent again.
        confirmed = site.instances_done(job_id)
        assert done_at_kill <= confirmed < total, "the series finished before the kill"
        assert site.jobs()[0]["state"] == "sending"

        site.wait_for(lambda: site.jobs()[0]["state"] == "done", what="resumed")
        assert survivor.poll() is None
        assert peer.count_instances() == total
        assert peer.instance_uids() == set(series.sop_uids)
        # One attempt per worker, never two at once: the killed worker's, closed
        # as interrupted when the live worker took the job over, and the live one's.
        first, second = site.attempts(job_id)
        assert first["outcome"] == "interrupted"
        assert first["worker"].split(":")[1] == str(victim.pid)
        assert second["outcome"] == "done"
        assert second["worker"].split(":")[1] == str(survivor.pid)
        # The resumed attempt sent exactly what was not confirmed, not the whole
        # series again (Orthanc keeps one copy of each SOP Instance UID).
        assert second["sent"] == total - confirmed
    finally:
        peer.stop()


def test_a_worker_killed_in_the_middle_of_a_batch_leaves_the_rest_resumed_none_twice(
    courier_site, tmp_path
):
    """One-file jobs go in batches (`tasks.run_batch`). A PACS that takes a second
    per instance and one connection: the first job goes alone, the others in a
    batch; the worker holding the batch is killed after its second job is
    confirmed. The live worker resumes the rest once their leases end; what was
    confirmed is never sent again (storescp keeps every reception as its own
    file, +uf), and only the job in flight at the kill may arrive twice."""
    import pydicom

    with StoreSCP(tmp_path / "pacs", extra_args=["--sleep-after", "1", "+uf"]) as peer:
        site = courier_site(env={"COURIER_JOB_LEASE": "2"}).migrate()
        # The workers boot while the target and the series are made.
        workers = [site.start_worker(1, "--no-periodic") for _ in range(2)]
        target = site.add_target(**dicom_target(peer, max_connections=1))
        series = [make_series(tmp_path / f"s{i}", 1) for i in range(4)]
        site.wait_workers_ready()
        job_ids = site.queue_folders(target, [s.folder for s in series])
        uid_of = dict(zip(job_ids, (s.sop_uids[0] for s in series), strict=True))

        def done() -> set[int]:
            return {j["id"] for j in site.jobs() if j["state"] == "done"}

        def mid_batch() -> list[dict]:
            held = [j for j in site.jobs() if j["state"] == "sending"]
            return len(done()) >= 2 and len(held) >= 2 and held

        held = site.wait_for(mid_batch, what="two jobs confirmed, two held")
        owner = held[0]["lease_owner"].split(":")[1]
        (victim,) = [w for w in workers if str(w.pid) == owner]
        (survivor,) = [w for w in workers if w is not victim]
        site.kill_worker(victim)
        confirmed = done()
        # Mid-batch: the killed worker held the rest of its batch.
        assert {j["lease_owner"] for j in held} == {held[0]["lease_owner"]}
        assert len(confirmed) < 4, "the batch finished before the kill"

        site.wait_for(lambda: len(done()) == 4, what="the rest resumed")
        assert survivor.poll() is None
        received: dict[str, int] = {}
        for path in peer.files():
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            received[uid] = received.get(uid, 0) + 1
        assert set(received) == set(uid_of.values())
        for job_id in confirmed:
            assert received[uid_of[job_id]] == 1
            (attempt,) = site.attempts(job_id)
            assert attempt["outcome"] == "done"
        # At most the one instance in flight at the kill went twice.
        assert sum(received.values()) <= 5
        for job_id in set(job_ids) - confirmed:
            attempts = site.attempts(job_id)
            assert attempts[0]["outcome"] == "interrupted"
            assert attempts[0]["worker"].split(":")[1] == str(victim.pid)
            assert attempts[-1]["outcome"] == "done"
            assert attempts[-1]["worker"].split(":")[1] == str(survivor.pid)


def test_a_silent_peer_times_out_and_the_worker_goes_on_with_other_jobs(
    courier_site, tmp_path
):
    # storescp accepts the association, then sleeps instead of answering the C-STORE.
    silent = StoreSCP(
        tmp_path / "silent", extra_args=["--sleep-during", "600"], fork=True
    )
    silent.start()
    try:
        site = courier_site().migrate()
        out = tmp_path / "out"
        out.mkdir()
        fields = [
            dicom_target(silent, dimse_timeout=2, acse_timeout=2, retry_max_attempts=1),
            {"name": "after", "kind": "folder", "path": str(out)},
        ]
        # One instance for the silent peer: each instance that hangs costs a DIMSE
        # timeout (and the attempt stops after three in a row); one proves it.
        folders = [make_series(tmp_path / n, c).folder for n, c in (("a", 1), ("b", 2))]
        # One site process makes both targets and queues one job to each, in order
        # (as `add_target` then `queue_folders`, without a Django start-up each).
        stuck, later = site.python(
            "import json\n"
            "from dispatch.jobs import services\n"
            "from targets.models import Target\n"
            "ids = []\n"
            f"for fields, folder in zip(json.loads({json.dumps(json.dumps(fields))}),"
            f" {json.dumps([str(f) for f in folders])}):\n"
            "    t = Target(**fields)\n"
            "    t.save()\n"
            "    ids += [j.pk for j in services.create_jobs(folder, [t],"
            " owned_spool=False, source='queue')]\n"
            "print(json.dumps(ids))\n"
        )
        site.start_worker(1)  # one thread: the next job needs it back

        site.wait_for(
            lambda: (
                {j["id"]: j["state"] for j in site.jobs()}
                == {stuck: "failed", later: "done"}
            ),
            what="timeout then the other job",
        )
        attempt = site.attempts(stuck)[0]
        assert attempt["ended_at"] is not None
        assert "DIMSE timeout" in attempt["error"]
        assert len(list(out.rglob("*.dcm"))) == 2
    finally:
        # storescp --fork leaves sleeping children: stop its whole process group.
        os.killpg(silent.proc.pid, signal.SIGKILL)
        silent.proc.wait(5)


@pytest.mark.django_db(transaction=True)
def test_a_refused_instance_fails_the_job_naming_it_and_the_rest_arrive(
    orthanc, tmp_path
):
    from dispatch.jobs import direct
    from dispatch.jobs.models import InstanceState, State
    from targets.models import DicomTarget

    good = make_series(tmp_path / "series", 4)
    # An SOP class Orthanc does not accept (UnknownSopClassAccepted is off).
    odd = make_series(
        tmp_path / "series" / "odd",
        1,
        tags={"SOPClassUID": "1.2.826.0.1.3680043.8.498.99999"},
    )
    target = DicomTarget.objects.create(
        name="orthanc-refusing",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        called_aet=orthanc.aet,
    )
    report = direct.send_series(target, good.folder)
    job = report.job
    assert job.state == State.FAILED
    assert (job.sent, job.failed, job.total) == (4, 1, 5)
    assert "1 of 5 instances failed" in job.last_error
    assert odd.files[0].name in job.last_error
    assert "refused SOP class" in job.last_error
    bad = job.instances.get(state=InstanceState.FAILED)
    assert bad.sop_instance_uid == odd.sop_uids[0]
    for uid in good.sop_uids:
        assert orthanc.find_instance(uid)


def test_jobs_whose_queue_messages_were_lost_are_found_by_a_starting_worker(
    courier_site, tmp_path
):
    site = courier_site().migrate()
    out = tmp_path / "out"
    out.mkdir()
    target = site.add_target(name="disk", kind="folder", path=str(out))
    folders = [make_series(tmp_path / f"s{i}", 2).folder for i in range(3)]
    site.queue_folders(target, folders, send_messages=False)
    site.start_worker(2)
    site.wait_for(
        lambda: {j["state"] for j in site.jobs()} == {"done"}, what="all jobs done"
    )
    assert len(list(out.rglob("*.dcm"))) == 6


def test_health_reports_an_unreachable_redis(courier_site):
    site = courier_site(redis_url=f"redis://127.0.0.1:{free_port()}/0").migrate()
    status, report = site.python(
        "import json; from dispatch import overview; print(json.dumps(overview.health()))"
    )
    assert status == "down"
    assert report["database"] == "ok" and report["queue"].startswith("error")
