"""`manage.py send_series` as users run it, beside dcmtk's storescu and dcmsend.

    .venv/bin/python bench/cmd_send.py [--rounds 5] [--count 500]
        [--only small|large|storescp|orthanc] [--json bench/results.jsonl]

Generates `--count` small (~39 KB) and `--count` large (~530 KB) CT instances
(tests/dicomgen.py), starts dcmtk storescp (`-pdu 131072`) and Orthanc 1.10 on free
loopback ports (TCP_NODELAY=1 for both, as tests/peers.py does) and a throw-away
Courier site (SQLite, its defaults) with one DICOM target per peer. Then, per series
and peer, in interleaved rounds (Courier, storescu, dcmsend, Courier, ...; the
receiver emptied before every run, untimed):

- Courier: `manage.py send_series <target> <folder>`, a whole process: interpreter
  start, Django, the folder scan, the job bookkeeping and the send;
- `/usr/bin/storescu +sd <folder>` and `/usr/bin/dcmsend --scan-directories <folder>`
  (one association each, the same files, the same peer);
- `--connections N` (default 2; 1 leaves it out): Courier again, to a second target
  for the same peer with N parallel connections (N associations sharing the
  instances; storescp runs with `--fork`, so it serves them at once, as Orthanc does);
- the floor (`bench/replay_floor.py`): the same C-STOREs pre-encoded in memory and
  sent over one association as fast as the peer answers, timed from the association
  request to the release. No sender can take less over one association: the rest
  is the peer's own work and the round trips.

Each is timed as a process (wall, CPU from `wait4`, peak RSS; the floor's wall and
CPU are those of its timed part); the receiver's count
is checked after every run. Ratios are Courier's time over storescu's within each
round. bench/send_dicom.py has the second-line, in-process `handler.send()` figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

from harness import (
    DCMTK,
    DCMTK_ENV,
    ROOT,
    Arm,
    BenchError,
    Run,
    checkout_label,
    header,
    interleave,
    manage,
    report,
    run_process,
)

from tests.dicomgen import make_series
from tests.fixtures.dispatch_peers import CourierSite
from tests.peers import Orthanc, StoreSCP


class DcmtkStoreSCP(StoreSCP):
    """tests/peers.py's storescp, by full path (the venv has a pynetdicom one)."""

    def command(self) -> list[str]:
        return [DCMTK["storescp"], *super().command()[1:]]


def courier_send(
    site: CourierSite, target: str, folder: Path, checkout: str | None = None
) -> Run:
    return run_process(
        manage("send_series", target, str(folder), checkout=checkout),
        env=site.env, cwd=checkout or ROOT,
    )  # fmt: skip


def storescu(port: int, aet: str, folder: Path) -> Run:
    cmd = [DCMTK["storescu"], "-aet", "STORESCU", "-aec", aet,
           "127.0.0.1", str(port), "+sd", str(folder)]  # fmt: skip
    return run_process(cmd, env=DCMTK_ENV)


def dcmsend(port: int, aet: str, folder: Path) -> Run:
    cmd = [DCMTK["dcmsend"], "-aet", "DCMSEND", "-aec", aet,
           "127.0.0.1", str(port), "--scan-directories", str(folder)]  # fmt: skip
    return run_process(cmd, env=DCMTK_ENV)


def floor(port: int, aet: str, folder: Path) -> Run:
    """The pre-encoded replay (bench/replay_floor.py): its timed part only."""
    done = run_process(
        [sys.executable, str(ROOT / "bench" / "replay_floor.py"), "127.0.0.1",
         str(port), aet, str(folder)], cwd=ROOT,
    )  # fmt: skip
    result = json.loads(Path(done.extra["log"]).read_text().strip().splitlines()[-1])
    if result["failed"]:
        raise BenchError(f"the replay had {result['failed']} failed C-STOREs")
    return Run(wall=result["wall"], user=result["cpu"], load=done.load)


def checked(run, count: int, received) -> Run:
    """Wrap a run so that the receiver must hold `count` instances afterwards."""

    def measure() -> Run:
        result = run()
        got = received()
        if got != count:
            raise BenchError(f"the receiver holds {got} instances, not {count}")
        return result

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument(
        "--only", default="", help="small, large, storescp or orthanc: only those"
    )
    parser.add_argument(
        "--connections", type=int, default=2,
        help="also Courier with this many parallel connections (1: not)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", metavar="CHECKOUT",
        help="also run the command from this checkout (its own .venv, the same "
        "database schema): before and after in one interleaved run",
    )  # fmt: skip
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    args = parser.parse_args()
    # Courier's processes as an installation runs them: with its modules' bytecode
    # cached (pip compiles site-packages; a checkout writes __pycache__ on its first
    # run). A shell with PYTHONDONTWRITEBYTECODE=1 would otherwise have every one of
    # Courier's modules compiled from source in every process (~0.1 s of start-up).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    header("send_series as a whole process vs storescu / dcmsend")
    work = Path(tempfile.mkdtemp(prefix="courier-bench-send-"))
    print(f"generating 2 x {args.count} instances in {work} ...", flush=True)
    sizes = {
        "small (~39 KB)": make_series(work / "small", args.count),
        "large (~530 KB)": make_series(work / "large", args.count, size=512),
    }
    site = CourierSite(work / "site").migrate()
    # --fork: one process per association, so the parallel arm gets them at once.
    scp = DcmtkStoreSCP(work / "storescp", max_pdu=131072, fork=True).start()
    orthanc = Orthanc(work / "orthanc").start()
    try:
        peers = {
            "storescp": (scp, scp.port, scp.aet, lambda: len(scp.files())),
            "orthanc": (orthanc, orthanc.dicom_port, orthanc.aet,
                        orthanc.count_instances),
        }  # fmt: skip
        for name, (_, port, aet, _) in peers.items():
            site.add_target(
                name=name, kind="dicom", host="127.0.0.1", port=port, called_aet=aet
            )
            if args.connections > 1:
                site.add_target(
                    name=f"{name}-parallel", kind="dicom", host="127.0.0.1",
                    port=port, called_aet=aet, max_connections=args.connections,
                )  # fmt: skip
        for peer_name, (peer, port, aet, received) in peers.items():
            for size, series in sizes.items():
                if args.only and args.only not in (peer_name, size.split()[0]):
                    continue
                folder, n = series.folder, len(series.files)
                mb = series.total_bytes / 1e6
                print(f"\n{size} x {n} ({mb:.0f} MB) -> {peer_name}", flush=True)
                arms = [
                    Arm("Courier manage.py send_series",
                        checked(partial(courier_send, site, peer_name, folder),
                                n, received), peer.clear),
                    Arm("dcmtk storescu",
                        checked(partial(storescu, port, aet, folder), n, received),
                        peer.clear),
                    Arm("dcmtk dcmsend",
                        checked(partial(dcmsend, port, aet, folder), n, received),
                        peer.clear),
                    Arm("floor: pre-encoded replay, 1 association",
                        checked(partial(floor, port, aet, folder), n, received),
                        peer.clear),
                ]  # fmt: skip
                if args.baseline:
                    arms.insert(1, Arm(
                        f"baseline ({checkout_label(args.baseline)}) send_series",
                        checked(partial(courier_send, site, peer_name, folder,
                                        args.baseline), n, received),
                        peer.clear))  # fmt: skip
                if args.connections > 1:
                    arms.insert(1, Arm(
                        f"Courier send_series, {args.connections} connections",
                        checked(partial(courier_send, site, f"{peer_name}-parallel",
                                        folder), n, received), peer.clear))  # fmt: skip
                runs = interleave(arms, args.rounds, warmup=args.warmup)
                report(
                    f"send {n} x {size} to {peer_name} (whole processes)",
                    runs,
                    reference="dcmtk storescu",
                    unit=("inst/s", n),
                    json_path=args.json,
                )
    finally:
        orthanc.stop()
        scp.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
