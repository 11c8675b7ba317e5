"""SFTP and rsync speed: Courier's SftpHandler and RsyncHandler beside plain
`rsync -e ssh` and OpenSSH's `sftp -b`, to a real sshd on loopback.

INNER FIGURES (the second line): Courier is timed inside its process around
handler.send() (interpreter start, Django and the job bookkeeping excluded); the
whole-process figures users see come from the bench/cmd_*.py scripts (bench/README.md).

    sudo .venv/bin/python bench/ssh_send.py [--runs 3] [--count 500] [--size 512]

Needs root (the sshd peer creates its test users with useradd). Generates one series
(500 x ~39 KB by default), starts sshd on a free port with key login, and sends the
series several times with each method, each run into a fresh folder. Courier is timed
in-process around `handler.send()`; the command-line tools are timed as whole commands
(their start-up is a few ms). Every method checks the pinned host key and logs in with
the same ed25519 key. Prints medians, files/s and ratios.
"""

from __future__ import annotations

import argparse
import os
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

from targets.models import RsyncTarget, SftpTarget  # noqa: E402
from targets.series import Series, scan_folder  # noqa: E402
from targets.ssh import HostKey  # noqa: E402
from tests.dicomgen import make_series  # noqa: E402
from tests.fixtures.ssh_s3_peers import Sshd  # noqa: E402


def pinned(target, peer: Sshd):
    """Fill in the connection and the pinned host key (unsaved: no database)."""
    key = HostKey(*peer.host_key_public())
    target.host, target.port = "127.0.0.1", peer.port
    target.username, target.private_key_path = peer.key_user, str(peer.client_key)
    target.host_key, target.host_key_type, target.host_key_data = (
        key.fingerprint,
        key.key_type,
        key.data,
    )
    return target


def count_files(peer: Sshd, folder: str) -> int:
    return sum(1 for p in (peer.home(peer.key_user) / folder).rglob("*.dcm"))


def check(peer: Sshd, folder: str, expected: int, who: str) -> None:
    found = count_files(peer, folder)
    if found != expected:
        raise SystemExit(f"{who}: {found} files in {folder}, expected {expected}")


def time_courier(peer: Sshd, series: Series, kind: str) -> float:
    folder = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    cls = SftpTarget if kind == "sftp" else RsyncTarget
    target = pinned(cls(name=f"bench {kind}", path=folder), peer)
    start = time.perf_counter()
    result = target.handler.send(series)
    elapsed = time.perf_counter() - start
    if result.sent != len(series):
        raise SystemExit(f"Courier {kind} sent {result.sent} of {len(series)}")
    check(peer, folder, len(series), f"Courier {kind}")
    return elapsed


def ssh_options(peer: Sshd, known_hosts: Path) -> list[str]:
    return [
        "-i", str(peer.client_key), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
    ]  # fmt: skip


def time_rsync(peer: Sshd, folder: Path, count: int, known_hosts: Path) -> float:
    dest = f"bench-rsync-cli-{uuid.uuid4().hex[:8]}"
    ssh = " ".join(["ssh", "-p", str(peer.port), *ssh_options(peer, known_hosts)])
    cmd = [
        "rsync",
        "-a",
        "--mkpath",
        "-e",
        ssh,
        f"{folder}/",
        f"{peer.key_user}@127.0.0.1:{dest}/",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    elapsed = time.perf_counter() - start
    check(peer, dest, count, "rsync -e ssh")
    return elapsed


def time_sftp_batch(
    peer: Sshd, folder: Path, count: int, known_hosts: Path, tmp: Path
) -> float:
    dest = f"bench-sftp-cli-{uuid.uuid4().hex[:8]}"
    batch = tmp / f"{dest}.batch"
    batch.write_text(f"-mkdir {dest}\ncd {dest}\nlcd {folder}\nput *\n")
    cmd = [
        "sftp",
        "-q",
        "-b",
        str(batch),
        "-P",
        str(peer.port),
        *ssh_options(peer, known_hosts),
        f"{peer.key_user}@127.0.0.1",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    check(peer, dest, count, "sftp -b")
    return elapsed


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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="courier-bench-ssh-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "series"
        generated = make_series(folder, args.count, size=args.size)
        series = scan_folder(folder)
        mb = generated.total_bytes / 1e6
        print(f"series: {len(series)} instances, {mb:.1f} MB")
        with Sshd(tmp / "sshd") as peer:
            known_hosts = tmp / "known_hosts"
            key_type, data = peer.host_key_public()
            known_hosts.write_text(f"[127.0.0.1]:{peer.port} {key_type} {data}\n")
            methods = {
                "Courier SFTP": lambda: time_courier(peer, series, "sftp"),
                "sftp -b (OpenSSH)": lambda: time_sftp_batch(
                    peer, folder, len(series), known_hosts, tmp
                ),
                "Courier rsync": lambda: time_courier(peer, series, "rsync"),
                "rsync -a -e ssh": lambda: time_rsync(
                    peer, folder, len(series), known_hosts
                ),
            }
            times: dict[str, list[float]] = {name: [] for name in methods}
            try:
                for _ in range(args.runs):
                    for name, run in methods.items():
                        times[name].append(run())
            finally:
                home = peer.home(peer.key_user)
                for sent in home.glob("bench-*"):
                    subprocess.run(["rm", "-rf", str(sent)], check=False)

    print(f"\n{'method':22} {'median s':>9} {'files/s':>8} {'MB/s':>7}   runs")
    for name, values in times.items():
        med = statistics.median(values)
        print(
            f"{name:22} {med:9.2f} {len(series) / med:8.0f} {mb / med:7.1f}   "
            + ", ".join(f"{v:.2f}" for v in values)
        )
    ratio = statistics.median(times["sftp -b (OpenSSH)"]) / statistics.median(
        times["Courier SFTP"]
    )
    print(f"\nCourier SFTP vs sftp -b: {ratio:.2f}x")
    ratio = statistics.median(times["rsync -a -e ssh"]) / statistics.median(
        times["Courier rsync"]
    )
    print(f"Courier rsync vs rsync -e ssh: {ratio:.2f}x")


if __name__ == "__main__":
    main()
