"""Summarise a py-spy profile (`py-spy record -f raw`): where the samples go.

    .venv/bin/python bench/spy_summary.py profile.txt [--top 25] [--match TEXT]

py-spy's raw format is one collapsed stack per line, outermost frame first, then the
sample count. Prints the share of samples per package (inclusive: a stack counts once
for every package on it; and by leaf: the package whose code was running), the
functions with the most samples inclusive and as the leaf, and with `--match` the
inclusive share of every function whose name or file contains TEXT. With
`--bucket NAME=TEXT[|TEXT...]` (repeatable, in order) every stack goes to the first
bucket with a frame containing one of the TEXTs (`=NAME`: a function named exactly
NAME), the rest to "other": shares that add up to 100 %. `--drop-leaf TEXT` leaves
out stacks whose running function contains TEXT (waits: `Condition.wait`).
`--within TEXT` keeps only the stacks through a function containing TEXT.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def package_of(path: str) -> str:
    """site-packages/django/db/x.py -> django; <project>/dispatch/x.py -> dispatch."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    parts = Path(path).parts
    for app in ("dispatch", "targets", "querytool", "config", "manage.py"):
        if app in parts:
            return app
    if "/lib/python" in path:
        return "stdlib:" + Path(path).stem
    return path


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for raw in stack.split(";"):
            m = FRAME.match(raw.strip())
            func, file = (m["func"], m["file"]) if m else (raw.strip(), "")
            frames.append((func, file))
        stacks.append((frames, int(count)))
    return stacks


def _hit(text: str, func: str, file: str) -> bool:
    if text.startswith("="):
        return func == text[1:]
    return text in func or text in file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", action="append", default=[])
    parser.add_argument("--bucket", action="append", default=[])
    parser.add_argument("--drop-leaf", action="append", default=[])
    parser.add_argument(
        "--within", help="keep only stacks through this function (=NAME: exactly)"
    )
    args = parser.parse_args()
    buckets = [(b.split("=", 1)[0], b.split("=", 1)[1].split("|")) for b in args.bucket]
    in_bucket: Counter = Counter()
    stacks = [
        (frames, n)
        for frames, n in parse(args.profile)
        if not (frames and any(t in frames[-1][0] for t in args.drop_leaf))
        and (not args.within or any(_hit(args.within, fn, f) for fn, f in frames))
    ]
    total = sum(n for _, n in stacks) or 1
    incl_pkg, leaf_pkg, incl_fn, leaf_fn = Counter(), Counter(), Counter(), Counter()
    matched = Counter()
    for frames, n in stacks:
        pkgs = {package_of(f) for _, f in frames if f}
        for p in pkgs:
            incl_pkg[p] += n
        fns = {f"{fn} ({Path(f).name})" for fn, f in frames}
        for fn in fns:
            incl_fn[fn] += n
        if frames:
            fn, f = frames[-1]
            leaf_pkg[package_of(f) if f else fn] += n
            leaf_fn[f"{fn} ({Path(f).name})"] += n
        for text in args.match:
            if any(text in fn or text in f for fn, f in frames):
                matched[text] += n
        if buckets:
            for name, texts in buckets:
                if any(_hit(t, fn, f) for fn, f in frames for t in texts):
                    in_bucket[name] += n
                    break
            else:
                in_bucket["other"] += n
    print(f"{args.profile}: {total} samples")
    for title, counter in (
        ("package, inclusive", incl_pkg),
        ("package running (leaf)", leaf_pkg),
        ("function, inclusive", incl_fn),
        ("function running (leaf)", leaf_fn),
    ):
        print(f"\n  {title:<64} {'samples':>8} {'share':>6}")
        for name, n in counter.most_common(args.top):
            print(f"  {name[:64]:<64} {n:8d} {n / total:6.1%}")
    if in_bucket:
        print(f"\n  {'bucket (first match wins)':<64} {'samples':>8} {'share':>6}")
        for name in [b for b, _ in buckets] + ["other"]:
            n = in_bucket[name]
            print(f"  {name:<64} {n:8d} {n / total:6.1%}")
    if matched:
        print()
        for text, n in matched.items():
            print(f"  stacks through {text!r}: {n} samples, {n / total:.1%}")


if __name__ == "__main__":
    main()
