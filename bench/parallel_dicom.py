"""Parallel associations: Courier with 1, 2 and 4 associations beside storescu with one.

INNER FIGURES (the second line): Courier is timed inside its process around
handler.send() (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from bench/cmd_send.py (bench/README.md).

    .venv/bin/python bench/parallel_dicom.py [--runs 2] [--count 2000]

One series of 2,000 ~39 KB instances, sent over loopback to dcmtk storescp (`--fork`,
so it serves several associations at once) and to Orthanc, the receiver emptied
between runs. Timing as in bench/send_dicom.py: Courier around `handler.send()`,
storescu as a whole command. Prints medians and the ratio to storescu.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from send_dicom import dicom_target, rates, time_courier, time_storescu

from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.peers import Orthanc, StoreSCP


def compare(label: str, peer, port: int, aet: str, series, folder, runs: int) -> None:
    print(f"\n{label}: {len(series)} instances, {series.total_bytes / 1e6:.1f} MB")
    # Runs interleaved (storescu, Courier 1, 2, 4, then again) so that the load of
    # this shared machine changing over time hits every sender alike.
    times: dict[int, list[float]] = {0: [], 1: [], 2: [], 4: []}
    for _ in range(runs):
        for n in times:
            peer.clear()
            if n == 0:
                times[0].append(time_storescu(port, aet, folder))
            else:
                times[n].append(time_courier(dicom_target(port, aet, n), series))
    s = statistics.median(times.pop(0))
    print(f"  storescu, 1 association   {rates(s, series)}")
    for n, values in times.items():
        c = statistics.median(values)
        print(
            f"  Courier, {n} association{'s' if n > 1 else ' '}  {rates(c, series)}"
            f"   {s / c:.2f}x storescu"
        )
    peer.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-bench-"))
    print(f"generating {args.count} instances in {work} ...")
    folder = make_series(work / "series", args.count).folder
    series = scan_folder(folder)
    with StoreSCP(work / "storescp", max_pdu=131072, fork=True) as scp:
        compare("storescp --fork", scp, scp.port, scp.aet, series, folder, args.runs)
    with Orthanc(work / "orthanc") as orthanc:
        compare(
            "Orthanc 1.10",
            orthanc,
            orthanc.dicom_port,
            orthanc.aet,
            series,
            folder,
            args.runs,
        )


if __name__ == "__main__":
    main()
