"""The local-folder index: a sqlite file of DICOM headers, updated incrementally.

It lives in the folder (`.courier-index.sqlite3`) when Courier can write there, else in
`DATA_DIR/indexes/<hash of the folder path>.sqlite3`. A scan compares every file's path,
size and modification time with the index, reads the headers of new or changed files
only, and deletes rows of vanished ones, so rescanning an unchanged folder costs one
`stat` per file. Files that are not DICOM (or unreadable) are kept in a `problems`
table with the reason, and are not read again until they change.
"""

# Why this module is long: the index's schema, its incremental scan and the
# fast header reader it depends on change together.

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
import struct
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from targets.dicomnet.vr import LONG_VRS
from targets.paths import private_dir, private_sqlite

INDEX_NAME = ".courier-index.sqlite3"

# (column, DICOM keyword) of every indexed tag.
COLUMNS: list[tuple[str, str]] = [
    ("patient_id", "PatientID"),
    ("patient_name", "PatientName"),
    ("birth_date", "PatientBirthDate"),
    ("sex", "PatientSex"),
    ("study_uid", "StudyInstanceUID"),
    ("series_uid", "SeriesInstanceUID"),
    ("sop_instance_uid", "SOPInstanceUID"),
    ("sop_class_uid", "SOPClassUID"),
    ("study_date", "StudyDate"),
    ("study_time", "StudyTime"),
    ("accession", "AccessionNumber"),
    ("study_description", "StudyDescription"),
    ("series_description", "SeriesDescription"),
    ("modality", "Modality"),
    ("body_part", "BodyPartExamined"),
    ("series_number", "SeriesNumber"),
    ("instance_number", "InstanceNumber"),
]
TAGS = [keyword for _, keyword in COLUMNS]
_INT_COLUMNS = {"series_number", "instance_number"}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    transfer_syntax TEXT NOT NULL DEFAULT '',
    {", ".join(f"{c} {'INTEGER' if c in _INT_COLUMNS else 'TEXT'}" for c, _ in COLUMNS)}
);
CREATE INDEX IF NOT EXISTS files_study ON files (study_uid);
CREATE INDEX IF NOT EXISTS files_series ON files (series_uid);
CREATE INDEX IF NOT EXISTS files_patient ON files (patient_id);
CREATE INDEX IF NOT EXISTS files_accession ON files (accession);
CREATE INDEX IF NOT EXISTS files_date ON files (study_date);
CREATE TABLE IF NOT EXISTS problems (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Below this many files to read, a process pool costs more than it saves.
_POOL_THRESHOLD = 2000
_CHUNK = 500


@dataclass
class ScanReport:
    """What a scan did. `added`/`updated` count DICOM files that entered the index
    or changed in it; files read this time that are not DICOM are `not_dicom`."""

    seen: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    not_dicom: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def read(self) -> int:
        """Files whose header was read by this scan."""
        return self.added + self.updated + self.not_dicom


def _text(value) -> str:
    if value is None:
        return ""
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- reading headers ------------------------------------------------------------------
#
# Most files are read by a small parser of the Part-10 header that stops at the last
# indexed tag: pydicom costs about 0.6 ms per file even with `specific_tags`, most of it
# in Python-level element handling, which made a first build barely faster than
# DICOMfileClient's. Anything unusual (big endian, deflate, an undefined-length
# sequence before the last indexed tag, a character set other than the default,
# Latin-1 or UTF-8, a header longer than the first read) goes to pydicom instead.
# The receiver's check (dispatch/receiving/files.py) is a different walk on purpose: strict,
# to the end of every dataset, refusing what is odd; they share the VR table only.

_HEAD_BYTES = 64 * 1024
_CHARSET_TAG = 0x00080005
_ENCODINGS = {
    b"": "latin-1",
    b"ISO_IR 6": "latin-1",
    b"ISO_IR 100": "latin-1",
    b"ISO_IR 192": "utf-8",
}
_IMPLICIT_LE = "1.2.840.10008.1.2"
_PYDICOM_ONLY = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}  # BE, deflated
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_TAG = struct.Struct("<HH").unpack_from


@functools.cache
def _wanted() -> tuple[dict[int, int], int]:
    """The indexed tags (tag -> column index) and the last of them.

    Looked up on first use: this module loads with the URLconf, and pydicom (numpy
    with it) costs most of a second to processes that never index a folder.
    """
    from pydicom.datadict import tag_for_keyword

    wanted = {int(tag_for_keyword(k)): i for i, (_, k) in enumerate(COLUMNS)}
    return wanted, max(wanted)


def fast_header(path: str) -> tuple | None:
    """Parse the indexed tags of a plain Part-10 file; None when pydicom must."""
    wanted, last_tag = _wanted()
    with open(path, "rb") as f:
        data = f.read(_HEAD_BYTES)
    end = len(data)
    whole = end < _HEAD_BYTES
    if end < 132 or data[128:132] != b"DICM":
        return None
    pos, syntax = 132, None
    while pos + 8 <= end:
        group, elem = _TAG(data, pos)
        if group != 2:
            break
        if data[pos + 4 : pos + 6] in LONG_VRS:
            length, pos = _U32(data, pos + 8)[0], pos + 12
        else:
            length, pos = _U16(data, pos + 6)[0], pos + 8
        if elem == 0x0010:
            syntax = data[pos : pos + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += length
    if not syntax or syntax in _PYDICOM_ONLY:
        return None
    implicit = syntax == _IMPLICIT_LE
    raw: dict[int, bytes] = {}
    encoding = "latin-1"
    while True:
        if pos + 8 > end:
            if whole:
                break
            return None
        group, elem = _TAG(data, pos)
        tag = group << 16 | elem
        if tag > last_tag:
            break
        if implicit:
            length, pos = _U32(data, pos + 4)[0], pos + 8
        elif data[pos + 4 : pos + 6] in LONG_VRS:
            length, pos = _U32(data, pos + 8)[0], pos + 12
        else:
            length, pos = _U16(data, pos + 6)[0], pos + 8
        if length == 0xFFFFFFFF or pos + length > end:
            return None
        if tag == _CHARSET_TAG:
            charset = data[pos : pos + length].strip(b"\0 ")
            if charset not in _ENCODINGS:
                return None
            encoding = _ENCODINGS[charset]
        elif tag in wanted:
            raw[tag] = data[pos : pos + length]
        pos += length
    values: list = [None] * len(COLUMNS)
    for tag, i in wanted.items():
        value = raw.get(tag)
        text = value.decode(encoding, "replace").strip("\0 ") if value else ""
        values[i] = _int(text) if COLUMNS[i][0] in _INT_COLUMNS else text
    return (syntax, *values)


def read_header(path: str) -> tuple[str, tuple | str]:
    """Read one file's indexed tags: (path, row values) or (path, problem reason)."""
    try:
        values = fast_header(path)
    except OSError as exc:
        return path, f"unreadable: {exc.strerror or exc}"
    except Exception:
        values = None  # a malformed header: let pydicom judge it
    if values is not None:
        if not values[1 + TAGS.index("SOPInstanceUID")]:
            return path, "not a DICOM instance (no SOP Instance UID)"
        return path, values
    return path, pydicom_header(path)


def pydicom_header(path: str) -> tuple | str:
    """The indexed tags read by pydicom, or the reason the file is not usable."""
    import pydicom

    try:
        with warnings.catch_warnings():
            # A damaged file is reported as a problem; its warnings would only be noise.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
    except pydicom.errors.InvalidDicomError:
        return "not a DICOM file (no DICM preamble)"
    except Exception as exc:  # pydicom raises many types for damaged files
        return f"unreadable: {type(exc).__name__}: {exc}"[:300]
    try:
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta else ""
        values = []
        for column, keyword in COLUMNS:
            raw = ds.get(keyword)
            values.append(_int(raw) if column in _INT_COLUMNS else _text(raw))
    except Exception as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"[:300]
    if not values[TAGS.index("SOPInstanceUID")]:
        return "not a DICOM instance (no SOP Instance UID)"
    return (syntax, *values)


def _read_chunk(paths: list[str]) -> list[tuple[str, tuple | str]]:
    return [read_header(p) for p in paths]


def _walk(
    root: str, unreadable: list[tuple[str, str]] | None = None
) -> Iterator[tuple[str, int, int]]:
    """Yield (relative path, size, mtime_ns) of every regular file under root.

    A root that cannot be read raises `OSError`; a sub-folder that cannot be read is
    added to `unreadable` as (relative path, reason) and skipped.
    """
    os.scandir(root).close()  # an unreadable root is an error, not an empty folder
    stack = [root]
    skip = {
        INDEX_NAME,
        INDEX_NAME + "-journal",
        INDEX_NAME + "-wal",
        INDEX_NAME + "-shm",
    }
    cut = len(root) + 1
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as exc:
            if unreadable is not None:
                unreadable.append((current[cut:], exc.strerror or str(exc)))
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file():
                    if entry.name in skip or entry.name.startswith(".courier-probe-"):
                        continue
                    st = entry.stat()
                    yield entry.path[cut:], st.st_size, st.st_mtime_ns
            except OSError:
                continue


def folder_is_writable(folder: Path) -> bool:
    """Probe by creating a file: honest for root on read-only mounts and chattr +i."""
    probe = folder / f".courier-probe-{uuid.uuid4().hex}"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink(missing_ok=True)
    return True


def index_path_for(folder: Path) -> Path:
    """Where the index of `folder` lives (see the module docstring)."""
    inside = folder / INDEX_NAME
    if folder_is_writable(folder):
        return inside
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:24]
    out = private_dir(Path(settings.DATA_DIR) / "indexes")
    return out / f"{digest}.sqlite3"


class FolderIndex:
    """The index of one folder. Open it, `scan()` it, query it with `connect()`."""

    def __init__(self, folder: str | Path, index_path: Path | None = None):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder")
        self.path = index_path or index_path_for(self.folder)
        # Patient names and IDs: 0600, also inside a folder others may read.
        private_sqlite(self.path)
        with self.connect() as db:
            db.executescript(SCHEMA)

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        return db

    # -- state ---------------------------------------------------------------------
    def last_scan(self) -> float | None:
        with self.connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key='last_scan'").fetchone()
        return float(row[0]) if row else None

    def is_stale(self, max_age: float) -> bool:
        last = self.last_scan()
        return last is None or time.time() - last > max_age

    def counts(self) -> dict[str, int]:
        with self.connect() as db:
            files = db.execute("SELECT count(*) FROM files").fetchone()[0]
            problems = db.execute("SELECT count(*) FROM problems").fetchone()[0]
        return {"instances": files, "problems": problems}

    def problems(self, limit: int = 1000) -> list[tuple[str, str]]:
        with self.connect() as db:
            rows = db.execute(
                "SELECT path, reason FROM problems ORDER BY path LIMIT ?", (limit,)
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    # -- scanning ------------------------------------------------------------------
    def scan(
        self,
        progress: Callable[[int, int], None] | None = None,
        *,
        workers: int | None = None,
    ) -> ScanReport:
        """Bring the index up to date with the folder; see the module docstring.

        `progress(done, total)` is called as headers are read (total = files to read).
        """
        start = time.perf_counter()
        report = ScanReport()
        root = str(self.folder)
        with self.connect() as db:
            known: dict[str, tuple[int, int]] = {
                r[0]: (r[1], r[2])
                for r in db.execute("SELECT path, size, mtime_ns FROM files")
            }
            known_problems: dict[str, tuple[int, int]] = {
                r[0]: (r[1], r[2])
                for r in db.execute("SELECT path, size, mtime_ns FROM problems")
            }
        to_read: list[str] = []
        stats: dict[str, tuple[int, int]] = {}
        indexed: set[str] = set()  # files read again that were in the index
        unreadable: list[tuple[str, str]] = []
        for rel, size, mtime in _walk(root, unreadable):
            report.seen += 1
            if rel in known:
                indexed.add(rel)
            was = known.pop(rel, None) or known_problems.pop(rel, None)
            if was == (size, mtime):
                report.unchanged += 1
                indexed.discard(rel)
                continue
            stats[rel] = (size, mtime)
            to_read.append(rel)
        # What was indexed under a folder that cannot be read now is kept (it may
        # be a passing permission problem); the folder is listed as a problem.
        for rel, _ in unreadable:
            inside = rel + os.sep
            for table in (known, known_problems):
                for path in [p for p in table if p.startswith(inside)]:
                    del table[path]
        vanished = list(known) + list(known_problems)
        report.removed = len(vanished)

        with self.connect() as db:
            db.execute("PRAGMA synchronous=OFF")
            if vanished:
                db.executemany("DELETE FROM files WHERE path=?", ((p,) for p in known))
                db.executemany(
                    "DELETE FROM problems WHERE path=?", ((p,) for p in known_problems)
                )
            placeholders = ", ".join("?" * (len(COLUMNS) + 4))
            insert = (
                f"INSERT OR REPLACE INTO files (path, size, mtime_ns, transfer_syntax, "
                f"{', '.join(c for c, _ in COLUMNS)}) VALUES ({placeholders})"
            )
            done = 0
            for results in self._read_all(root, to_read, workers):
                rows, bad = [], []
                for path, value in results:
                    rel = path[len(root) + 1 :]
                    size, mtime = stats[rel]
                    if isinstance(value, str):
                        bad.append((rel, size, mtime, value))
                        report.not_dicom += 1
                    else:
                        rows.append((rel, size, mtime, *value))
                        if rel in indexed:
                            report.updated += 1
                        else:
                            report.added += 1
                db.executemany(insert, rows)
                if rows:
                    db.executemany(
                        "DELETE FROM problems WHERE path=?", ((r[0],) for r in rows)
                    )
                if bad:
                    db.executemany(
                        "DELETE FROM files WHERE path=?", ((b[0],) for b in bad)
                    )
                    db.executemany(
                        "INSERT OR REPLACE INTO problems VALUES (?, ?, ?, ?)", bad
                    )
                # Commit per chunk: queries are not blocked by a long first build.
                db.commit()
                done += len(results)
                if progress:
                    progress(done, len(to_read))
            db.executemany(
                "INSERT OR REPLACE INTO problems VALUES (?, 0, 0, ?)",
                (
                    (rel + os.sep, f"folder cannot be read: {reason}")
                    for rel, reason in unreadable
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('last_scan', ?)",
                (str(time.time()),),
            )
            report.problems = [
                (r[0], r[1])
                for r in db.execute("SELECT path, reason FROM problems ORDER BY path")
            ]
        report.seconds = time.perf_counter() - start
        return report

    def _read_all(
        self, root: str, rels: list[str], workers: int | None
    ) -> Iterator[list[tuple[str, tuple | str]]]:
        paths = [os.path.join(root, r) for r in rels]
        chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
        workers = workers if workers is not None else (os.cpu_count() or 1)
        if workers <= 1 or len(paths) < _POOL_THRESHOLD:
            for chunk in chunks:
                yield _read_chunk(chunk)
            return
        # Header parsing is CPU-bound Python: processes, not threads.
        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield from pool.map(_read_chunk, chunks)


# -- matching ----------------------------------------------------------------------


def like_pattern(value: str) -> tuple[str, bool]:
    """Turn a DICOM wildcard value (`*`, `?`) into a LIKE pattern with `\\` escapes.

    Return (pattern, has_wildcards); without wildcards the value is an exact match.
    """
    out = []
    wild = False
    for ch in value:
        if ch == "*":
            out.append("%")
            wild = True
        elif ch == "?":
            out.append("_")
            wild = True
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out), wild


def text_condition(
    column: str, value: str, *, case_insensitive: bool
) -> tuple[str, list]:
    """SQL for one wildcard-aware text filter."""
    pattern, wild = like_pattern(value)
    if wild or case_insensitive:
        # LIKE is case-insensitive for ASCII in sqlite; an exact value is matched
        # case-sensitively unless asked otherwise, as DICOM single-value matching is.
        if case_insensitive:
            return f"{column} LIKE ? ESCAPE '\\'", [pattern]
        return f"{column} GLOB ?", [_glob_pattern(value)]
    return f"{column} = ?", [value]


def _glob_pattern(value: str) -> str:
    """`*` and `?` stay wildcards; GLOB's own `[` is escaped as a class."""
    return "".join("[[]" if ch == "[" else ch for ch in value)
