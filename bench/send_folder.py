"""Folder target speed: Courier's FolderHandler beside `cp -r` + `sync -f`.

INNER FIGURES (the second line): Courier is timed inside its process around
handler.send() (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from the bench/cmd_*.py scripts (bench/README.md).

    .venv/bin/python bench/send_folder.py [--runs 5] [--count 500] [--dir /tmp]

Generates 500 x ~39 KB and 500 x ~530 KB instances in a folder under `--dir` (so
source and destination share a file system) and copies each series several times into
fresh destination folders with:

- Courier: `FolderHandler.send()` (hidden temporary folder, every file and folder
  fsynced, renamed into place);
- `cp -r` followed by `sync -f` (the durable shell equivalent);
- a plain `shutil.copy` loop with no fsync and no rename (what mercure's folder target
  does: fast, but a crash can lose images it has reported as delivered, and a consumer
  can see half a series).

Prints medians and the ratio to `cp -r` + `sync -f`.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from targets.kinds.folder.handler import FolderHandler  # noqa: E402
from targets.models import FolderTarget  # noqa: E402
from targets.series import Series, scan_folder  # noqa: E402
from tests.dicomgen import make_series  # noqa: E402


def time_courier(series: Series, dest: Path) -> float:
    dest.mkdir()
    handler = FolderHandler(FolderTarget(name="bench", path=str(dest)))
    start = time.perf_counter()
    result = handler.send(series)
    elapsed = time.perf_counter() - start
    if result.sent != len(series):
        raise SystemExit(f"Courier wrote {result.sent} of {len(series)}")
    return elapsed


def time_cp_sync(src: Path, dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
    subprocess.run(["sync", "-f", str(dest)], check=True)
    return time.perf_counter() - start


def time_plain_copy(series: Series, dest: Path) -> float:
    start = time.perf_counter()
    dest.mkdir()
    for inst in series.instances:
        shutil.copy(inst.path, dest / f"{inst.sop_instance_uid}.dcm")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-bench-folder-", dir=args.dir))
    try:
        for label, size in (("~39 KB", None), ("~530 KB", 512)):
            gen = make_series(work / f"src-{size}", args.count, size=size)
            series = scan_folder(gen.folder)
            mb = series.total_bytes / 1e6
            times: dict[str, list[float]] = {"courier": [], "cp": [], "plain": []}
            for run in range(args.runs):
                times["courier"].append(time_courier(series, work / f"c{size}-{run}"))
                times["cp"].append(time_cp_sync(gen.folder, work / f"p{size}-{run}"))
                times["plain"].append(time_plain_copy(series, work / f"s{size}-{run}"))
                for prefix in ("c", "p", "s"):
                    shutil.rmtree(work / f"{prefix}{size}-{run}")
            print(f"\n{args.count} x {label} ({mb:.0f} MB), medians of {args.runs}:")
            cp = statistics.median(times["cp"])
            for key, name in (
                ("courier", "Courier FolderHandler (fsync, atomic rename)"),
                ("cp", "cp -r + sync -f"),
                ("plain", "shutil.copy loop (no fsync, no rename)"),
            ):
                t = statistics.median(times[key])
                print(
                    f"  {name:46s} {t:6.3f} s  {args.count / t:7.0f} inst/s  "
                    f"{mb / t:6.0f} MB/s  time vs cp+sync {t / cp:4.2f}x"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
