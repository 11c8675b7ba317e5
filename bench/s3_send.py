"""S3 upload speed: Courier's S3Handler beside a sequential `upload_file` loop (what
mercure does) and the AWS CLI's `s3 cp --recursive`, to SeaweedFS on loopback.

INNER FIGURES (the second line): Courier is timed inside its process around
handler.send() (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from the bench/cmd_*.py scripts (bench/README.md).

    .venv/bin/python bench/s3_send.py [--runs 3] [--count 500] [--size 512]

Generates one series (500 x ~39 KB by default), starts `weed mini` (loopback only,
telemetry off), and uploads it several times with each method, each run into a fresh
prefix. Courier and the loop are timed in-process (one boto3 client each, built
before the clock starts); the AWS CLI is timed as a whole command, so its figure
includes its ~1 s start-up (printed apart when measurable). The CLI is used only if
`aws` is on the PATH (PyPI package `awscli`). Prints medians, objects/s and ratios.

`--delay-ms N` puts bench/latency_proxy.py (its own process) between the senders and
SeaweedFS, holding every chunk N ms each way: a cloud endpoint's round trip instead of
loopback's, where a sequential loop waits one round trip per object.
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
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from targets.models import S3Target  # noqa: E402
from targets.series import Series, scan_folder  # noqa: E402
from tests.dicomgen import make_series  # noqa: E402
from tests.fixtures.ssh_s3_peers import SeaweedS3  # noqa: E402
from tests.peers import free_port, port_open  # noqa: E402

BUCKET = "bench"


def s3_target(peer: SeaweedS3, prefix: str) -> S3Target:
    """An unsaved S3 target (no database needed) for the SeaweedFS peer."""
    return S3Target(
        name="bench",
        bucket=BUCKET,
        region="us-east-1",
        prefix=prefix,
        endpoint_url=getattr(peer, "via", peer.endpoint_url),
        addressing_style="path",
        access_key_id=peer.admin.access_key,
        secret_key=peer.admin.secret_key,
    )


def check_count(peer: SeaweedS3, prefix: str, expected: int, who: str) -> None:
    found = len(peer.objects(BUCKET, prefix + "/"))
    if found != expected:
        raise SystemExit(f"{who}: {found} objects under {prefix}, expected {expected}")


def time_courier(peer: SeaweedS3, series: Series) -> float:
    prefix = f"courier-{uuid.uuid4().hex[:8]}"
    handler = s3_target(peer, prefix).handler
    start = time.perf_counter()
    result = handler.send(series)
    elapsed = time.perf_counter() - start
    if result.sent != len(series):
        raise SystemExit(f"Courier sent {result.sent} of {len(series)}: {result.notes}")
    check_count(peer, prefix, len(series), "Courier")
    return elapsed


def time_upload_file_loop(peer: SeaweedS3, series: Series) -> float:
    import boto3
    from botocore.config import Config

    prefix = f"loop-{uuid.uuid4().hex[:8]}"
    # What mercure does: one client with the defaults, upload_file per file.
    client = boto3.client(
        "s3",
        endpoint_url=getattr(peer, "via", peer.endpoint_url),
        region_name="us-east-1",
        aws_access_key_id=peer.admin.access_key,
        aws_secret_access_key=peer.admin.secret_key,
        config=Config(s3={"addressing_style": "path"}),
    )
    start = time.perf_counter()
    for inst in series.instances:
        client.upload_file(str(inst.path), BUCKET, f"{prefix}/{inst.path.name}")
    elapsed = time.perf_counter() - start
    check_count(peer, prefix, len(series), "upload_file loop")
    return elapsed


def time_aws_cli(peer: SeaweedS3, folder: Path, count: int, aws: str) -> float:
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": peer.admin.access_key,
        "AWS_SECRET_ACCESS_KEY": peer.admin.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    cmd = [
        aws,
        "--endpoint-url",
        getattr(peer, "via", peer.endpoint_url),
        "s3",
        "cp",
        "--recursive",
        "--only-show-errors",
        str(folder),
        f"s3://{BUCKET}/{prefix}/",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    elapsed = time.perf_counter() - start
    check_count(peer, prefix, count, "aws s3 cp")
    return elapsed


def cli_start_up(aws: str) -> float:
    start = time.perf_counter()
    subprocess.run([aws, "--version"], capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="pixel size (e.g. 512 for ~530 KB instances)",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="latency added each way by a proxy (0: direct)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="courier-bench-s3-") as tmp:
        folder = Path(tmp) / "series"
        generated = make_series(folder, args.count, size=args.size)
        series = scan_folder(folder)
        mb = generated.total_bytes / 1e6
        print(f"series: {len(series)} instances, {mb:.1f} MB")
        aws = shutil.which("aws")
        with SeaweedS3(Path(tmp) / "seaweedfs") as peer:
            peer.create_bucket(BUCKET)
            proxy = None
            if args.delay_ms:
                port = free_port()
                proxy = subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "latency_proxy.py"),
                        "--serve",
                        str(port),
                        f"127.0.0.1:{peer.ports['s3.port']}",
                        "--delay-ms",
                        str(args.delay_ms),
                    ]
                )
                while not port_open(port):
                    time.sleep(0.05)
                peer.via = f"http://127.0.0.1:{port}"
                print(f"through a proxy adding {args.delay_ms:g} ms each way")
            methods = {
                "Courier S3Handler": lambda: time_courier(peer, series),
                "sequential upload_file loop": lambda: time_upload_file_loop(
                    peer, series
                ),
            }
            if aws:
                methods["aws s3 cp --recursive"] = lambda: time_aws_cli(
                    peer, folder, len(series), aws
                )
            else:
                print("aws not on the PATH: pip install awscli to compare with it")
            times: dict[str, list[float]] = {name: [] for name in methods}
            try:
                for _ in range(args.runs):
                    for name, run in methods.items():
                        times[name].append(run())
            finally:
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait(5)

        baseline = statistics.median(times["sequential upload_file loop"])
        print(
            f"\n{'method':32} {'median s':>9} {'objects/s':>10} {'MB/s':>7} "
            f"{'vs loop':>8}   runs"
        )
        for name, values in times.items():
            med = statistics.median(values)
            print(
                f"{name:32} {med:9.2f} {len(series) / med:10.0f} {mb / med:7.1f} "
                f"{baseline / med:7.2f}x   " + ", ".join(f"{v:.2f}" for v in values)
            )
        if aws:
            print(
                f"\n(aws --version alone takes {cli_start_up(aws):.2f} s: the CLI's "
                "start-up, included in its figure)"
            )


if __name__ == "__main__":
    main()
