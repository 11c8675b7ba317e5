"""The receiver as users run it (`manage.py receive`) beside dcmtk's storescp, and
Courier in the middle of modality -> Orthanc.

    .venv/bin/python bench/cmd_receive.py [--rounds 5] [--count 2000] [--quiet 2]
        [--only receive|e2e] [--mode stream|store] [--before /work/main]
        [--json bench/results.jsonl]

1. Receive: `/usr/bin/storescu +sd` (TCP_NODELAY=1, one association) sends `--count`
   ~39 KB CT instances to, in interleaved rounds,
   - Courier `manage.py receive` (a throw-away SQLite site, its defaults: every
     instance durable before the success status, through the journal (one flush
     each), series bookkept in the database; the quiet period set to an hour so
     nothing is routed; the journal's segments kept from run to run, as a running
     receiver keeps them), and
   - `/usr/bin/storescp` (`-pdu 131072`, writes files, no fsync): the reference.
   The time is storescu's whole process; the CPU column is the receiver's (read from
   /proc around the transfer), the peak RSS the receiver's. Each receiver starts
   fresh and empty before every run (untimed).
2. End to end, until Orthanc holds every instance (polled every 20 ms):
   - modality -> Orthanc: storescu straight to Orthanc;
   - modality -> Courier -> Orthanc: storescu to `manage.py receive`; a rule to a
     DICOM target, sent by a plain `manage.py run_huey` (SqliteHuey, the settings'
     4 threads and huey's polling as users get them). `--mode stream` (default):
     the rule forwards as instances arrive (its job starts with the first
     instance and grows); `--mode store`: the series is complete after the quiet
     period (`--quiet` s; the default setting is 60 s) and routed then.
   The CPU column is every process involved: storescu, Orthanc, and for the second
   arm Courier's receiver and worker (printed apart too). Orthanc emptied per run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import django
from harness import (
    DCMTK,
    DCMTK_ENV,
    ROOT,
    Arm,
    BenchError,
    ProcessMeter,
    Run,
    header,
    interleave,
    manage,
    report,
    run_process,
    start_process,
    stop_process,
    wait_until,
)

# The receiver fixtures import the receiver, which imports models: Django first.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()

from tests.dicomgen import make_series  # noqa: E402
from tests.fixtures.dispatch_peers import CourierSite  # noqa: E402
from tests.fixtures.receive_peers import ReceiverProcess  # noqa: E402
from tests.peers import Orthanc, StoreSCP, port_open  # noqa: E402

UNFINISHED = (
    "SELECT id FROM dispatch_job WHERE state NOT IN "
    "('done', 'failed', 'done-with-warnings')"
)


class DcmtkStoreSCP(StoreSCP):
    def command(self) -> list[str]:
        return [DCMTK["storescp"], *super().command()[1:]]


def storescu(port: int, called: str, folder: Path) -> Run:
    cmd = [DCMTK["storescu"], "-aet", "MODALITY", "-aec", called, "+sd",
           "127.0.0.1", str(port), str(folder)]  # fmt: skip
    return run_process(cmd, env=DCMTK_ENV)


def received_by(meter_pids: list[int], send) -> Run:
    """Time `send()` (a storescu Run); CPU and peak RSS are the receivers'."""
    meter = ProcessMeter(*meter_pids).start()
    sent = send()
    run = meter.stop(sent.wall)
    run.extra["sender_cpu"] = sent.cpu
    return run


class OtherCheckout(ReceiverProcess):
    """`manage.py receive` of another checkout (its own virtualenv), e.g. main's
    code before a change, on the same site."""

    def __init__(self, site, root: Path):
        super().__init__(site)
        self.root = root

    def start(self, timeout: float = 60) -> ReceiverProcess:
        import subprocess

        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.root / ".venv/bin/python"), str(self.root / "manage.py"),
                 "receive", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        wait_until(lambda: port_open(self.port), timeout=timeout)
        return self


class CourierReceiver:
    """A fresh, empty `manage.py receive` before every run."""

    def __init__(self, site: CourierSite, root: Path | None = None):
        self.site = site
        self.root = root
        self.rx: ReceiverProcess | None = None

    def restart(self) -> None:
        if self.rx:
            self.rx.stop()
        incoming = self.site.spool / "incoming"
        # Emptied but for the journal's segments: a running receiver keeps them
        # (made once, 32 MiB of zeros each), so they are not made in a timed run.
        for entry in incoming.iterdir() if incoming.exists() else ():
            if entry.name == ".journal":
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.site.query("DELETE FROM dispatch_receivedseries")
        self.rx = (
            OtherCheckout(self.site, self.root)
            if self.root
            else ReceiverProcess(self.site)
        ).start()

    def stored(self) -> int:
        return len(list((self.site.spool / "incoming").glob("*/*.dcm")))


def receive(args, work: Path, series) -> None:
    n = len(series.files)
    site = CourierSite(
        work / "site", env={"COURIER_SERIES_QUIET_SECONDS": "3600"}
    ).migrate()
    scp = DcmtkStoreSCP(work / "storescp", max_pdu=131072).start()
    courier = CourierReceiver(site)
    before = None
    if args.before:
        before_site = CourierSite(
            work / "before", env={"COURIER_SERIES_QUIET_SECONDS": "3600"}
        ).migrate()
        before = CourierReceiver(before_site, Path(args.before))

    def run_on(receiver: CourierReceiver) -> Run:
        run = received_by(
            [receiver.rx.proc.pid],
            lambda: storescu(receiver.rx.port, "COURIER", series.folder),
        )
        if receiver.stored() != n:
            raise BenchError(f"Courier stored {receiver.stored()} of {n}")
        return run

    def run_courier() -> Run:
        return run_on(courier)

    def run_storescp() -> Run:
        run = received_by(
            [scp.proc.pid], lambda: storescu(scp.port, scp.aet, series.folder)
        )
        if len(scp.files()) != n:
            raise BenchError(f"storescp stored {len(scp.files())} of {n}")
        return run

    def fresh_storescp() -> None:
        nonlocal scp
        scp.stop()
        scp = DcmtkStoreSCP(work / "storescp", max_pdu=131072)
        scp.clear()
        scp.start()

    try:
        arms = [
            Arm("Courier manage.py receive (fsync)", run_courier, courier.restart),
            Arm("dcmtk storescp (no fsync)", run_storescp, fresh_storescp),
        ]
        if before:
            arms.append(
                Arm(
                    f"before: receive of {Path(args.before).name}",
                    lambda: run_on(before),
                    before.restart,
                )  # fmt: skip
            )
        runs = interleave(arms, args.rounds, warmup=args.warmup)
    finally:
        if courier.rx:
            courier.rx.stop()
        if before and before.rx:
            before.rx.stop()
        scp.stop()
    sender = {k: [r.extra["sender_cpu"] for r in v] for k, v in runs.items()}
    report(
        f"receive {n} x ~39 KB from storescu, one association "
        "(time: storescu's process; CPU and RSS: the receiver's)",
        runs,
        reference="dcmtk storescp (no fsync)",
        unit=("inst/s", n),
        json_path=args.json,
        notes=[
            f"storescu's own CPU, median: {name} "
            f"{sorted(values)[len(values) // 2]:.2f} s"
            for name, values in sender.items()
        ],
    )


def end_to_end(args, work: Path, series) -> None:
    n = len(series.files)
    orthanc = Orthanc(work / "orthanc").start()
    site = CourierSite(
        work / "e2e", env={"COURIER_SERIES_QUIET_SECONDS": str(args.quiet)}
    ).migrate()
    target = site.add_target(
        name="orthanc", kind="dicom", host="127.0.0.1", port=orthanc.dicom_port,
        called_aet=orthanc.aet,
    )  # fmt: skip
    stream = args.mode == "stream"
    site.python(
        "from dispatch.routing.models import Rule\n"
        f"r = Rule.objects.create(name='all', stream={stream})\n"
        f"r.targets.set([{target}])\nprint(1)\n"
    )
    rx = ReceiverProcess(site).start()
    worker_log = site.workdir / "run_huey.log"
    worker = start_process(manage("run_huey"), env=site.env, cwd=ROOT, log=worker_log)
    wait_until(
        lambda: "consumer started" in worker_log.read_text(errors="replace").lower(),
        timeout=120,
    )

    def through(pids: list[int], port: int) -> Run:
        meter = ProcessMeter(orthanc.proc.pid, *pids).start()
        courier = ProcessMeter(*pids).start() if pids else None
        start, started_at = time.perf_counter(), time.time()
        sent = storescu(port, orthanc.aet, series.folder)
        wait_until(lambda: orthanc.count_instances() >= n, timeout=900)
        wall = time.perf_counter() - start
        run = meter.stop(wall)
        run.user += sent.user
        run.sys += sent.sys
        run.rss_kb = None  # the peers' and Courier's: not one process's figure
        if courier:
            run.extra["courier_cpu"] = courier.stop().cpu
        run.extra["storescu_wall"] = sent.wall
        if pids:  # let the job finish its bookkeeping before the next run (untimed)
            wait_until(
                lambda: not site.query(UNFINISHED), timeout=120 + args.quiet, step=0.1
            )
            run.extra["phases"] = phases(site, started_at, sent.wall, wall, stream)
        return run

    try:
        arms = [
            Arm("modality -> Courier -> Orthanc",
                lambda: through([rx.proc.pid, worker.pid], rx.port), orthanc.clear),
            Arm("modality -> Orthanc",
                lambda: through([], orthanc.dicom_port), orthanc.clear),
        ]  # fmt: skip
        runs = interleave(arms, args.rounds, warmup=args.warmup)
    finally:
        rx.stop()
        stop_process(worker, signal.SIGINT)
        orthanc.stop()
    via = runs["modality -> Courier -> Orthanc"]
    courier_cpu = sorted(r.extra["courier_cpu"] for r in via)[len(via) // 2]
    minus_quiet = sorted(r.wall - args.quiet for r in via)[len(via) // 2]
    direct = sorted(r.wall for r in runs["modality -> Orthanc"])[len(via) // 2]
    names = STREAM_PHASES if stream else PHASES
    report(
        f"end to end, {n} x ~39 KB until Orthanc holds all (quiet period "
        f"{args.quiet:g} s; the rule "
        + ("forwards as instances arrive" if stream else "waits for the series")
        + "; CPU: every process involved)",
        runs,
        reference="modality -> Orthanc",
        json_path=args.json,
        notes=[
            "middle path, median seconds per phase: "
            + ", ".join(
                f"{name} {sorted(r.extra['phases'][name] for r in via)[len(via) // 2]:.2f}"
                for name in names
            ),
            f"Courier's receiver + worker CPU in the middle path, median: "
            f"{courier_cpu:.2f} s",
        ]
        + (
            []
            if stream
            else [
                f"middle path without the {args.quiet:g} s quiet period, median: "
                f"{minus_quiet:.2f} s ({minus_quiet / direct:.2f}x the direct path)"
            ]
        ),
    )


PHASES = ("receive (storescu)", "quiet period, close, route",
          "routed -> the job's first attempt", "the send (attempt)",
          "attempt end -> Orthanc seen holding all")  # fmt: skip


def _at(value: str) -> float:
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


STREAM_PHASES = ("receive (storescu)", "start -> first send starts",
                 "storescu end -> Orthanc holds all (tail)",
                 "start -> job done (quiet period, close)", "attempts")  # fmt: skip


def phases(
    site: CourierSite, started: float, storescu_wall: float, wall: float, stream: bool
):
    """Where the middle path's time went, from the database's timestamps (s)."""
    if stream:
        ((begun, ended, count),) = site.query(
            "SELECT MIN(a.started_at), MAX(a.ended_at), COUNT(*) FROM "
            "dispatch_attempt a WHERE a.job_id = (SELECT MAX(id) FROM dispatch_job)"
        )
        values = (storescu_wall, _at(begun) - started, wall - storescu_wall,
                  _at(ended) - started, count)  # fmt: skip
        return dict(zip(STREAM_PHASES, values, strict=True))
    ((routed,),) = site.query(
        "SELECT routed_at FROM dispatch_receivedseries ORDER BY id DESC LIMIT 1"
    )
    ((begun, ended),) = site.query(
        "SELECT MIN(a.started_at), MAX(a.ended_at) FROM dispatch_attempt a "
        "WHERE a.job_id = (SELECT MAX(id) FROM dispatch_job)"
    )
    points = [started, started + storescu_wall, _at(routed), _at(begun), _at(ended),
              started + wall]  # fmt: skip
    return {name: points[i + 1] - points[i] for i, name in enumerate(PHASES)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--only", default="", help="receive or e2e")
    parser.add_argument(
        "--mode",
        default="stream",
        choices=["stream", "store"],
        help="e2e: the rule forwards as instances arrive (stream) or waits for the "
        "complete series (store)",
    )
    parser.add_argument(
        "--before",
        help="another checkout (with its .venv) whose receiver runs as a third arm",
    )
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    args = parser.parse_args()
    header("the receiver as a process vs storescp; Courier in the middle")
    work = Path(tempfile.mkdtemp(prefix="courier-bench-receive-"))
    try:
        series = make_series(work / "series", args.count)
        if args.only in ("", "receive"):
            receive(args, work, series)
        if args.only in ("", "e2e"):
            end_to_end(args, work, series)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
