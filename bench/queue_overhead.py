"""Queue overhead: 1,000 one-instance jobs to a Folder target through real workers.

SUPERSEDED by bench/cmd_queue.py (interleaved whole processes with CPU and peak RSS);
kept for the figures the README quotes from it.

    .venv/bin/python bench/queue_overhead.py [--jobs 1000] [--workers 4]

Generates `--jobs` one-instance series (~39 KB CT each) and measures, each in a fresh
Courier site (its own database, queue and spool):

- reference: the same series written by `FolderHandler.send()` in a plain loop in one
  process (no database, no queue): what the jobs cost without the dispatch engine;
- SQLite + SqliteHuey (the embedded default);
- SQLite + Redis;
- PostgreSQL + Redis (the scale-out configuration).

For each configuration the jobs are created first (not timed), one `run_huey` process
with `--workers` threads is started and ready, then the clock runs from the first
enqueue until the last job is done (read from the job table). The Folder target allows
`--workers` jobs at once. Prints jobs/s and the ratio to the reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.dicomgen import make_series  # noqa: E402
from tests.fixtures.dispatch_peers import (  # noqa: E402
    CourierSite,
    PostgresServer,
    RedisServer,
)

REFERENCE = """
import json, sys, time
import django
django.setup()
from targets.kinds.folder.handler import FolderHandler
from targets.models import FolderTarget
from targets.series import scan_folder
folders, out = json.loads(sys.argv[1]), sys.argv[2]
handler = FolderHandler(FolderTarget(name="bench", path=out))
start = time.perf_counter()
for folder in folders:
    handler.send(scan_folder(folder))
print(json.dumps(time.perf_counter() - start))
"""

CREATE = """
import json
from dispatch.jobs import services
from targets.models import Target
t = Target.objects.get(pk={target})
ids = []
for f in json.load(open({folders!r})):
    ids += [j.pk for j in services.create_jobs(
        f, [t], owned_spool=False, source="queue", enqueue_now=False)]
print(json.dumps(len(ids)))
"""

ENQUEUE = """
import json, time
from dispatch.jobs.models import Job
from dispatch.jobs.tasks import run_job_task
ids = list(Job.objects.values_list("id", flat=True))
start = time.time()
for job_id in ids:
    run_job_task(job_id)
print(json.dumps(start))
"""


def wait_ready(site: CourierSite, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "consumer" in site.worker_logs().lower() and "started" in (
            site.worker_logs().lower()
        ):
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise RuntimeError(f"worker did not start:\n{site.worker_logs()}")


def run_site(site: CourierSite, folders_file: Path, jobs: int, workers: int) -> float:
    site.migrate()
    out = site.workdir / "out"
    out.mkdir()
    target = site.add_target(
        name="bench-folder", kind="folder", path=str(out), max_connections=workers
    )
    created = site.python(CREATE.format(target=target, folders=str(folders_file)))
    assert created == jobs, created
    site.start_worker(workers)
    wait_ready(site)
    try:
        start = site.python(ENQUEUE)
        while True:
            left = site.query(
                "SELECT COUNT(*) FROM dispatch_job WHERE state NOT IN "
                "('done', 'failed', 'done-with-warnings')"
            )[0][0]
            if not left:
                break
            time.sleep(0.05)
        elapsed = time.time() - start
        failed = site.query("SELECT COUNT(*) FROM dispatch_job WHERE state <> 'done'")
        if failed[0][0]:
            raise RuntimeError(f"{failed[0][0]} jobs not done:\n{site.worker_logs()}")
        return elapsed
    finally:
        site.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--only", default="", help="run only configurations containing this text"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-bench-queue-"))
    print(f"generating {args.jobs} one-instance series in {work} ...", flush=True)
    folders = [
        str(make_series(work / "in" / f"{i:05d}", 1).folder) for i in range(args.jobs)
    ]
    folders_file = work / "folders.json"
    folders_file.write_text(json.dumps(folders))

    results: dict[str, float] = {}
    ref_site = CourierSite(work / "ref")
    ref_out = work / "ref" / "out"
    ref_out.mkdir()
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", REFERENCE, json.dumps(folders), str(ref_out)],
        env=ref_site.env, cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    results["reference: FolderHandler.send loop, no queue"] = json.loads(
        done.stdout.strip().splitlines()[-1]
    )
    print(
        f"reference: {args.jobs / results[next(iter(results))]:.0f} jobs/s", flush=True
    )

    redis = RedisServer(work / "redis").start()
    pg = PostgresServer()
    pg.start(timeout=60)
    try:
        configs = {
            "SQLite + SqliteHuey": lambda: CourierSite(work / "sqlite"),
            "SQLite + Redis": lambda: CourierSite(
                work / "sqlite-redis", redis_url=redis.url
            ),
            "PostgreSQL + Redis": lambda: CourierSite(
                work / "pg-redis",
                database_url=pg.create_database("bench"),
                redis_url=redis.url,
                pg=pg,
            ),
        }
        for name, make in configs.items():
            if args.only and args.only not in name:
                continue
            elapsed = run_site(make(), folders_file, args.jobs, args.workers)
            results[name] = elapsed
            print(f"{name}: {args.jobs / elapsed:.0f} jobs/s", flush=True)
    finally:
        redis.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)

    ref = results[next(iter(results))]
    print(f"\n{args.jobs} one-instance jobs, worker threads: {args.workers}")
    print(f"{'configuration':48} {'seconds':>8} {'jobs/s':>8} {'vs ref':>7}")
    for name, elapsed in results.items():
        print(
            f"{name:48} {elapsed:8.2f} {args.jobs / elapsed:8.0f} {ref / elapsed:7.2f}"
        )


if __name__ == "__main__":
    main()
