"""A worker process started with a backlog: every job completes, every time.

Started with work waiting, `run_huey`'s threads begin at once: jobs read headers with
pydicom, the periodic routing sweep (queued at start-up) loads the receiver and with
it pynetdicom, routing tasks scan spool folders. pydicom's import is not thread-safe;
before the fix about half of such starts left the process with a half-initialised
pydicom and every job in retry-wait for good.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from django.utils import timezone

from tests.dicomgen import make_series
from tests.fixtures.dispatch_peers import PROJECT

# Two starts, side by side: two sites, each with its own database, queue and backlog
# (the wedge is inside one process; a second start beside it only adds the CPU
# contention a busy server has), one with a purge for the routing sweep, one with a
# routing message. There were six, to hit a race about half the starts lost; since
# the send path imports pydicom through `load_pydicom`, starts no longer reproduce it
# (24 clean starts without run_huey's preload), and the import race itself is
# tests/targets/test_pydicom_loader.py, which hits it in every run without its guard.
ROUNDS = 2
SITES = 2
BROKEN = "partially initialized module"


def _starts(site, storescp, first_round: int, tmp_path) -> tuple[set, set, Path]:
    """Set up `site`, then start its worker ROUNDS // SITES times, each with a
    backlog; return the UIDs sent to the DICOM target, the UIDs routed and the
    routing target's folder."""
    out = tmp_path / "routed"
    out.mkdir(parents=True)
    dicom, _ = site.python(
        "import json\n"
        "from dispatch.routing.models import Rule\n"
        "from targets.models import Target\n"
        "dicom = Target(name='scp', kind='dicom', host='127.0.0.1',\n"
        f"    port={storescp.port}, called_aet={storescp.aet!r}, max_connections=4)\n"
        "dicom.save()\n"
        f"folder = Target(name='disk', kind='folder', path={str(out)!r})\n"
        "folder.save()\n"
        "rule = Rule.objects.create(name='everything')\n"
        "rule.targets.add(folder)\n"
        "print(json.dumps([dicom.pk, folder.pk]))\n"
    )
    incoming = site.spool / "incoming"
    incoming.mkdir()
    # Past any retention: an unrouted series this old is purged by the routing sweep.
    long_ago = (timezone.now() - timedelta(days=365)).isoformat()
    sent_uids: set[str] = set()
    routed_uids: set[str] = set()
    expected_jobs = 0
    for round_ in range(first_round, first_round + ROUNDS // SITES):
        # The backlog: two jobs queued for a DICOM target, and routing work: in even
        # rounds an old unrouted series for the routing sweep to purge (its first
        # step loads the receiver, and pynetdicom, while the jobs load pydicom: the
        # start that broke), in odd rounds a received series with its routing
        # message queued, as the receiver leaves it.
        queued = [make_series(tmp_path / f"q{round_}-{i}", 2) for i in range(2)]
        received = make_series(incoming / f"r{round_}", 2)
        sent_uids.update(u for s in queued for u in s.sop_uids)
        purge = round_ % 2 == 0
        if not purge:
            routed_uids.update(received.sop_uids)
        site.python(
            "from dispatch.jobs import services\n"
            "from dispatch.routing import tasks as routing_tasks\n"
            "from dispatch.routing.models import ReceivedSeries\n"
            "from targets.models import Target\n"
            f"target = Target.objects.get(pk={dicom})\n"
            f"for folder in {[str(s.folder) for s in queued]!r}:\n"
            "    services.create_jobs(folder, [target], owned_spool=False)\n"
            "row = ReceivedSeries.objects.create(\n"
            f"    folder={str(received.folder)!r},\n"
            f"    series_uid={received.series_uid!r},\n"
            f"    state={'unrouted' if purge else 'complete'!r},\n"
            f"    first_received_at={long_ago!r},\n"
            f"    last_received_at={long_ago!r},\n"
            f"    state_changed_at={long_ago!r},\n"
            ")\n"
            f"if {not purge}:\n"
            "    routing_tasks.route_series_task(row.pk)\n"
            "print(row.pk)\n"
        )
        expected_jobs += 2 if purge else 3
        worker = site.start_worker(4)

        def finished(round_=round_, expected=expected_jobs, left=received.folder):
            if BROKEN in site.worker_logs():
                raise AssertionError(f"round {round_}:\n{site.worker_logs()}")
            jobs = site.jobs()
            return (
                len(jobs) == expected
                and all(j["state"] == "done" for j in jobs)
                # Purged, or sent to the routing target and removed from the spool.
                and not left.exists()
            )

        site.wait_for(finished, what=f"every job of round {round_} done")
        site.stop_worker(worker)
    return sent_uids, routed_uids, out


def test_a_worker_started_with_a_backlog_completes_every_job_every_time(
    courier_site, storescp, tmp_path
):
    sites = [courier_site().migrate() for _ in range(SITES)]
    with ThreadPoolExecutor(SITES) as pool:
        runs = [
            pool.submit(
                _starts, site, storescp, n * ROUNDS // SITES, tmp_path / f"s{n}"
            )
            for n, site in enumerate(sites)
        ]
        results = [run.result() for run in runs]

    received_names = " ".join(p.name for p in storescp.files())
    for site, (sent_uids, routed_uids, out) in zip(sites, results, strict=True):
        assert BROKEN not in site.worker_logs()
        assert all(uid in received_names for uid in sent_uids)
        assert {p.stem for p in out.rglob("*.dcm")} == routed_uids
        assert all(j["attempt_count"] == 1 for j in site.jobs())


def test_the_web_application_imports_what_request_threads_need_when_loaded():
    code = (
        "import sys, json\n"
        "import config.wsgi\n"
        "from config.preload import modules\n"
        "print(json.dumps([m for m in modules() if m not in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
