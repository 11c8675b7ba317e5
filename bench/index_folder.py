"""Local-folder index: Courier's `FolderIndex` beside dicomweb-client's DICOMfileClient.

INNER FIGURES (the second line): Courier is timed inside its process around
the index calls (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from the bench/cmd_*.py scripts (bench/README.md).

Generates a folder of small instances (default 100,000: patients x 5 studies x 2 series
x 25 instances, 8x8 pixels, written by cloning one encoded series template per series),
then times, on the same folder:

- the first index build and the rescan of the unchanged folder, for Courier and for
  `DICOMfileClient(url="file://...", in_memory=False, update_db=True)` (what mercure
  constructs before every query);
- a query by patient id and by accession number on each (median of 20).

    .venv/bin/python bench/index_folder.py              # 100,000 instances
    .venv/bin/python bench/index_folder.py --count 10000 --keep /tmp/idx-bench
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PER_SERIES, SERIES_PER_STUDY, STUDIES_PER_PATIENT = 25, 2, 5
PER_PATIENT = PER_SERIES * SERIES_PER_STUDY * STUDIES_PER_PATIENT


def generate(folder: Path, count: int) -> int:
    """Write about `count` instances; return how many were written."""
    from pydicom import examples
    from pydicom.uid import generate_uid

    base = copy.deepcopy(examples.ct)
    base.Rows = base.Columns = 8
    base.PixelData = bytes(8 * 8 * 2)
    placeholder = "1.2.826.0.1.3680043.8.498.7.100000000000"
    written = 0
    patients = max(1, count // PER_PATIENT)
    for p in range(patients):
        for s in range(STUDIES_PER_PATIENT):
            study_uid = generate_uid()
            for r in range(SERIES_PER_STUDY):
                ds = copy.copy(base)
                ds.file_meta = copy.deepcopy(base.file_meta)
                ds.PatientID = f"PAT{p:05d}"
                ds.PatientName = f"PATIENT^{p:05d}"
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = generate_uid()
                ds.AccessionNumber = f"A{p:05d}{s}"
                ds.StudyDate = f"20{10 + s:02d}0{1 + r}15"
                ds.StudyDescription = f"STUDY {s}"
                ds.SeriesDescription = f"SERIES {r}"
                ds.SeriesNumber = r + 1
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
                    placeholder
                )
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                template = buf.getvalue()
                out = folder / f"p{p:05d}" / f"s{s}" / f"r{r}"
                out.mkdir(parents=True)
                for i in range(PER_SERIES):
                    uid = f"{placeholder[:-12]}1{written:011d}".encode()
                    (out / f"{i:03d}.dcm").write_bytes(
                        template.replace(placeholder.encode(), uid)
                    )
                    written += 1
    return written


def median_ms(fn, runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument(
        "--keep", help="Generate into (or reuse) this folder and keep it."
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Courier's header-reading processes (default: CPU count).",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-index-bench-"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["COURIER_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("LOG_LEVEL", "ERROR")  # dicomweb-client logs every query
    import django

    django.setup()
    from dicomweb_client import DICOMfileClient

    from targets.kinds.dicomweb.index import FolderIndex
    from targets.kinds.dicomweb.local import LocalFolderQuery
    from targets.models import DicomWebTarget
    from targets.query import Criteria

    folder = Path(args.keep) if args.keep else work / "folder"
    if folder.exists() and any(folder.iterdir()):
        count = sum(1 for _ in folder.rglob("*.dcm"))
        print(f"reusing {count} instances in {folder}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        count = generate(folder, args.count)
        print(
            f"generated {count} instances in {folder} in "
            f"{time.perf_counter() - start:.1f} s"
        )
    # Both indexes outside the folder, so neither reads the other's file.
    courier_db = work / "courier-index.sqlite3"
    dwc_dir = work / "dicomfileclient"
    dwc_dir.mkdir()
    os.system("sync")

    rows = []
    index = FolderIndex(folder, index_path=courier_db)
    start = time.perf_counter()
    report = index.scan(workers=args.workers)
    c_build = time.perf_counter() - start
    assert report.added == count, report
    start = time.perf_counter()
    report = index.scan(workers=args.workers)
    c_rescan = time.perf_counter() - start
    assert report.read == 0

    url = f"file://{folder}"
    start = time.perf_counter()
    client = DICOMfileClient(url=url, in_memory=False, update_db=True, db_dir=dwc_dir)
    d_build = time.perf_counter() - start
    start = time.perf_counter()
    client = DICOMfileClient(url=url, in_memory=False, update_db=True, db_dir=dwc_dir)
    d_rescan = time.perf_counter() - start

    rows.append(("first index build", c_build, d_build))
    rows.append(("rescan, folder unchanged", c_rescan, d_rescan))
    print(f"\n{count} instances, {os.cpu_count()} CPUs\n")
    print("| step | Courier s | files/s | DICOMfileClient s | files/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, c, d in rows:
        print(
            f"| {name} | {c:.2f} | {count / c:,.0f} | {d:.2f} | {count / d:,.0f} | "
            f"{d / c:.1f}x |"
        )

    # Queries: Courier's folder source (no rescan: a fresh index) vs the client.
    source = LocalFolderQuery(DicomWebTarget(name="bench", url=url))
    source.fresh_index = lambda: index  # the timed index, already up to date
    pid, acc = "PAT00007", "A000073"
    q = [
        (
            "studies by PatientID",
            lambda: source.find_studies(Criteria(patient_id=pid), 200),
            lambda: client.search_for_studies(search_filters={"PatientID": pid}),
        ),
        (
            "studies by AccessionNumber",
            lambda: source.find_studies(Criteria(accessions=[acc]), 200),
            lambda: client.search_for_studies(search_filters={"AccessionNumber": acc}),
        ),
        (
            "studies by StudyDescription",
            lambda: source.find_studies(Criteria(study_description="STUDY 3"), 200),
            lambda: client.search_for_studies(
                search_filters={"StudyDescription": "STUDY 3"}
            ),
        ),
    ]
    print(
        "\n| query (median of 20) | Courier ms | results | DICOMfileClient ms | results |"
    )
    print("|---|---|---|---|---|")
    for name, ours, theirs in q:
        n_ours = len(ours().studies)
        n_theirs = len(theirs())
        print(
            f"| {name} | {median_ms(ours):.1f} | {n_ours} | {median_ms(theirs):.1f} | "
            f"{n_theirs} |"
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
