"""Retrieval speed: a series pulled from Orthanc by WADO-RS and by C-GET.

INNER FIGURES (the second line): Courier is timed inside its process around
the retrieval call (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from the bench/cmd_*.py scripts (bench/README.md).

Courier's DICOMweb source (WADO-RS streamed to disk part by part) and DICOM source
(C-GET, one association), beside dicomweb-client's `retrieve_series` (the whole
series in memory, as mercure's query tool uses it) and dcmtk's `getscu`. mercure
also sleeps 0.5 s per image, which caps it at 2 instances/s whatever the protocol.

    .venv/bin/python bench/retrieve.py               # 500 instances of 39 KB
    .venv/bin/python bench/retrieve.py --count 100 --runs 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3, help="Median of this many runs.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-retrieve-bench-"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["COURIER_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("LOG_LEVEL", "ERROR")
    import django

    django.setup()
    from dicomweb_client import DICOMwebClient

    from targets.kinds.dicom.query import DicomQuery
    from targets.kinds.dicomweb.query import DicomWebQuery
    from targets.models import DicomTarget, DicomWebTarget
    from targets.query import RetrieveRequest
    from tests.dicomgen import make_series
    from tests.peers import DCMTK_ENV, Orthanc

    series = make_series(work / "series", args.count)
    size_mb = series.total_bytes / 1e6
    with Orthanc(work / "orthanc") as orthanc:
        subprocess.run(
            [
                "storescu",
                "-aec",
                orthanc.aet,
                "127.0.0.1",
                str(orthanc.dicom_port),
                "+sd",
                str(series.folder),
            ],
            check=True,
            env=DCMTK_ENV,
        )
        assert orthanc.count_instances() == args.count
        request = RetrieveRequest(series.study_uid, [series.series_uid])
        dicom = DicomQuery(
            DicomTarget(
                name="b",
                host="127.0.0.1",
                port=orthanc.dicom_port,
                called_aet=orthanc.aet,
                calling_aet="COURIER",
                max_pdu=0,
            )
        )
        web = DicomWebQuery(DicomWebTarget(name="b", url=orthanc.dicomweb_url))

        def courier(source):
            def run(out: Path) -> int:
                return source.retrieve(request, out, lambda *a: None).completed

            return run

        def dwc(out: Path) -> int:
            client = DICOMwebClient(url=orthanc.dicomweb_url)
            datasets = client.retrieve_series(series.study_uid, series.series_uid)
            out.mkdir(parents=True, exist_ok=True)
            for ds in datasets:
                ds.save_as(out / f"{ds.SOPInstanceUID}.dcm")
            return len(datasets)

        def getscu(out: Path) -> int:
            out.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    "getscu",
                    "-S",
                    "-aec",
                    orthanc.aet,
                    "-od",
                    str(out),
                    "-k",
                    "QueryRetrieveLevel=SERIES",
                    "-k",
                    f"StudyInstanceUID={series.study_uid}",
                    "-k",
                    f"SeriesInstanceUID={series.series_uid}",
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                ],
                check=True,
                env=DCMTK_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return sum(1 for _ in out.rglob("*") if _.is_file())

        ways = [
            ("Courier WADO-RS (streamed to disk)", courier(web)),
            ("dicomweb-client retrieve_series (in memory), then saved", dwc),
            ("Courier C-GET", courier(dicom)),
            ("dcmtk getscu C-GET", getscu),
        ]
        print(
            f"\n{args.count} instances, {size_mb:.1f} MB, Orthanc "
            f"on loopback, median of {args.runs}\n"
        )
        print("| way | s | instances/s |")
        print("|---|---|---|")
        for name, fn in ways:
            times = []
            for run in range(args.runs):
                out = work / "out" / f"{len(times)}-{run}"
                start = time.perf_counter()
                got = fn(out)
                times.append(time.perf_counter() - start)
                assert got == args.count, (name, got)
                shutil.rmtree(work / "out")
            t = statistics.median(times)
            print(f"| {name} | {t:.2f} | {args.count / t:,.0f} |")
        print(f"| mercure (0.5 s sleep per image) | {args.count * 0.5:.0f} | 2 |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
