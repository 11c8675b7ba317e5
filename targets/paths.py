"""Paths built from data: clean each part, and check the result stays inside.

A UID or tag value from a PACS, a modality or a file is data, never a path: anyone
who can store an instance somewhere Courier reads from chooses it. Every writer
(retrieval, Folder, SFTP, S3 keys, rsync staging, XNAT zip members, the spool)
builds names with `clean_part` / `uid_part` and checks the joined result with
`inside` (local paths) or `remote_inside` (SFTP paths, S3 keys) before writing.
`private_dir` / `private_file` / `private_sqlite` create what only Courier's user may
read. This module imports nothing of Courier's, so any layer (settings too) can use
it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@,-]+")
MAX_PART = 128


class UnsafePath(ValueError):
    """A path built from data would leave its destination."""


def clean_part(value: object, fallback: str = "unknown") -> str:
    """Turn a value into one safe path component: no separators, no `..`.

    Characters other than letters, digits and `._+=@,-` become `_`; leading and
    trailing dots and underscores go (so never `.`, `..` or a hidden name).
    """
    cleaned = _UNSAFE.sub("_", str(value).strip()).strip("._")
    if not cleaned:
        return fallback
    return cleaned[:MAX_PART]


def uid_part(value: object, fallback: str = "unknown") -> str:
    """`clean_part` for identifiers: a value that had to change gets a hash suffix.

    A valid UID is its own name. Two different invalid ones ("1/2" and "1_2", or two
    long ones cut to the same length) would clean to one name and overwrite each
    other; 8 hex digits of the original's SHA-1 keep them apart.
    """
    text = str(value)
    cleaned = clean_part(text, fallback)
    if cleaned == text:
        return cleaned
    digest = hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{cleaned[: MAX_PART - 9]}-{digest}"


def plain_name(name: str) -> str:
    """Return `name` if it is one file name (no separator, not `.` or `..`), else
    raise `UnsafePath`: the cheap check for names joined under a checked folder."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UnsafePath(f"{name!r} is not a plain file name")
    return name


def inside(root: str | Path, *parts: str) -> Path:
    """Join `parts` under `root` and return the path; raise `UnsafePath` if the
    resolved result is not strictly below the resolved root."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or not path.is_relative_to(base):
        shown = "/".join(parts)
        raise UnsafePath(f"{shown!r} would be written outside {base}")
    return path


def remote_inside(root: str, *parts: str) -> str:
    """The POSIX path or object key `root/parts...`; raise `UnsafePath` if a part is
    empty, `.` or `..`, or the result is not below `root`.

    For paths Courier cannot resolve locally (an SFTP server's, an S3 key that a
    consumer may later sync to disk), so the check is on the text.
    """
    segments = [s for part in parts if part for s in part.split("/")]
    if not segments or any(s in ("", ".", "..") for s in segments):
        raise UnsafePath(f"{'/'.join(parts)!r} is not a clean relative path")
    if not root:
        return "/".join(segments)
    return root.rstrip("/") + "/" + "/".join(segments)


# -- private files -----------------------------------------------------------------
# The data directory holds the database (sessions included), the queue, the keys
# and folder indexes (patient names): Courier's user alone may read any of it.
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _tighten(path: Path, mode: int) -> None:
    try:
        if os.stat(path).st_mode & 0o777 != mode:
            os.chmod(path, mode)
    except (FileNotFoundError, PermissionError):
        # Gone, or another user's: system check courier.W010 names what stays open.
        pass


def loose_files(folder: str | Path) -> list[Path]:
    """`folder` and the files directly in it that others may read or write."""
    folder = Path(folder)
    found = []
    try:
        if folder.stat().st_mode & 0o077:
            found.append(folder)
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mode & 0o077:
                found.append(Path(entry.path))
    except FileNotFoundError:
        pass
    return found


def private_dir(path: str | Path) -> Path:
    """Create `path` (and its parents) if missing; make it 0700 either way."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _tighten(path, PRIVATE_DIR)
    return path


def private_file(path: str | Path) -> Path:
    """Create `path` empty with mode 0600 if missing; make an existing one 0600.

    Created before anything writes it, so it is never readable by others, not even
    for a moment (a later chmod would leave that window).
    """
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    os.close(fd)
    _tighten(path, PRIVATE_FILE)
    return path


def private_sqlite(path: str | Path) -> Path:
    """`private_file` for an SQLite database and its -wal, -shm and -journal files.

    SQLite creates those with the database file's mode, so a 0600 database keeps
    them 0600; existing ones (from before) are tightened here.
    """
    path = private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        _tighten(path.with_name(path.name + suffix), PRIVATE_FILE)
    return path


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable: fsync the folder."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
