"""The local-folder index as users run it: rescans and searches of a 1,000,000-file tree.

    .venv/bin/python bench/make_tree.py      # once: the tree, /var/tmp/courier-tree-1m
    .venv/bin/python bench/cmd_index.py [--tree DIR] [--rounds 5] [--json FILE]

Uses the tree made by bench/make_tree.py (patients / studies / series of small CT
files) and a throw-away Courier site (SQLite) with one DICOMweb target whose URL is
`file://<tree>`. Its index lives in the tree (`.courier-index.sqlite3`) and is kept
between runs; the first `index_folder` (untimed, printed) builds or updates it.

Rescan of the unchanged tree, interleaved rounds (Courier, find, walk, ...), each a
whole process timed by the harness (wall, CPU, peak RSS):

- Courier: `manage.py index_folder archive --no-progress` (interpreter, Django, the
  walk with one `stat` per file, the index's bookkeeping, the audit entry); its
  report must say every file is unchanged;
- reference: `find <tree> -type f -fprintf /dev/null '%s %T@ %p\\n'`, what the file
  system costs to list the tree and `stat` every file (GNU find, C);
- for scale: the same walk in a few lines of Python (`os.scandir` + `stat`, no index).

Then `--touch` percent of the series folders get a new modification time on every
file (a re-export of those series) and one more `index_folder` reads them again.

Searches: one process (`manage.py shell`) times each query through
`querytool.services.search` (what the query page calls: the local-folder source's
`find_studies`, limit 200, and the audit entry) and through the source alone, median
of `--queries` runs after one warm-up; beside them the same search the way the index
answered it before (instance rows grouped per study), on the same index file.
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
    ROOT,
    Arm,
    BenchError,
    Run,
    header,
    interleave,
    manage,
    output,
    report,
    run_process,
    save,
)

from tests.fixtures.dispatch_peers import CourierSite

PY_WALK = r"""
import os, sys
root, n, stack = sys.argv[1], 0, [sys.argv[1]]
while stack:
    for entry in os.scandir(stack.pop()):
        if entry.is_dir(follow_symlinks=False):
            stack.append(entry.path)
        elif entry.is_file():
            entry.stat()
            n += 1
print(n)
"""

QUERIES = r"""
import json, statistics, sqlite3, time
from datetime import date
from django.contrib.auth import get_user_model
from querytool import services
from targets.models import Target
from targets.query import Criteria

source = Target.objects.get(name="archive")
user = get_user_model().objects.create_superuser("bench", "b@example.org", "x")
index = source.query_source().fresh_index()
RUNS = __RUNS__
searches = [
    ("description *knee* (contains)", Criteria(study_description="*knee*")),
    ("description 'ct chest w contrast' (exact)",
     Criteria(study_description="ct chest w contrast")),
    ("description mr* (prefix)", Criteria(study_description="mr*")),
    ("description *angio* (no match)", Criteria(study_description="*angio*")),
    ("patient name test^patient00001*", Criteria(patient_name="test^patient00001*")),
    ("patient id PAT0001234", Criteria(patient_id="PAT0001234")),
    ("modality CT, 2015-2016", Criteria(modality="CT", date_from=date(2015, 1, 1),
                                        date_to=date(2016, 12, 31))),
    ("no filter (newest 200)", Criteria()),
]
BEFORE = (
    "SELECT study_uid, max(patient_id), max(patient_name), max(birth_date), "
    "max(study_date), max(study_time), max(accession), max(study_description), "
    "group_concat(DISTINCT modality), count(DISTINCT series_uid), count(*) FROM files "
    "WHERE study_description LIKE ? ESCAPE '\\' GROUP BY study_uid "
    "ORDER BY max(study_date) DESC, study_uid LIMIT 201"
)

def median_ms(fn):
    fn()
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times), max(times)

out = {"studies": None, "files": None, "queries": []}
with index.connect() as db:
    out["studies"] = db.execute("SELECT count(*) FROM studies").fetchone()[0]
    out["files"] = db.execute("SELECT count(*) FROM files").fetchone()[0]
for name, criteria in searches:
    found = services.search(source, criteria, user)
    service = median_ms(lambda: services.search(source, criteria, user))
    alone = median_ms(lambda: source.query_source().find_studies(criteria, 200))
    row = {"query": name, "results": len(found.studies), "truncated": found.truncated,
           "service_ms": service, "source_ms": alone}
    if criteria.study_description.startswith("*"):
        pattern = criteria.study_description.replace("*", "%")
        db = sqlite3.connect(index.path)
        before = lambda: db.execute(BEFORE, (pattern,)).fetchall()
        row["before_results"] = len(before())
        row["before_ms"] = median_ms(before)
    out["queries"].append(row)
print(json.dumps(out))
"""


def index_folder(site: CourierSite, expect: int | None) -> Run:
    run = run_process(
        manage("index_folder", "archive", "--no-progress"), env=site.env, cwd=ROOT
    )
    text = output(run)
    if expect is not None and (
        f"{expect} files, 0 added, 0 changed, 0 removed, {expect} unchanged" not in text
    ):
        raise BenchError(f"the rescan did not find the tree unchanged:\n{text[-2000:]}")
    return run


def find_walk(tree: Path) -> Run:
    return run_process(
        ["find", str(tree), "-type", "f", "-fprintf", "/dev/null", r"%s %T@ %p\n"]
    )


def python_walk(tree: Path, expect: int) -> Run:
    run = run_process([sys.executable, "-S", "-c", PY_WALK, str(tree)])
    if int(output(run).split()[-1]) < expect:  # the index's own file is counted too
        raise BenchError(f"the Python walk counted {output(run)!r}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="/var/tmp/courier-tree-1m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--queries", type=int, default=20, help="runs per query")
    parser.add_argument("--only", default="", help="rescan or query: only that")
    parser.add_argument(
        "--touch",
        type=float,
        default=1.0,
        help="then change this percentage of the series folders and rescan (0: no)",
    )
    parser.add_argument("--json", help="append the figures to this JSON-lines file")
    args = parser.parse_args()

    tree = Path(args.tree).resolve()
    if not tree.is_dir():
        sys.exit(f"{tree} does not exist: run bench/make_tree.py first")
    header(f"folder index of {tree} as whole processes")
    work = Path(tempfile.mkdtemp(prefix="courier-bench-index-"))
    try:
        site = CourierSite(work / "site", env={"COURIER_INDEX_MAX_AGE": "3600"})
        site.migrate()
        site.add_target(
            name="archive", kind="dicomweb", url=f"file://{tree}", direction="query"
        )
        first = index_folder(site, None)
        text = output(first).strip().splitlines()
        print(f"first index_folder ({first.wall:.1f} s): {text[0] if text else ''}")
        count = int(text[0].split(": ", 1)[1].split(" files")[0])

        if args.only in ("", "rescan"):
            print(f"\nrescan of {count:,} unchanged files", flush=True)
            arms = [
                Arm("Courier manage.py index_folder (rescan)",
                    partial(index_folder, site, count)),
                Arm("find -type f -printf size,mtime (reference)",
                    partial(find_walk, tree)),
                Arm("Python os.scandir + stat walk, no index",
                    partial(python_walk, tree, count)),
            ]  # fmt: skip
            runs = interleave(arms, args.rounds, warmup=args.warmup)
            report(
                f"rescan of an unchanged {count:,}-file folder (whole processes)",
                runs,
                reference="find -type f -printf size,mtime (reference)",
                unit=("files/s", count),
                json_path=args.json,
            )

        if args.touch and args.only in ("", "rescan"):
            # A new modification time on every file of some series folders: what a
            # re-export of those series looks like to the index.
            folders = sorted({p.parent for p in tree.glob("*/*/*/*.dcm")})
            chosen = folders[:: max(1, round(100 / args.touch))]
            touched = 0
            for folder in chosen:
                for path in folder.iterdir():
                    st = path.stat()
                    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
                    touched += 1
            run = run_process(
                manage("index_folder", "archive", "--no-progress"),
                env=site.env,
                cwd=ROOT,
            )
            line = output(run).strip().splitlines()[0]
            print(
                f"\nrescan after {len(chosen):,} of {len(folders):,} series folders "
                f"({touched:,} files) got new modification times: {run.wall:.2f} s, "
                f"CPU {run.cpu:.2f} s\n  {line}"
            )
            save(
                args.json,
                {"title": f"rescan, {touched} files in {len(chosen)} folders changed",
                 "wall": run.wall, "cpu": run.cpu, "report": line},
            )  # fmt: skip

        if args.only in ("", "query"):
            code = QUERIES.replace("__RUNS__", str(args.queries))
            run = run_process(manage("shell", "-c", code), env=site.env, cwd=ROOT)
            result = json.loads(output(run).strip().splitlines()[-1])
            print(
                f"\nsearches of {result['files']:,} instances in "
                f"{result['studies']:,} studies, median of {args.queries} "
                "[min-max], ms"
            )
            print(
                f"  {'query':<44} {'results':>7} {'services.search':>22} "
                f"{'source alone':>20} {'before (instance rows)':>26}"
            )
            for q in result["queries"]:
                s, a = q["service_ms"], q["source_ms"]
                before = ""
                if "before_ms" in q:
                    b = q["before_ms"]
                    before = (
                        f"{b[0]:7.1f} [{b[1]:.0f}-{b[2]:.0f}] ({q['before_results']})"
                    )
                print(
                    f"  {q['query']:<44} {q['results']:>7} "
                    f"{s[0]:8.1f} [{s[1]:.1f}-{s[2]:.1f}] {a[0]:8.1f} "
                    f"[{a[1]:.1f}-{a[2]:.1f}] {before:>26}"
                )
            save(args.json, {"title": f"searches of a {count:,}-file folder", **result})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
