"""STOW-RS to Orthanc: Courier's DICOMweb sender beside dicomweb-client's one-call send.

INNER FIGURES (the second line): Courier is timed inside its process around
the read and send (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from the bench/cmd_*.py scripts (bench/README.md).

    .venv/bin/python bench/dicomweb_send.py [--runs 3] [--count 500]

Generates 500 x ~39 KB and 500 x ~530 KB instances and starts Orthanc 1.10 with its
DICOMweb plugin and HTTP basic auth on (loopback). Each run is a fresh Python
process, so that its peak RSS (`VmHWM` of /proc/self/status) is its own:

- Courier: `scan_folder()` then `DicomWebHandler.send()` (50 instances per request,
  bodies streamed from the files), with one and with two requests at once;
- dicomweb-client: every file `dcmread` into memory, then one
  `store_instances(datasets)` call for the whole series (what mercure does).

The time is measured inside each process from the first file read to the last
response (interpreter start and imports excluded, alike for both); Orthanc is emptied
between runs. Prints medians: instances/s, MB/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.dicomgen import make_series  # noqa: E402
from tests.peers import Orthanc  # noqa: E402

USERS = {"alice": "s3cret"}

# Each process's own peak: ru_maxrss would include the parent's (Linux keeps the
# high-water mark across the vfork+exec of subprocess).
PEAK = """
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

COURIER = (
    PEAK
    + """
import json, os, sys, time
import django
django.setup()
from targets.models import DicomWebTarget
from targets.series import scan_folder
folder, url, connections = sys.argv[1:4]
password = os.environ["DICOMWEB_PASSWORD"]
target = DicomWebTarget(name="bench", url=url, auth="basic", username="alice",
                        password=password, stow_batch_size=50,
                        max_connections=int(connections))
handler = target.handler
start = time.perf_counter()
series = scan_folder(folder)
result = handler.send(series)
elapsed = time.perf_counter() - start
assert result.sent == len(series) and not result.failed, (result.sent, result.failed)
print(json.dumps({"seconds": elapsed, "count": len(series),
                  "peak_kb": peak_kb()}))
"""
)

DICOMWEB_CLIENT = (
    PEAK
    + """
import json, os, sys, time
from pathlib import Path
import pydicom
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
folder, url = sys.argv[1:3]
password = os.environ["DICOMWEB_PASSWORD"]
client = DICOMwebClient(url, session=create_session_from_user_pass("alice", password))
start = time.perf_counter()
datasets = [pydicom.dcmread(p) for p in sorted(Path(folder).rglob("*.dcm"))]
response = client.store_instances(datasets)
elapsed = time.perf_counter() - start
stored = len(response.ReferencedSOPSequence)
assert stored == len(datasets), stored
print(json.dumps({"seconds": elapsed, "count": len(datasets),
                  "peak_kb": peak_kb()}))
"""
)


def run(script: str, folder: Path, url: str, data_dir: Path, *extra: str) -> dict:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "COURIER_DATA_DIR": str(data_dir),
        # The environment, not argv: argv is visible to every user in `ps`.
        "DICOMWEB_PASSWORD": USERS["alice"],
    }
    proc = subprocess.run(
        [sys.executable, "-c", script, str(folder), url, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="courier-bench-"))
    print(f"generating 2 x {args.count} instances in {work} ...")
    series = {
        "small (~39 KB)": make_series(work / "small", args.count),
        "large (~530 KB)": make_series(work / "large", args.count, size=512),
    }
    with Orthanc(work / "orthanc", users=USERS) as orthanc:
        for label, gen in series.items():
            size = gen.total_bytes
            print(f"\n{label}: {len(gen.files)} instances, {size / 1e6:.1f} MB")
            for name, script, extra in (
                ("Courier, 1 connection", COURIER, ["1"]),
                ("Courier, 2 connections", COURIER, ["2"]),
                ("dicomweb-client, 1 call", DICOMWEB_CLIENT, []),
            ):
                figures = []
                for _ in range(args.runs):
                    orthanc.clear()
                    figures.append(
                        run(
                            script,
                            gen.folder,
                            orthanc.dicomweb_url,
                            work / "data",
                            *extra,
                        )
                    )
                seconds = statistics.median(f["seconds"] for f in figures)
                peak = statistics.median(f["peak_kb"] for f in figures) / 1024
                print(
                    f"  {name:24} {seconds:6.2f} s  {len(gen.files) / seconds:6.0f} "
                    f"inst/s  {size / seconds / 1e6:6.1f} MB/s  peak RSS {peak:5.0f} MB"
                    "   runs " + " ".join(f"{f['seconds']:.2f}" for f in figures)
                )
            orthanc.clear()


if __name__ == "__main__":
    main()
