"""What a durable write costs on this disk: the floor under the receiver's time.

    .venv/bin/python bench/durable_write.py [--count 2000] [--size 39000] [--rounds 5]
        [--dir /path/on/the/spool/disk]

Writes `--count` files of `--size` bytes, as the receiver stores instances, in
interleaved rounds of these ways (one thread, one file at a time, as one association):

- `write`: open, write, close (what dcmtk's storescp does: no sync);
- `write+fdatasync`: the file's data and size on disk;
- `courier`: write to a partial folder, fdatasync, rename into the series folder,
  fsync the folder (what `manage.py receive` does before each success status);
- `rename+fdatasync`: write, rename, one fdatasync (on ext4 one journal commit
  carries the rename; not durable by POSIX, and a crash can leave a torn file under
  its final name: shown for the size of the gap only);
- `writeback+rename+fsync(dir)`: write, `sync_file_range` (data written, blocks
  allocated, no commit), rename, fsync of the folder: one journal commit for data,
  size and name on ext4 in data=ordered mode; POSIX promises nothing of the kind.

Prints the median time per file for each and its share of a storescp instance time
given with `--storescp-ms` (from `cmd_receive.py`).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
# SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
_WRITE_AND_WAIT = 1 | 2 | 4


def _sync_file_range(fd: int) -> None:
    if _libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0),
                             _WRITE_AND_WAIT) != 0:  # fmt: skip
        raise OSError(ctypes.get_errno(), "sync_file_range")


def run(kind: str, folder: Path, count: int, payload: bytes) -> float:
    partial, series = folder / ".partial", folder / "series"
    for d in (partial, series):
        d.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(series, os.O_RDONLY)
    start = time.perf_counter()
    for i in range(count):
        name = f"{i}.dcm"
        path = (
            series if kind.startswith("write") and "rename" not in kind else partial
        ) / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, payload)
        if kind == "write+fdatasync":
            os.fdatasync(fd)
        elif kind == "courier":
            os.fdatasync(fd)
            os.replace(path, series / name)
            os.fsync(dir_fd)
        elif kind == "rename+fdatasync":
            os.replace(path, series / name)
            os.fdatasync(fd)
        elif kind == "writeback+rename+fsync(dir)":
            _sync_file_range(fd)
            os.replace(path, series / name)
            os.fsync(dir_fd)
        os.close(fd)
    elapsed = time.perf_counter() - start
    os.close(dir_fd)
    shutil.rmtree(folder)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=39000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--storescp-ms", type=float, default=None)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="durable-", dir=args.dir))
    payload = os.urandom(args.size)
    kinds = ["write", "write+fdatasync", "courier", "rename+fdatasync",
             "writeback+rename+fsync(dir)"]  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for r in range(args.rounds):
            for kind in kinds:
                times[kind].append(run(kind, base / f"{kind}-{r}", args.count, payload))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{args.count} files of {args.size} bytes, {args.rounds} interleaved rounds, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for kind in kinds:
        per_file = statistics.median(times[kind]) / args.count * 1000
        line = f"  {kind:28} {per_file:6.3f} ms per file"
        line += f"  [{min(times[kind]) / args.count * 1000:.3f}-"
        line += f"{max(times[kind]) / args.count * 1000:.3f}]"
        if args.storescp_ms:
            line += f"  = {per_file / args.storescp_ms:.2f}x storescp's instance time"
        print(line)


if __name__ == "__main__":
    main()
