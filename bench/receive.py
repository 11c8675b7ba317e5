"""Receiving: Courier's receiver beside dcmtk's storescp, and Courier in the middle.

SUPERSEDED by bench/cmd_receive.py (interleaved whole processes with CPU and peak RSS);
kept for the figures the README quotes from it.

    .venv/bin/python bench/receive.py [--runs 3] [--count 2000] [--quiet 2]

1. Receive throughput: dcmtk `storescu` (TCP_NODELAY=1, one association) sends a
   series of `--count` ~39 KB CT instances to
   - dcmtk `storescp` (the reference receiver, writing files, no fsync), and to
   - Courier's receiver (`manage.py receive` in a throw-away site: SQLite, spool on
     the same disk; every instance fsynced, file and directory, before its success
     status, and the series bookkept in the database).
   Wall time of the storescu command; instances/s and the ratio.
2. End to end, time until Orthanc has stored the last instance:
   - modality → Orthanc: storescu straight to Orthanc;
   - modality → Courier → Orthanc: storescu to Courier's receiver; the series is
     complete after the quiet period (`--quiet` s, set low for the bench; the default
     is 60 s), routed by a rule to a DICOM target, sent by a `run_huey` worker.
     Printed with and without the quiet period (which is a setting, not work).
Medians of `--runs`; receivers and Orthanc are emptied between runs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.dicomgen import make_series  # noqa: E402
from tests.fixtures.dispatch_peers import CourierSite  # noqa: E402
from tests.fixtures.receive_peers import ReceiverProcess  # noqa: E402
from tests.peers import DCMTK_ENV, Orthanc, StoreSCP  # noqa: E402


def storescu(port: int, folder: Path, called: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", called, "+sd", "127.0.0.1",
         str(port), str(folder)],
        env=DCMTK_ENV, check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - start


def wait_until(condition, timeout: float = 600, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    raise RuntimeError("timed out")


def clear_spool(site: CourierSite) -> None:
    incoming = site.spool / "incoming"
    if incoming.exists():
        shutil.rmtree(incoming)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--quiet", type=float, default=2.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="courier-bench-receive-"))
    series = make_series(work / "series", args.count)
    mb = series.total_bytes / 1e6
    print(f"series: {args.count} instances, {mb:.1f} MB; {args.runs} runs each")

    # -- 1. receive throughput --------------------------------------------------------
    site = CourierSite(
        work / "site",
        env={"COURIER_SERIES_QUIET_SECONDS": "3600", "COURIER_MIN_FREE_BYTES": "0",
             "LOG_LEVEL": "WARNING"},
    ).migrate()  # fmt: skip
    scp = StoreSCP(work / "storescp").start()
    rx = ReceiverProcess(site).start()
    ref, courier = [], []
    try:
        for _ in range(args.runs):
            scp.clear()
            ref.append(storescu(scp.port, series.folder, "STORESCP"))
            assert len(scp.files()) == args.count
            courier.append(storescu(rx.port, series.folder, "COURIER"))
            stored = list((site.spool / "incoming").glob("*/*.dcm"))
            assert len(stored) == args.count, len(stored)
            rx.stop()
            clear_spool(site)
            site.query("DELETE FROM dispatch_receivedseries")
            rx = ReceiverProcess(site, port=rx.port).start()
    finally:
        rx.stop()
        scp.stop()
    r, c = statistics.median(ref), statistics.median(courier)
    print("\n1. receive: storescu -> receiver, one association")
    print(f"  {'receiver':<34} {'median s':>9} {'inst/s':>8} {'MB/s':>7}  runs")
    for name, runs, m in (("dcmtk storescp (no fsync)", ref, r),
                          ("Courier receiver (fsync + DB)", courier, c)):  # fmt: skip
        print(f"  {name:<34} {m:>9.2f} {args.count / m:>8.0f} {mb / m:>7.1f}  "
              f"{' '.join(f'{x:.2f}' for x in runs)}")  # fmt: skip
    print(f"  Courier / storescp throughput: {r / c:.2f}x")

    # -- 2. end to end ------------------------------------------------------------------
    orthanc = Orthanc(work / "orthanc").start()
    e2e = CourierSite(
        work / "e2e",
        env={"COURIER_SERIES_QUIET_SECONDS": str(args.quiet),
             "COURIER_MIN_FREE_BYTES": "0", "LOG_LEVEL": "WARNING"},
    ).migrate()  # fmt: skip
    target_id = e2e.add_target(
        name="orthanc", kind="dicom", host="127.0.0.1", port=orthanc.dicom_port,
        called_aet="ORTHANC", pass_calling_aet=True,
    )  # fmt: skip
    e2e.python(
        "from dispatch.routing.models import Rule\n"
        "r = Rule.objects.create(name='all')\n"
        f"r.targets.set([{target_id}])\nprint(1)\n"
    )
    direct, through = [], []
    rx = ReceiverProcess(e2e).start()
    e2e.start_worker()
    try:
        for _ in range(args.runs):
            orthanc.clear()
            start = time.perf_counter()
            storescu(orthanc.dicom_port, series.folder, "ORTHANC")
            wait_until(lambda: orthanc.count_instances() >= args.count)
            direct.append(time.perf_counter() - start)
            orthanc.clear()
            start = time.perf_counter()
            storescu(rx.port, series.folder, "ORTHANC")
            wait_until(lambda: orthanc.count_instances() >= args.count, step=0.1)
            through.append(time.perf_counter() - start)
    finally:
        rx.stop()
        e2e.close()
        orthanc.stop()
    d, t = statistics.median(direct), statistics.median(through)
    print("\n2. end to end: until Orthanc stored the last instance")
    print(f"  {'path':<44} {'median s':>9}  runs")
    print(f"  {'modality -> Orthanc':<44} {d:>9.2f}  "
          f"{' '.join(f'{x:.2f}' for x in direct)}")  # fmt: skip
    print(f"  {'modality -> Courier -> Orthanc':<44} {t:>9.2f}  "
          f"{' '.join(f'{x:.2f}' for x in through)}")  # fmt: skip
    print(f"  {'  the same without the quiet period':<44} {t - args.quiet:>9.2f}")
    print(
        f"  Courier in the middle / direct: {t / d:.2f}x "
        f"({(t - args.quiet) / d:.2f}x without the {args.quiet:g} s quiet period)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
