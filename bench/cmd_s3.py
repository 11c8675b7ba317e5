"""`manage.py send_series` to an S3 target as users run it, beside a boto3 loop.

    .venv/bin/python bench/cmd_s3.py [--rounds 5] [--count 500] [--size 512]
        [--json bench/results.jsonl]

Generates one series (`--count` x ~39 KB CT instances by default, tests/dicomgen.py),
starts SeaweedFS (`weed mini`, loopback, as tests/fixtures/ssh_s3_peers.py does) and
a throw-away Courier site (SQLite) with one S3 target on it. Then interleaved rounds
(the bucket emptied before every run, untimed), each arm a whole process:

- Courier: `manage.py send_series s3 <folder>` (interpreter, Django, the folder
  scan, the job bookkeeping and the uploads);
- reference: a plain script, one boto3 client with its defaults and `upload_file` per
  file in a loop (what mercure does);
- for scale: the same script with 16 threads calling `put_object` on one client
  (what boto3 itself can do in parallel here).

Every run must leave `--count` objects of the right sizes. Beside each run, the CPU
that SeaweedFS used (from /proc), since on 2 cores sender and store share them.
bench/s3_send.py has the second-line, in-process `handler.send()` figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from functools import partial
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
    report,
    run_process,
)

from tests.dicomgen import make_series
from tests.fixtures.dispatch_peers import CourierSite
from tests.fixtures.ssh_s3_peers import SeaweedS3

BUCKET = "bench"

LOOP = r"""
import os, sys
import boto3
from botocore.config import Config
folder, endpoint, key, secret, bucket, threads = sys.argv[1:7]
client = boto3.client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id=key, aws_secret_access_key=secret,
    config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
def key_of(path):
    return "loop/" + os.path.relpath(path, folder)
if threads == "0":
    for path in files:
        client.upload_file(path, bucket, key_of(path))
else:
    from concurrent.futures import ThreadPoolExecutor
    def put(path):
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=key_of(path), Body=f.read())
    with ThreadPoolExecutor(int(threads)) as pool:
        list(pool.map(put, files))
print(len(files))
"""


def empty_bucket(peer: SeaweedS3) -> None:
    client = peer.client()
    keys = list(peer.objects(BUCKET))
    for i in range(0, len(keys), 1000):
        client.delete_objects(
            Bucket=BUCKET,
            Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]},
        )
    if peer.objects(BUCKET):
        raise BenchError("the bucket could not be emptied")


def checked(run, peer: SeaweedS3, sizes: list[int]):
    """Measure `run`, add SeaweedFS's CPU to its extra figures, check the objects."""

    def measure() -> Run:
        meter = ProcessMeter(peer.proc.pid).start()
        result = run()
        store = meter.stop()
        result.extra["store_cpu"] = store.cpu
        got = sorted(peer.objects(BUCKET).values())
        if got != sizes:
            raise BenchError(f"{len(got)} objects in the bucket, expected {len(sizes)}")
        return result

    return measure


def cpu_bound(runs: dict[str, list[Run]], reference: str) -> list[str]:
    """Whether the cores are the limit. On idle cores a run takes at least the CPU
    of the sender and the store spread over every core; the loop, one request at a
    time, at least the two added (each waits for the other). Their quotient is the
    best ratio these cores allow, whatever the load was during the runs."""
    cores = os.cpu_count() or 1

    def cpu(arm: str, spread: int) -> float:
        return statistics.median(
            (r.cpu + r.extra["store_cpu"]) / spread for r in runs[arm]
        )

    loop = cpu(reference, 1)
    notes = [
        f"{reference}: sender + SeaweedFS CPU {loop:.2f} s, one request at a time: "
        f"at least {loop:.2f} s on idle cores"
    ]
    for name in runs:
        if name != reference:
            need = cpu(name, cores)
            notes.append(
                f"{name}: (sender + SeaweedFS CPU) / {cores} cores = {need:.2f} s at "
                f"least: at best {loop / need:.1f}x as fast as the loop on these cores"
            )
    return notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=None, help="512: ~530 KB files")
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    args = parser.parse_args()

    header("send_series to S3 (SeaweedFS) as a whole process vs a boto3 loop")
    work = Path(tempfile.mkdtemp(prefix="courier-bench-s3-"))
    series = make_series(work / "series", args.count, size=args.size)
    sizes = sorted(p.stat().st_size for p in series.files)
    peer = SeaweedS3(work / "seaweedfs").start(timeout=60)
    try:
        peer.create_bucket(BUCKET)
        site = CourierSite(work / "site").migrate()
        site.add_target(
            name="s3", kind="s3", bucket=BUCKET, region="us-east-1",
            endpoint_url=peer.endpoint_url, addressing_style="path",
            access_key_id=peer.admin.access_key, secret_key=peer.admin.secret_key,
        )  # fmt: skip
        loop = [sys.executable, "-c", LOOP, str(series.folder), peer.endpoint_url,
                peer.admin.access_key, peer.admin.secret_key, BUCKET]  # fmt: skip
        clear = partial(empty_bucket, peer)
        arms = [
            Arm("Courier manage.py send_series",
                checked(partial(run_process, manage("send_series", "s3",
                                                    str(series.folder)),
                                env=site.env, cwd=ROOT), peer, sizes), clear),
            Arm("boto3 upload_file loop (reference)",
                checked(partial(run_process, [*loop, "0"]), peer, sizes), clear),
            Arm("boto3 put_object, 16 threads",
                checked(partial(run_process, [*loop, "16"]), peer, sizes), clear),
        ]  # fmt: skip
        mb = series.total_bytes / 1e6
        print(f"\n{args.count} instances, {mb:.1f} MB -> SeaweedFS", flush=True)
        runs = interleave(arms, args.rounds, warmup=args.warmup)
        store = {
            name: sorted(r.extra["store_cpu"] for r in rs) for name, rs in runs.items()
        }
        report(
            f"send {args.count} x ~{mb / args.count * 1000:.0f} KB to S3 "
            "(SeaweedFS on loopback; whole processes)",
            runs,
            reference="boto3 upload_file loop (reference)",
            unit=("obj/s", args.count),
            json_path=args.json,
            notes=[
                *(
                    f"SeaweedFS CPU during {name}, median: "
                    f"{values[len(values) // 2]:.2f} s"
                    for name, values in store.items()
                ),
                *cpu_bound(runs, "boto3 upload_file loop (reference)"),
            ],
        )
    finally:
        peer.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
