"""Markdown rows for bench/RESULTS.md from the JSON lines the cmd_*.py scripts append.

    .venv/bin/python bench/results_table.py bench/results.jsonl

One table per record: every arm with its median time, CPU and peak RSS, the time
ratio to the record's reference (median and range over the interleaved rounds), the
CPU ratio and the 1-minute load average during its runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def mib(kb: int | None) -> str:
    return f"{kb / 1024:.0f} MiB" if kb else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", type=Path)
    args = parser.parse_args()
    for line in args.jsonl.read_text().splitlines():
        rec = json.loads(line)
        print(f"\n**{rec['title']}** ({rec['date']}, commit {rec['commit']})\n")
        if "queries" in rec:  # cmd_index.py's searches
            print("| query | results | services.search ms | source alone ms |")
            print("|---|---|---|---|")
            for q in rec["queries"]:
                s, a = q["service_ms"], q["source_ms"]
                print(f"| {q['query']} | {q['results']} | {s[0]:.1f} "
                      f"[{s[1]:.1f}-{s[2]:.1f}] | {a[0]:.1f} [{a[1]:.1f}-{a[2]:.1f}] |")  # fmt: skip
            continue
        if "arms" not in rec:  # a single run: its figures
            print(f"- {rec.get('wall', 0):.2f} s, CPU {rec.get('cpu', 0):.2f} s, "
                  f"load {rec.get('load', '-')}: {rec.get('report', '')}")  # fmt: skip
            continue
        print("| arm | median s | CPU s | peak RSS | time ratio [range] | CPU ratio "
              "| load |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for name, arm in rec["arms"].items():
            loads = [r["load"] for r in arm["runs"] if r.get("load") is not None]
            load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
            if name == rec["reference"]:
                ratio, cpu = "reference", "-"
            else:
                lo, hi = arm["time_ratio_range"]
                ratio = f"{arm['time_ratio']:.2f}x [{lo:.2f}-{hi:.2f}]"
                cpu = f"{arm['cpu_ratio']:.1f}x"
            print(
                f"| {name} | {arm['median_wall']:.3f} | {arm['median_cpu']:.2f} | "
                f"{mib(arm['peak_rss_kb'])} | {ratio} | {cpu} | {load} |"
            )
        notes = rec.get("notes", [])
        if notes:
            print()
        for note in notes:
            print(f"- {note}")


if __name__ == "__main__":
    main()
