"""C-STORE speed on one association: Courier's DicomHandler beside dcmtk's storescu.

INNER FIGURES (the second line): Courier is timed inside its process around
handler.send() (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from bench/cmd_send.py (bench/README.md).

    .venv/bin/python bench/send_dicom.py [--runs 3] [--count 500]

Generates 500 x ~39 KB and 500 x ~530 KB instances, starts dcmtk storescp
(`-pdu 131072`, TCP_NODELAY=1) on loopback, and sends each series several times with
both senders, the receiver emptied between runs. Courier is timed in-process around
`handler.send()` only (the folder scan is printed apart); storescu is timed as a whole
command, so its figure includes process start and its own folder scan (a few ms of
start-up; Courier's ~0.3 s interpreter start is not in its figure). Prints medians.

Also the helpers for bench/parallel_dicom.py and bench/latency_proxy.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from targets.models import DicomTarget  # noqa: E402
from targets.series import Series, scan_folder  # noqa: E402
from tests.dicomgen import make_series  # noqa: E402
from tests.peers import DCMTK_ENV, StoreSCP  # noqa: E402


def dicom_target(port: int, aet: str, associations: int = 1) -> DicomTarget:
    """An unsaved DICOM target (no database needed) for 127.0.0.1:port."""
    return DicomTarget(
        name="bench",
        host="127.0.0.1",
        port=port,
        called_aet=aet,
        calling_aet="COURIER",
        max_connections=associations,
        dimse_timeout=30.0,
    )


def time_courier(target: DicomTarget, series: Series) -> float:
    start = time.perf_counter()
    result = target.handler.send(series)
    elapsed = time.perf_counter() - start
    if result.sent != len(series) or result.failed:
        raise SystemExit(
            f"Courier sent {result.sent} of {len(series)}: "
            f"{result.failed} failed; {result.notes}"
        )
    for note in result.notes:  # a stalled association that was resumed
        print(f"    note: {note}")
    return elapsed


def time_storescu(
    port: int, aet: str, folder: Path, extra: list[str] | None = None
) -> float:
    cmd = [
        "storescu",
        "-aet",
        "STORESCU",
        "-aec",
        aet,
        *(extra or []),
        "127.0.0.1",
        str(port),
        "+sd",
        str(folder),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, env=DCMTK_ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def rates(seconds: float, series: Series) -> str:
    return (
        f"{seconds:7.3f} s  {len(series) / seconds:7.0f} inst/s  "
        f"{series.total_bytes / seconds / 1e6:6.1f} MB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-bench-"))
    print(f"generating 2 x {args.count} instances in {work} ...")
    print(
        "Courier is timed in-process around handler.send() (its ~0.3 s interpreter "
        "start excluded);\nstorescu as a whole command (process start and its folder "
        "scan included)."
    )
    folders = {
        "small (~39 KB)": make_series(work / "small", args.count).folder,
        "large (~530 KB)": make_series(work / "large", args.count, size=512).folder,
    }
    with StoreSCP(work / "storescp", max_pdu=131072) as scp:
        target = dicom_target(scp.port, scp.aet)
        for label, folder in folders.items():
            start = time.perf_counter()
            series = scan_folder(folder)
            scan = time.perf_counter() - start
            print(
                f"\n{label}: {len(series)} instances, "
                f"{series.total_bytes / 1e6:.1f} MB (Courier's folder scan "
                f"{scan:.2f} s, not in its figure)"
            )
            courier, storescu = [], []
            for _ in range(args.runs):
                scp.clear()
                courier.append(time_courier(target, series))
                scp.clear()
                storescu.append(time_storescu(scp.port, scp.aet, folder))
            c, s = statistics.median(courier), statistics.median(storescu)
            print(
                f"  Courier   {rates(c, series)}   runs "
                + " ".join(f"{x:.2f}" for x in courier)
            )
            print(
                f"  storescu  {rates(s, series)}   runs "
                + " ".join(f"{x:.2f}" for x in storescu)
            )
            print(f"  ratio Courier / storescu (throughput): {s / c:.2f}x")
        scp.clear()


if __name__ == "__main__":
    main()
