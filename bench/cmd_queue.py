"""The queue as users run it: one-instance jobs to a Folder target drained by
`manage.py run_huey` processes, beside the same sends in a plain loop.

    .venv/bin/python bench/cmd_queue.py [--rounds 3] [--jobs 1000]
        [--configs ref,sqlite1,pg1,pg2,pg4] [--threads N] [--json bench/results.jsonl]

Generates `--jobs` one-instance series (~39 KB CT each, tests/dicomgen.py). Arms, in
interleaved rounds, each in a fresh Courier site (its own database, queue and spool):

- `ref`: the reference, one process running `FolderHandler.send(scan_folder(f))` for
  every folder in a plain loop (no database, no queue): the same file writes and
  fsyncs. Timed around the loop inside the process (Django start excluded, as the
  workers below are already running); the whole process is printed beside it.
- `sqlite1`: the embedded default, SQLite + SqliteHuey, one `run_huey` process;
- `pg1`, `pg2`, `pg4`: PostgreSQL + Redis (PriorityRedisHuey), 1, 2 and 4 `run_huey`
  processes (also `sqlite2`, `redis-sqlite1`, ... if named).

Every `run_huey` is started plainly, as the README's deployment does (the settings'
`COURIER_WORKERS` threads, 4 unless `--threads`, huey's own polling), and is ready
before the clock starts. The jobs are created first with `enqueue_now=False`
(untimed); the clock runs from the first enqueue (one `manage.py shell` enqueuing
every job) until the job table says the last one is done. The Folder target allows
processes x threads jobs at once, so its limit is not what is measured. The CPU
column is the workers' (read from /proc); the database and Redis servers' CPU is
printed apart. jobs/s and the ratio to the loop of the same round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from harness import (
    ROOT,
    Arm,
    BenchError,
    ProcessMeter,
    Run,
    header,
    interleave,
    manage,
    proc_tree_cpu,
    report,
    run_process,
    start_process,
    stop_process,
    wait_until,
)

from tests.dicomgen import make_series
from tests.fixtures.dispatch_peers import CourierSite, PostgresServer, RedisServer

REFERENCE = """
import json, resource, sys, time
import django
django.setup()
from targets.kinds.folder.handler import FolderHandler
from targets.models import FolderTarget
from targets.series import scan_folder
folders, out = json.load(open(sys.argv[1])), sys.argv[2]
handler = FolderHandler(FolderTarget(name="bench", path=out))
start, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for folder in folders:
    result = handler.send(scan_folder(folder))
    assert result.sent == 1, result
end = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.perf_counter() - start,
                  "user": end.ru_utime - ru.ru_utime, "sys": end.ru_stime - ru.ru_stime}))
"""

CREATE = """
import json
from dispatch.jobs import services
from targets.models import Target
t = Target.objects.get(pk={target})
n = 0
for f in json.load(open({folders!r})):
    n += len(services.create_jobs(
        f, [t], owned_spool=False, source="queue", enqueue_now=False))
print(json.dumps(n))
"""

ENQUEUE = """
import json, time
from dispatch.jobs.models import Job
from dispatch.jobs.tasks import run_job_task
ids = list(Job.objects.order_by("id").values_list("id", flat=True))
start = time.time()
for job_id in ids:
    run_job_task(job_id)
print(json.dumps(start))
"""

UNFINISHED = (
    "SELECT COUNT(*) FROM dispatch_job WHERE state NOT IN "
    "('done', 'failed', 'done-with-warnings')"
)


class QueueArm:
    """A fresh site with its jobs and `processes` ready workers; `run()` drains it."""

    def __init__(self, args, work: Path, kind: str, processes: int, servers: dict):
        self.args, self.work, self.kind, self.processes = args, work, kind, processes
        self.servers = servers
        self.site: CourierSite | None = None
        self.workers = []

    def make_site(self) -> CourierSite:
        path = self.work / f"{self.kind}{self.processes}-{uuid.uuid4().hex[:6]}"
        env = {"COURIER_WORKERS": str(self.args.threads)} if self.args.threads else {}
        redis, pg = self.servers.get("redis"), self.servers.get("pg")
        if self.kind == "pg":
            name = f"bench_{uuid.uuid4().hex[:8]}"
            return CourierSite(path, database_url=pg.create_database(name),
                               redis_url=redis.url, pg=pg, env=env)  # fmt: skip
        if self.kind == "redis-sqlite":
            return CourierSite(path, redis_url=redis.url, env=env)
        return CourierSite(path, env=env)

    def before(self) -> None:
        site = self.site = self.make_site().migrate()
        out = site.workdir / "out"
        out.mkdir()
        threads = self.args.threads or 4
        target = site.add_target(
            name="bench-folder", kind="folder", path=str(out),
            max_connections=min(32, threads * self.processes),
        )  # fmt: skip
        created = site.python(
            CREATE.format(target=target, folders=str(self.args.folders_file))
        )
        if created != self.args.jobs:
            raise BenchError(f"created {created} jobs, not {self.args.jobs}")
        logs = [site.workdir / f"run_huey-{i}.log" for i in range(self.processes)]
        self.workers = [
            start_process(manage("run_huey"), env=site.env, cwd=ROOT, log=log)
            for log in logs
        ]
        wait_until(
            lambda: all(
                "consumer started" in log.read_text(errors="replace").lower()
                for log in logs
            ),
            timeout=120,
        )

    def server_pids(self) -> list[int]:
        if self.kind == "pg":
            return [self.servers["pg"].proc.pid, self.servers["redis"].proc.pid]
        if self.kind == "redis-sqlite":
            return [self.servers["redis"].proc.pid]
        return []

    def run(self) -> Run:
        site = self.site
        servers = self.server_pids()
        server_cpu = sum(proc_tree_cpu(pid) for pid in servers)
        meter = ProcessMeter(*(w.pid for w in self.workers)).start()
        try:
            start = site.python(ENQUEUE)
            wait_until(lambda: not site.query(UNFINISHED)[0][0], 1800, step=0.05)
            wall = time.time() - start
            run = meter.stop(wall)
            if servers:
                run.extra["server_cpu"] = (
                    sum(proc_tree_cpu(pid) for pid in servers) - server_cpu
                )
            failed = site.query("SELECT COUNT(*) FROM dispatch_job WHERE state<>'done'")
            if failed[0][0]:
                raise BenchError(f"{failed[0][0]} jobs not done")
            written = len(list((site.workdir / "out").rglob("*.dcm")))
            if written != self.args.jobs:
                raise BenchError(f"{written} files in the target, not {self.args.jobs}")
            return run
        finally:
            for worker in self.workers:
                stop_process(worker, signal.SIGINT)
            shutil.rmtree(site.workdir / "out", ignore_errors=True)


def reference_arm(args, work: Path) -> Arm:
    out = work / "ref-out"
    site = CourierSite(work / "ref-site")  # settings only: the loop uses no database

    def before() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()

    def run() -> Run:
        whole = run_process(
            [sys.executable, "-c", REFERENCE, str(args.folders_file), str(out)],
            env=site.env, cwd=ROOT,
        )  # fmt: skip
        inner = json.loads(
            Path(whole.extra["log"]).read_text().strip().splitlines()[-1]
        )
        run = Run(inner["wall"], inner["user"], inner["sys"], whole.rss_kb)
        run.extra.update(whole_wall=whole.wall, whole_cpu=whole.cpu)
        return run

    return Arm("ref: FolderHandler.send() loop, 1 process", run, before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--configs", default="ref,sqlite1,pg1,pg2,pg4")
    parser.add_argument(
        "--threads", type=int, default=0, help="COURIER_WORKERS (default: settings')"
    )
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    args = parser.parse_args()
    header("the queue: one-instance jobs through run_huey processes vs a plain loop")
    work = Path(tempfile.mkdtemp(prefix="courier-bench-queue-"))
    servers: dict = {}
    try:
        print(f"generating {args.jobs} one-instance series in {work} ...", flush=True)
        folders = [
            str(make_series(work / "in" / f"{i:05d}", 1).folder)
            for i in range(args.jobs)
        ]
        args.folders_file = work / "folders.json"
        args.folders_file.write_text(json.dumps(folders))
        configs = args.configs.split(",")
        if any("redis" in c or c.startswith("pg") for c in configs):
            servers["redis"] = RedisServer(work / "redis").start()
        if any(c.startswith("pg") for c in configs):
            servers["pg"] = PostgresServer().start(timeout=60)
        labels = {"sqlite": "SQLite + SqliteHuey", "pg": "PostgreSQL + Redis",
                  "redis-sqlite": "SQLite + Redis"}  # fmt: skip
        arms = []
        for config in configs:
            if config == "ref":
                arms.append(reference_arm(args, work))
                continue
            kind, processes = config.rstrip("0123456789"), int(config[-1])
            arm = QueueArm(args, work, kind, processes, servers)
            plural = "es" if processes > 1 else ""
            arms.append(
                Arm(f"{labels[kind]}, {processes} run_huey process{plural}",
                    arm.run, arm.before)
            )  # fmt: skip
        runs = interleave(arms, args.rounds)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    notes = []
    for name, arm_runs in runs.items():
        mid = len(arm_runs) // 2
        per_job = sorted(r.cpu for r in arm_runs)[mid] / args.jobs * 1e3
        line = f"{name}: {per_job:.1f} ms CPU per job"
        if "server_cpu" in arm_runs[0].extra:
            server = sorted(r.extra["server_cpu"] for r in arm_runs)[mid]
            line += f", servers (PostgreSQL/Redis) {server / args.jobs * 1e3:.1f} ms"
        if "whole_wall" in arm_runs[0].extra:
            whole = sorted(r.extra["whole_wall"] for r in arm_runs)[mid]
            line += f"; whole process with Django start {whole:.2f} s"
        notes.append(line)
    threads = args.threads or 4
    report(
        f"{args.jobs} one-instance jobs to a Folder target ({threads} threads per "
        "run_huey process; time from the first enqueue to the last job done)",
        runs,
        reference=arms[0].name,
        unit=("jobs/s", args.jobs),
        json_path=args.json,
        notes=notes,
    )


if __name__ == "__main__":
    main()
