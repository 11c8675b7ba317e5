"""Start-up: `send_series` of one instance beside storescu of one, and import costs.

    .venv/bin/python bench/cmd_startup.py [--rounds 10] [--importtime-runs 5]
        [--top 15] [--json bench/results.jsonl]

1. One ~39 KB CT instance to dcmtk storescp (free loopback port, TCP_NODELAY=1),
   interleaved rounds of whole processes (wall, CPU, peak RSS):
   - Courier `manage.py send_series <target> <folder of one file>` (SQLite site);
   - `/usr/bin/storescu` of the same file (the reference);
   - for scale: `manage.py send_series --help` (interpreter, Django and the command's
     imports, nothing sent), `django.setup()` alone (what any manage.py command pays
     first) and `python -c pass` (the interpreter alone).
   This is what a script calling Courier once per series pays per call.
2. `python -X importtime manage.py send_series ...` of the one instance, and of
   `--help`, `--importtime-runs` times each: median import time per top-level package
   (self time summed over its modules), the slowest top-level imports (cumulative),
   and the chain that pulls in numpy, if any.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
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
    save,
)

from tests.dicomgen import make_series
from tests.fixtures.dispatch_peers import CourierSite
from tests.peers import StoreSCP

# What every manage.py command pays before its own code: Courier's settings, every
# installed app (models, ready(), huey with redis-py; the admin's pages load with the
# URLconf since issue 15), no command.
SETUP = (
    "import os, django; "
    "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings'); "
    "django.setup()"
)

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")


class DcmtkStoreSCP(StoreSCP):
    def command(self) -> list[str]:
        return [DCMTK["storescp"], *super().command()[1:]]


def parse_importtime(stderr: str) -> list[tuple[int, int, int, str]]:
    """(self µs, cumulative µs, depth, module) per line of -X importtime output."""
    rows = []
    for line in stderr.splitlines():
        m = LINE.match(line)
        if m:
            depth = len(m.group(3)) // 2
            rows.append((int(m.group(1)), int(m.group(2)), depth, m.group(4)))
    return rows


def chain_to(rows: list[tuple[int, int, int, str]], module: str) -> list[str]:
    """The import chain that first imported `module` (outermost first).

    importtime prints a module after everything it imported, one level deeper, so a
    module's importer is the next line one level up.
    """
    for i, (_, _, depth, name) in enumerate(rows):
        if name == module:
            chain, want = [name], depth - 1
            for _, _, d, n in rows[i + 1 :]:
                if want < 0:
                    break
                if d == want:
                    chain.append(n)
                    want -= 1
            return list(reversed(chain))
    return []


def importtime(
    site: CourierSite, args: list[str], runs: int, top: int, before=None
) -> dict:
    per_package: dict[str, list[float]] = defaultdict(list)
    per_top: dict[str, list[float]] = defaultdict(list)
    totals, numpy_chain, count = [], [], 0
    for _ in range(runs):
        if before:
            before()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", *manage(*args)[1:]],
            env=site.env, cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows = parse_importtime(done.stderr)
        count = len(rows)
        package: dict[str, int] = defaultdict(int)
        for self_us, _, _, name in rows:
            package[name.split(".")[0]] += self_us
        for name, us in package.items():
            per_package[name].append(us / 1e3)
        for _, cum_us, depth, name in rows:
            if depth == 0:
                per_top[name].append(cum_us / 1e3)
        totals.append(sum(cum for _, cum, d, _ in rows if d == 0) / 1e3)
        numpy_chain = chain_to(rows, "numpy") or numpy_chain
    total = statistics.median(totals)
    print(
        f"\nimports of `manage.py {' '.join(args)}` (-X importtime, median of "
        f"{runs}): {count} modules, {total:.0f} ms in imports"
    )
    print(f"  {'package (self time of all its modules)':<44} {'ms':>7} {'share':>6}")
    packages = sorted(
        ((statistics.median(v), k) for k, v in per_package.items()), reverse=True
    )
    for ms, name in packages[:top]:
        print(f"  {name:<44} {ms:7.1f} {ms / total:6.1%}")
    print(f"  {'top-level import (cumulative)':<44} {'ms':>7}")
    tops = sorted(((statistics.median(v), k) for k, v in per_top.items()), reverse=True)
    for ms, name in tops[:top]:
        print(f"  {name:<44} {ms:7.1f}")
    if numpy_chain:
        print("  numpy is imported: " + " -> ".join(numpy_chain))
    else:
        print("  numpy is not imported")
    return {
        "modules": count,
        "import_ms": total,
        "packages": {k: round(ms, 1) for ms, k in packages[:top]},
        "top_level": {k: round(ms, 1) for ms, k in tops[:top]},
        "numpy_chain": numpy_chain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--importtime-runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
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

    header("start-up: send_series of one instance vs storescu of one")
    work = Path(tempfile.mkdtemp(prefix="courier-bench-startup-"))
    series = make_series(work / "one", 1)
    site = CourierSite(work / "site").migrate()
    scp = DcmtkStoreSCP(work / "storescp").start()
    try:
        site.add_target(
            name="storescp", kind="dicom", host="127.0.0.1", port=scp.port,
            called_aet=scp.aet,
        )  # fmt: skip

        def one(run) -> Run:
            result = run()
            if len(scp.files()) != 1:
                raise BenchError(f"storescp holds {len(scp.files())} files, not 1")
            return result

        storescu = [DCMTK["storescu"], "-aet", "STORESCU", "-aec", scp.aet,
                    "127.0.0.1", str(scp.port), str(series.files[0])]  # fmt: skip
        arms = [
            Arm("Courier manage.py send_series, 1 instance",
                partial(one, partial(run_process,
                                     manage("send_series", "storescp",
                                            str(series.folder)),
                                     env=site.env, cwd=ROOT)),
                scp.clear),
            Arm("dcmtk storescu, 1 instance",
                partial(one, partial(run_process, storescu, env=DCMTK_ENV)),
                scp.clear),
            Arm("manage.py send_series --help (no send)",
                partial(run_process, manage("send_series", "--help"),
                        env=site.env, cwd=ROOT)),
            Arm("python -c 'django.setup()' (Courier's settings and apps)",
                partial(run_process, [sys.executable, "-c", SETUP],
                        env=site.env, cwd=ROOT)),
            Arm("python -c pass (interpreter alone)",
                partial(run_process, [sys.executable, "-c", "pass"])),
        ]  # fmt: skip
        if args.baseline:
            cmd = manage("send_series", "storescp", str(series.folder),
                         checkout=args.baseline)  # fmt: skip
            arms.insert(1, Arm(
                f"baseline ({checkout_label(args.baseline)}) send_series, 1 instance",
                partial(one, partial(run_process, cmd, env=site.env,
                                     cwd=args.baseline)), scp.clear))  # fmt: skip
        runs = interleave(arms, args.rounds, warmup=args.warmup)
        record = report(
            "one instance: whole processes",
            runs,
            reference="dcmtk storescu, 1 instance",
            json_path=None,
        )
        record["importtime"] = {
            "send_series, 1 instance": importtime(
                site, ["send_series", "storescp", str(series.folder)],
                args.importtime_runs, args.top, scp.clear,
            ),
            "send_series --help": importtime(
                site, ["send_series", "--help"], args.importtime_runs, args.top
            ),
        }  # fmt: skip
        save(args.json, record)
    finally:
        scp.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
