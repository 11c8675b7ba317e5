"""Whole-process measurement for the bench/ scripts: run, interleave, print.

Standard library only (no Django, no pytest), so any script can import it first.

- `run_process(cmd)` runs one command as its own process and returns a `Run`: wall
  time, CPU (user + system) and peak RSS from `os.wait4` on that child.
- `ProcessMeter(pid)` measures a process that keeps running (a receiver, a worker):
  CPU and peak RSS read from /proc between `start()` and `stop()`.
- `interleave(arms, rounds)` runs the arms in turn (A, B, A, B, ...), each round's
  figures kept with that round's load average, so ratios come from neighbouring runs.
- `report(...)` prints the medians, each arm against the reference arm (per-round
  ratios, median and range), and appends the figures to a JSON-lines file if asked.

Why a spawner process: with fork or vfork + exec, Linux carries the parent's RSS
high-water mark into the child's `ru_maxrss`, so a bench script holding pydicom and
numpy would report its own 100 MB for a 13 MB storescu. The command is started by a
fresh `python -S -I` (about 6 MB; the floor every figure is above), which times it.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# dcmtk with TCP_NODELAY (PEERS.md: Nagle costs ~90 ms per C-STORE on loopback).
DCMTK = {"storescu": "/usr/bin/storescu", "storescp": "/usr/bin/storescp",
         "dcmsend": "/usr/bin/dcmsend", "echoscu": "/usr/bin/echoscu"}  # fmt: skip
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

_SPAWNER = r"""
import json, os, signal, sys, time
result, timeout, cmd = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.setsid()
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
def expire(*_):
    os.killpg(pid, signal.SIGKILL)
signal.signal(signal.SIGALRM, expire)
if timeout > 0:
    signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
signal.setitimer(signal.ITIMER_REAL, 0)
with open(result, "w") as f:
    json.dump({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime,
               "rss_kb": ru.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


class BenchError(RuntimeError):
    pass


@dataclass
class Run:
    """One measured run of one arm."""

    wall: float
    user: float = 0.0
    sys: float = 0.0
    rss_kb: int | None = None
    load: float | None = None  # 1-minute load average when the run started
    extra: dict = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def add_cpu(self, other: Run | None) -> Run:
        """Count another process's CPU in this run (a worker beside a receiver)."""
        if other is not None:
            self.user += other.user
            self.sys += other.sys
            if other.rss_kb and (self.rss_kb or 0) < other.rss_kb:
                self.rss_kb = other.rss_kb
        return self


def run_process(
    cmd: Sequence[str | os.PathLike],
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float = 900,
    log: str | os.PathLike | None = None,
    check: bool = True,
) -> Run:
    """Run `cmd` as one process; return its wall time, CPU and peak RSS.

    stdout and stderr go to `log` (if not given, a file in a temporary folder removed
    when the script exits; its path is in `Run.extra["log"]`). A non-zero exit raises
    `BenchError` with the log's tail.
    """
    cmd = [str(c) for c in cmd]
    if log is None:
        fd, log = tempfile.mkstemp(suffix=".log", dir=_scratch())
        os.close(fd)
    fd, result = tempfile.mkstemp(suffix=".json", dir=_scratch())
    os.close(fd)
    try:
        with open(log, "ab") as out:
            subprocess.run(
                [sys.executable, "-S", "-I", "-c", _SPAWNER, result, str(timeout),
                 json.dumps(cmd)],
                env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, check=True,
            )  # fmt: skip
        data = json.loads(Path(result).read_text())
    finally:
        os.unlink(result)
    run = Run(data["wall"], data["user"], data["sys"], data["rss_kb"])
    run.extra["log"] = str(log)
    run.extra["rc"] = data["rc"]
    if check and data["rc"] != 0:
        raise BenchError(
            f"{' '.join(cmd[:4])} ... exited {data['rc']}:\n{tail(Path(log))}"
        )
    return run


_SCRATCH: list[str] = []


def _scratch() -> str:
    """This script's folder for run logs, removed when the script exits."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="courier-bench-logs-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def output(run: Run) -> str:
    """What the measured command printed (stdout and stderr)."""
    return Path(run.extra["log"]).read_text(errors="replace")


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a running process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def proc_peak_rss_kb(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


class ProcessMeter:
    """CPU used by long-running processes between `start()` and `stop()`."""

    def __init__(self, *pids: int):
        self.pids = pids
        self._begin: dict[int, tuple[float, float]] = {}

    def start(self) -> ProcessMeter:
        self._begin = {pid: proc_cpu(pid) for pid in self.pids}
        return self

    def stop(self, wall: float = 0.0) -> Run:
        run = Run(wall, rss_kb=0)
        for pid in self.pids:
            user, sys_ = proc_cpu(pid)
            run.user += user - self._begin[pid][0]
            run.sys += sys_ - self._begin[pid][1]
            run.rss_kb = max(run.rss_kb or 0, proc_peak_rss_kb(pid) or 0)
        return run


@dataclass
class Arm:
    """One contender: `run()` measures one run; `before()` runs untimed first."""

    name: str
    run: Callable[[], Run]
    before: Callable[[], None] | None = None


def interleave(
    arms: Sequence[Arm], rounds: int, *, warmup: int = 0, quiet: bool = False
) -> dict[str, list[Run]]:
    """Run every arm once per round, in order (A, B, A, B, ...); return the runs.

    `warmup` rounds run first and are not kept (page cache, .pyc files).
    """
    runs: dict[str, list[Run]] = {arm.name: [] for arm in arms}
    for number in range(-warmup, rounds):
        for arm in arms:
            if arm.before:
                arm.before()
            load = os.getloadavg()[0]
            run = arm.run()
            run.load = load
            if number >= 0:
                runs[arm.name].append(run)
            if not quiet:
                what = "warm-up" if number < 0 else f"round {number + 1}/{rounds}"
                print(
                    f"  {what:>12}  {arm.name:<44} {run.wall:8.3f} s  "
                    f"CPU {run.cpu:6.2f} s  load {load:4.1f}",
                    flush=True,
                )
    return runs


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _mib(kb: int | None) -> str:
    return f"{kb / 1024:6.0f} MiB" if kb else "       -"


def report(
    title: str,
    runs: dict[str, list[Run]],
    *,
    reference: str,
    unit: tuple[str, float] | None = None,
    json_path: str | os.PathLike | None = None,
    notes: Sequence[str] = (),
) -> dict:
    """Print medians and each arm against `reference`; return (and save) a record.

    Ratios are time ratios (arm / reference: below 1 means faster than the
    reference), taken within each round and then summarised, so a change in the
    machine's load between rounds hits both sides of a ratio alike. `unit`, e.g.
    ("inst/s", 500), adds a rate column.
    """
    print(f"\n{title}")
    loads = [r.load for rs in runs.values() for r in rs if r.load is not None]
    if loads:
        print(
            f"  load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}"
        )
    rate_head = f" {unit[0]:>9}" if unit else ""
    print(
        f"  {'arm':<44} {'median s':>9}{rate_head} {'CPU s':>7} {'peak RSS':>10}"
        "  runs (wall s)"
    )
    ref_runs = runs[reference]
    record = {"title": title, "reference": reference, "arms": {}, "notes": list(notes)}
    for name, arm_runs in runs.items():
        wall = _median([r.wall for r in arm_runs])
        cpu = _median([r.cpu for r in arm_runs])
        rss = max((r.rss_kb or 0 for r in arm_runs), default=0) or None
        rate = f" {unit[1] / wall:9.0f}" if unit else ""
        print(
            f"  {name:<44} {wall:9.3f}{rate} {cpu:7.2f} {_mib(rss):>10}  "
            + " ".join(f"{r.wall:.2f}" for r in arm_runs)
        )
        entry = {"median_wall": wall, "median_cpu": cpu, "peak_rss_kb": rss,
                 "runs": [asdict(r) for r in arm_runs]}  # fmt: skip
        if name != reference:
            pairs = list(zip(arm_runs, ref_runs, strict=False))
            t = [a.wall / b.wall for a, b in pairs if b.wall]
            c = [a.cpu / b.cpu for a, b in pairs if b.cpu]
            entry["time_ratio"] = _median(t)
            entry["time_ratio_range"] = [min(t), max(t)] if t else None
            entry["cpu_ratio"] = _median(c)
        record["arms"][name] = entry
    print(f"  ratios to {reference} (time; per round, median [range]; CPU):")
    for name, entry in record["arms"].items():
        if name == reference or entry.get("time_ratio_range") is None:
            continue
        lo, hi = entry["time_ratio_range"]
        print(
            f"    {name:<42} time {entry['time_ratio']:6.2f}x  [{lo:.2f}-{hi:.2f}]"
            f"   CPU {entry['cpu_ratio']:6.2f}x"
        )
    for note in notes:
        print(f"  note: {note}")
    save(json_path, record)
    return record


def save(json_path: str | os.PathLike | None, record: dict) -> None:
    """Append `record`, with the date, commit and load, to a JSON-lines file."""
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps({**record, **context()}) + "\n")


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        return done.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def context() -> dict:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "load": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def header(what: str) -> None:
    """Print what is measured, on which commit, and how busy the machine is."""
    c = context()
    print(
        f"{what}\n{c['date']}, commit {c['commit']}, {c['cpus']} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in c['load'])}",
        flush=True,
    )


def wait_until(
    condition: Callable[[], object], timeout: float = 600, step: float = 0.02
) -> object:
    """Poll `condition` until it is truthy; raise `BenchError` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise BenchError(f"timed out after {timeout} s waiting for {condition}")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process this script started (by its PID), then make sure it is gone."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def manage(*args: str, checkout: str | os.PathLike | None = None) -> list[str]:
    """The command line of `manage.py <args>` with this interpreter, or with
    another checkout's own (`checkout/.venv`, e.g. main before a change)."""
    if checkout is not None:
        other = Path(checkout).resolve()
        return [
            str(other / ".venv" / "bin" / "python"),
            str(other / "manage.py"),
            *args,
        ]
    return [sys.executable, str(ROOT / "manage.py"), *args]


def checkout_label(checkout: str | os.PathLike) -> str:
    """`<folder> <short commit>` of another checkout, for an arm's name."""
    import subprocess

    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return f"{Path(checkout).name} {commit}"


def proc_tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants
    (a PostgreSQL postmaster and its backends)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(x) for x in fields[11:15]) / _TICK
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(proc_tree_cpu(int(c)) for c in children)


def start_process(
    cmd: Sequence[str], *, env: dict[str, str], cwd: str | os.PathLike, log: Path
) -> subprocess.Popen:
    """Start a long-running process (a worker), output to `log`, own session."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
