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
- `write+fsync`: a new file, `fsync` (data and every inode field);
- `O_DSYNC write`: a new file opened with `O_DSYNC` (each write synced);
- `sync_file_range`: a new file's data written back, no cache flush and no metadata
  (not durable: the size and the block map are not committed; for the gap only);
- `prealloc+fdatasync`: `pwrite` into a preallocated, already zeroed file (blocks
  written once, untimed) then `fdatasync`: no metadata to commit, only the data
  and the disk's cache flush;
- `prealloc O_DSYNC`: the same file opened with `O_DSYNC`, one `pwrite` each;
- `journal (Courier)`: what the receiver does since issue 15: a record (header,
  checksum, data) `pwrite` into a preallocated, zeroed journal segment and
  `fdatasync`ed, then the file written to a partial folder and renamed into the
  series folder without a sync; every 500 files one `syncfs` (the checkpoint the
  receiver's bookkeeping thread makes once a second) lets the segment be reused.

Prints the median time per file for each and its share of a storescp instance time
given with `--storescp-ms` (from `cmd_receive.py`).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import struct
import tempfile
import time
import zlib
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
# SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
_WRITE_AND_WAIT = 1 | 2 | 4


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        raise OSError(ctypes.get_errno(), "syncfs")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _sync_file_range(fd: int) -> None:
    if _libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0),
                             _WRITE_AND_WAIT) != 0:  # fmt: skip
        raise OSError(ctypes.get_errno(), "sync_file_range")


def _zeroed(path: Path, size: int) -> None:
    """A file of `size` bytes whose blocks are written (not unwritten extents)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    os.posix_fallocate(fd, 0, size)
    block = b"\x00" * (1 << 20)
    for offset in range(0, size, len(block)):
        os.pwrite(fd, block[: size - offset], offset)
    os.fsync(fd)
    os.close(fd)


PREALLOC = ("prealloc+fdatasync", "prealloc O_DSYNC", "journal (Courier)")


def run(kind: str, folder: Path, count: int, payload: bytes) -> float:
    partial, series = folder / ".partial", folder / "series"
    for d in (partial, series):
        d.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(series, os.O_RDONLY)
    if kind in PREALLOC:
        # 64 MiB, as a receiver's journal segment: written over and over.
        segment, seg_size = folder / "segment", 64 << 20
        _zeroed(segment, seg_size)
        extra = os.O_DSYNC if "O_DSYNC" in kind else 0
        seg_fd = os.open(segment, os.O_WRONLY | extra)
        if kind.startswith("journal"):
            fsync_dir(folder)
        record = 64 + len(payload)
        start = time.perf_counter()
        offset = 0
        for i in range(count):
            if offset + record > seg_size:
                offset = 0
            if kind.startswith("journal"):
                head = struct.pack("<8sQQ", b"CJOURNAL", i, zlib.crc32(payload))
                os.pwrite(seg_fd, head.ljust(64, b"\x00") + payload, offset)
                os.fdatasync(seg_fd)
                name = f"{i}.dcm"
                fd = os.open(partial / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o640)  # fmt: skip
                os.write(fd, payload)
                os.close(fd)
                os.replace(partial / name, series / name)
                if i % 500 == 499:
                    os.syncfs(seg_fd) if hasattr(os, "syncfs") else _syncfs(seg_fd)
            else:
                os.pwrite(seg_fd, payload, offset)
                if not extra:
                    os.fdatasync(seg_fd)
            offset += record
        elapsed = time.perf_counter() - start
        os.close(seg_fd)
        os.close(dir_fd)
        shutil.rmtree(folder)
        return elapsed
    start = time.perf_counter()
    for i in range(count):
        name = f"{i}.dcm"
        path = (
            series if kind.startswith("write") and "rename" not in kind else partial
        ) / name
        extra = os.O_DSYNC if kind == "O_DSYNC write" else 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | extra, 0o640)
        os.write(fd, payload)
        if kind == "write+fsync":
            os.fsync(fd)
        elif kind == "sync_file_range":
            _sync_file_range(fd)
        elif kind == "write+fdatasync":
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
    parser.add_argument("--only", default="", help="comma-separated ways")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="durable-", dir=args.dir))
    payload = os.urandom(args.size)
    kinds = ["write", "write+fdatasync", "write+fsync", "O_DSYNC write",
             "sync_file_range", "courier", "rename+fdatasync",
             "writeback+rename+fsync(dir)", *PREALLOC]  # fmt: skip
    if args.only:
        kinds = [k for k in kinds if k in args.only.split(",")]
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
