"""The local-folder index: a sqlite file of DICOM headers, updated incrementally.

It lives in the folder (`.courier-index.sqlite3`) when Courier can write there, else in
`DATA_DIR/indexes/<hash of the folder path>.sqlite3`. Tables: `files` (one row per
instance), `problems` (files that are not DICOM or cannot be read, with the reason),
`dirs` (one row per folder with a digest of its files' names, sizes and modification
times) and `studies` (one row per study, what searches read).

A scan lists every folder and `stat`s every file in it. A folder whose digest is the
one stored is unchanged and needs no look at its rows, so rescanning an unchanged
folder costs one `stat` per file and one digest per folder; in a folder that changed,
the files are compared with their rows (size and modification time, as rsync's quick
check) and new or changed ones are read, vanished ones deleted. A file that could not
be opened (permissions) is tried again at every scan; other problems are not read
again until the file changes. Searches go to `studies`, kept up to date by the scan
for the studies it touched.

Why not skip the `stat`s of a folder whose own modification time is unchanged: that
time changes when a name is added, removed or renamed in the folder, not when a file
is rewritten in place (`cp` over a file, `dcmodify`, a PACS re-export), so such a
shortcut would miss changed files. It would be safe only for folders whose files are
written once under a new name (a temporary name then `rename`), which Courier cannot
know of a folder it did not write. What the quick check cannot see either: a file
rewritten with the same size whose old modification time is put back (`cp -p`,
`touch -r`); delete the index to read everything again.
"""

# Why this module is long: the index's schema and its incremental scan change
# together.

from __future__ import annotations

import functools
import hashlib
import os
import queue
import sqlite3
import threading
import time
import uuid
import warnings
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from targets.dicomnet import load_pydicom
from targets.dicomnet.check import CorruptDataset, NotPart10, read_file
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

SCHEMA_VERSION = "2"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    transfer_syntax TEXT NOT NULL DEFAULT '',
    {", ".join(f"{c} {'INTEGER' if c in _INT_COLUMNS else 'TEXT'}" for c, _ in COLUMNS)},
    dir_id INTEGER
);
CREATE TABLE IF NOT EXISTS problems (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dir_id INTEGER
);
CREATE TABLE IF NOT EXISTS dirs (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    digest BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT,
    patient_name TEXT,
    name_key TEXT,
    birth_date TEXT,
    study_date TEXT,
    study_time TEXT,
    accession TEXT,
    study_description TEXT,
    description_key TEXT,
    modalities TEXT,
    series_count INTEGER,
    instance_count INTEGER
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# After an index of version 1 got its dir_id columns. The instance-level indexes on
# patient, accession and date went: searches read `studies`. `studies_by_date` holds
# the folded texts so that a search for "*knee*", newest first, walks the index
# alone and stops at the limit (a term no study has: the whole index, 0.15 s for a
# million studies, where a walk reading every row took 2.5 s).
INDEXES = """
CREATE INDEX IF NOT EXISTS files_study ON files (study_uid);
CREATE INDEX IF NOT EXISTS files_dir ON files (dir_id);
CREATE INDEX IF NOT EXISTS problems_dir ON problems (dir_id);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id);
CREATE INDEX IF NOT EXISTS studies_name ON studies (name_key);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession);
CREATE INDEX IF NOT EXISTS studies_by_date
    ON studies (study_date, study_uid, description_key, name_key);
CREATE INDEX IF NOT EXISTS studies_description ON studies (description_key);
DROP INDEX IF EXISTS files_series;
DROP INDEX IF EXISTS files_patient;
DROP INDEX IF EXISTS files_accession;
DROP INDEX IF EXISTS files_date;
"""
# One row per study from its instances; `fold` is `str.lower` (Unicode-aware, where
# sqlite's own LIKE folds ASCII only), registered on every connection.
_STUDY_ROWS = (
    "INSERT OR REPLACE INTO studies SELECT study_uid, max(patient_id), "
    "max(patient_name), fold(max(patient_name)), max(birth_date), max(study_date), "
    "max(study_time), max(accession), max(study_description), "
    "fold(max(study_description)), group_concat(DISTINCT modality), "
    "count(DISTINCT series_uid), count(*) FROM files "
)
# The reason of a file that could not be opened: tried again at every scan.
CANNOT_READ = "cannot be read: "
_SKIP = {INDEX_NAME, *(INDEX_NAME + s for s in ("-journal", "-wal", "-shm"))}

# Below this many files to read, a process pool costs more than it saves.
_POOL_THRESHOLD = 2000
_CHUNK = 500
# Threads listing folders in a scan (see `_walk`): two, one in a system call while
# the other runs Python; more only fight over the GIL (a 1M-file walk: 4 threads
# cost 20-25 % more CPU than 1 or 2).
_WALK_THREADS = 2


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
    load_pydicom()  # the package first: index threads race here (load_pydicom)
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
# Each file is read by `targets.dicomnet.check.read_file`, the one element walker
# (the send path and the receiver use it too): the preamble, the file meta and
# every element header of the dataset, in any transfer syntax, sequences and UN of
# undefined length included, keeping the raw values of the indexed tags. A file the
# walk cannot take to its end (truncated, not DICOM past its header) is a problem
# named with the walk's reason: Courier would refuse to send it. pydicom decodes
# only what the walk cannot: text in a character set other than the default,
# Latin-1 or UTF-8 (pydicom costs about 0.6 ms per file even with `specific_tags`,
# the walk 0.05 ms).

_CHARSET_TAG = 0x00080005
# A file whose sequences nest deeper than Python's recursion limit (as for a send,
# `targets.series.TOO_DEEP`).
TOO_DEEP = (
    "corrupt DICOM: its sequences nest too deeply to be checked (hundreds of levels)"
)
_ENCODINGS = {
    b"": "latin-1",
    b"ISO_IR 6": "latin-1",
    b"ISO_IR 100": "latin-1",
    b"ISO_IR 192": "utf-8",
}


@functools.cache
def _wanted() -> tuple[dict[int, int], frozenset[int]]:
    """The indexed tags (tag -> column index), and the tags the walk keeps.

    Looked up on first use: this module loads with the URLconf, and pydicom (numpy
    with it) costs most of a second to processes that never index a folder.
    """
    load_pydicom()  # the package first (load_pydicom)
    from pydicom.datadict import tag_for_keyword

    wanted = {int(tag_for_keyword(k)): i for i, (_, k) in enumerate(COLUMNS)}
    return wanted, frozenset(wanted) | {_CHARSET_TAG}


def fast_header(path: str) -> tuple | None:
    """The indexed tags of a Part 10 file, read by the element walker; None when
    pydicom must decode the text (another character set).

    Raise `NotPart10`, `CorruptDataset` (the file is not whole) or `OSError`.
    """
    wanted, tags = _wanted()
    head = read_file(path, tags, ordered=False, remember=False)
    raw = head.values
    encoding = _ENCODINGS.get(raw.get(_CHARSET_TAG, b"").strip(b"\0 "))
    if encoding is None:
        return None
    values: list = [None] * len(COLUMNS)
    for tag, i in wanted.items():
        value = raw.get(tag)
        text = value.decode(encoding, "replace").strip("\0 ") if value else ""
        values[i] = _int(text) if COLUMNS[i][0] in _INT_COLUMNS else text
    return (head.transfer_syntax, *values)


def read_header(path: str) -> tuple[str, tuple | str]:
    """Read one file's indexed tags: (path, row values) or (path, problem reason)."""
    try:
        values = fast_header(path)
    except NotPart10:
        return path, "not a DICOM file (no DICM preamble)"
    except CorruptDataset as exc:
        return path, f"corrupt DICOM: {exc}"[:300]
    except RecursionError:  # valid DICOM, but the walk recurses once per level
        return path, TOO_DEEP
    except OSError as exc:
        return path, f"{CANNOT_READ}{exc.strerror or exc}"
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
    except OSError as exc:
        return f"{CANNOT_READ}{exc.strerror or exc}"
    except Exception as exc:  # pydicom raises many types for damaged files
        return f"not readable as DICOM: {type(exc).__name__}: {exc}"[:300]
    try:
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta else ""
        values = []
        for column, keyword in COLUMNS:
            raw = ds.get(keyword)
            values.append(_int(raw) if column in _INT_COLUMNS else _text(raw))
    except Exception as exc:
        return f"not readable as DICOM: {type(exc).__name__}: {exc}"[:300]
    if not values[TAGS.index("SOPInstanceUID")]:
        return "not a DICOM instance (no SOP Instance UID)"
    return (syntax, *values)


def _read_chunk(paths: list[str]) -> list[tuple[str, tuple | str]]:
    return [read_header(p) for p in paths]


def _walk(
    root: str, unreadable: list[tuple[str, str]], threads: int = 0
) -> Iterator[tuple[str, list[str], array, bytes]]:
    """Yield (relative folder, the names of its regular files, their sizes and
    modification times as one array [size, mtime_ns, size, ...], their digest) for
    every folder under `root` (`root` itself as ""), in no fixed order.

    A root that cannot be read raises `OSError`; a sub-folder that cannot be read is
    added to `unreadable` as (relative path, reason) and skipped. The index's own
    files and Courier's write probes are not listed. The digest covers the names,
    sizes and times in listing order (stable while the folder does not change; a
    different order only costs a look at the folder's rows).

    Folders are listed on `threads` threads (default `_WALK_THREADS`): the `stat`
    calls, most of a rescan, release the GIL, so one thread's system calls overlap
    another's Python; the same CPU time, less wall time (bench/RESULTS.md).
    """
    os.scandir(root).close()  # an unreadable root is an error, not an empty folder
    work: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    done: queue.SimpleQueue[tuple] = queue.SimpleQueue()

    def lister() -> None:
        while (rel := work.get()) is not None:
            try:
                done.put(_list_folder(root, rel))
            except OSError as exc:
                done.put((rel, exc.strerror or str(exc)))
            except BaseException as exc:  # raised again on the calling thread
                done.put((rel, exc))

    listers = [
        threading.Thread(target=lister, name=f"index-walk-{n}", daemon=True)
        for n in range(threads or _WALK_THREADS)
    ]
    for thread in listers:
        thread.start()
    try:
        work.put("")
        outstanding = 1
        while outstanding:
            item = done.get()
            outstanding -= 1
            if len(item) == 2:
                if isinstance(item[1], BaseException):
                    raise item[1]
                unreadable.append(item)
                continue
            rel, names, stats, digest, subfolders = item
            for sub in subfolders:
                work.put(sub)
            outstanding += len(subfolders)
            yield rel, names, stats, digest
    finally:
        for _ in listers:
            work.put(None)


def _list_folder(root: str, rel: str) -> tuple[str, list[str], array, bytes, list]:
    """One folder for `_walk`: (rel, names, stats, digest, sub-folders)."""
    names: list[str] = []
    stats = array("q")
    subfolders: list[str] = []
    # Listed by descriptor: each stat is then relative to the folder (fstatat), not
    # a lookup of the whole path again.
    fd = os.open(os.path.join(root, rel), os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as listing:
            for entry in listing:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        name = entry.name
                        subfolders.append(f"{rel}/{name}" if rel else name)
                    elif entry.is_file():
                        name = entry.name
                        if name[0] == "." and (
                            name in _SKIP or name.startswith(".courier-probe-")
                        ):
                            continue
                        st = entry.stat()
                        names.append(name)
                        stats.append(st.st_size)
                        stats.append(st.st_mtime_ns)
                except OSError:
                    continue  # gone since the listing
    finally:
        os.close(fd)
    digest = hashlib.blake2b(
        "\0".join(names).encode("utf-8", "surrogateescape"), digest_size=16
    )
    digest.update(stats)
    return rel, names, stats, digest.digest(), subfolders


def _within(path: str, folders: set[str]) -> bool:
    """Whether `path` is one of `folders` or below one of them."""
    while path:
        if path in folders:
            return True
        path = path.rpartition("/")[0]
    return "" in folders


def _fold(value):
    return value.lower() if isinstance(value, str) else value


def _upgrade(db: sqlite3.Connection) -> None:
    """Create the tables, or bring an index of an earlier version up to this one
    (the rows stay; the first scan after it fills in their folders)."""
    db.isolation_level = None
    db.execute("BEGIN IMMEDIATE")  # one process upgrades; the others wait, then see it
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        for table in ("files", "problems"):
            columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if "dir_id" not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN dir_id INTEGER")
        for statement in INDEXES.split(";"):
            if statement.strip():
                db.execute(statement)
        version = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            _refresh_studies(db, None)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,)
            )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _refresh_studies(db: sqlite3.Connection, uids: set[str] | None) -> None:
    """Make the `studies` rows of `uids` (all studies if None) from their files."""
    if uids is None:
        db.execute("DELETE FROM studies")
        db.execute(_STUDY_ROWS + "GROUP BY study_uid")
        return
    batch = list(uids)
    for i in range(0, len(batch), 500):
        part = batch[i : i + 500]
        marks = ", ".join("?" * len(part))
        db.execute(f"DELETE FROM studies WHERE study_uid IN ({marks})", part)
        db.execute(
            _STUDY_ROWS + f"WHERE study_uid IN ({marks}) GROUP BY study_uid", part
        )


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
        db = self.connect()
        try:
            version = None
            if db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                version = db.execute(
                    "SELECT value FROM meta WHERE key='schema'"
                ).fetchone()
            if version is None or version[0] != SCHEMA_VERSION:
                _upgrade(db)
        finally:
            db.close()

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        db.create_function("fold", 1, _fold, deterministic=True)
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
            dirs: dict[str, tuple[int, bytes]] = {
                r[1]: (r[0], r[2])
                for r in db.execute("SELECT id, path, digest FROM dirs")
            }
            retry = {
                r[0]
                for r in db.execute(
                    "SELECT path FROM problems WHERE reason LIKE ?",
                    (CANNOT_READ + "%",),
                )
            }
            # Rows from before folders had digests (an index of version 1).
            orphans = any(
                db.execute(
                    f"SELECT 1 FROM {table} WHERE dir_id IS NULL LIMIT 1"
                ).fetchone()
                for table in ("files", "problems")
            )
        retry_dirs = {p.rpartition("/")[0] for p in retry}
        unreadable: list[tuple[str, str]] = []
        changed: list[tuple[str, int | None, list[tuple[str, int, int]], bytes]] = []
        for rel, names, stats, digest in _walk(root, unreadable):
            report.seen += len(names)
            known = dirs.pop(rel, None)
            if known is not None and known[1] == digest and rel not in retry_dirs:
                report.unchanged += len(names)
                continue
            files = list(zip(names, stats[0::2], stats[1::2], strict=True))
            changed.append((rel, known[0] if known else None, files, digest))
        # What was indexed under a folder that cannot be read now is kept (it may
        # be a passing permission problem); the folder is listed as a problem.
        blocked = {rel for rel, _ in unreadable}
        gone = [
            dir_id for path, (dir_id, _) in dirs.items() if not _within(path, blocked)
        ]

        with self.connect() as db:
            db.execute("PRAGMA synchronous=OFF")
            touched: set[str] = set()  # studies whose row must be made again
            for dir_id in gone:
                touched.update(
                    r[0]
                    for r in db.execute(
                        "SELECT DISTINCT study_uid FROM files WHERE dir_id=?", (dir_id,)
                    )
                )
                for table in ("files", "problems"):
                    report.removed += db.execute(
                        f"DELETE FROM {table} WHERE dir_id=?", (dir_id,)
                    ).rowcount
                db.execute("DELETE FROM dirs WHERE id=?", (dir_id,))

            to_read: dict[str, tuple[int, int, int]] = {}  # path: size, mtime, dir
            was_study: dict[str, str] = {}  # indexed files read again: their study
            adopted: list[tuple[int, str]] = []
            settled: list[tuple[bytes, int]] = []
            for rel, dir_id, files, digest in changed:
                if dir_id is None:
                    # The digest is written when every file of the folder is in.
                    dir_id = db.execute(
                        "INSERT INTO dirs (path, digest) VALUES (?, ?)", (rel, b"")
                    ).lastrowid
                    rows = self._rows_by_path(db, rel, files) if orphans else {}
                else:
                    rows = self._rows_of_dir(db, dir_id)
                for name, size, mtime in files:
                    path = f"{rel}/{name}" if rel else name
                    was = rows.pop(path, None)
                    if (
                        was is not None
                        and was[:2] == (size, mtime)
                        and path not in retry
                    ):
                        report.unchanged += 1
                        if was[3] != dir_id:
                            adopted.append((dir_id, path))
                        continue
                    to_read[path] = (size, mtime, dir_id)
                    if was is not None and was[2] is not None:
                        was_study[path] = was[2]
                for path, was in rows.items():  # vanished from a folder still there
                    report.removed += 1
                    if was[2] is None:
                        db.execute("DELETE FROM problems WHERE path=?", (path,))
                    else:
                        touched.add(was[2])
                        db.execute("DELETE FROM files WHERE path=?", (path,))
                settled.append((digest, dir_id))
            for table in ("files", "problems"):
                db.executemany(f"UPDATE {table} SET dir_id=? WHERE path=?", adopted)
            if orphans:
                touched |= self._drop_orphans(db, blocked, report)

            placeholders = ", ".join("?" * (len(COLUMNS) + 5))
            insert = (
                f"INSERT OR REPLACE INTO files (path, size, mtime_ns, transfer_syntax, "
                f"{', '.join(c for c, _ in COLUMNS)}, dir_id) VALUES ({placeholders})"
            )
            study_at = 1 + TAGS.index("StudyInstanceUID")
            done = 0
            for results in self._read_all(root, list(to_read), workers):
                rows, bad = [], []
                for path, value in results:
                    rel = path[len(root) + 1 :]
                    size, mtime, dir_id = to_read[rel]
                    old = was_study.get(rel)
                    if old is not None:
                        touched.add(old)
                    if isinstance(value, str):
                        bad.append((rel, size, mtime, value, dir_id))
                        report.not_dicom += 1
                    else:
                        rows.append((rel, size, mtime, *value, dir_id))
                        touched.add(value[study_at])
                        if old is not None:
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
                        "INSERT OR REPLACE INTO problems VALUES (?, ?, ?, ?, ?)", bad
                    )
                _refresh_studies(db, touched)
                touched.clear()
                # Commit per chunk: queries are not blocked by a long first build.
                db.commit()
                done += len(results)
                if progress:
                    progress(done, len(to_read))
            _refresh_studies(db, touched)
            db.executemany("UPDATE dirs SET digest=? WHERE id=?", settled)
            # Folder problems end with a separator: made again at every scan.
            db.execute("DELETE FROM problems WHERE dir_id IS NULL AND path LIKE '%/'")
            db.executemany(
                "INSERT OR REPLACE INTO problems VALUES (?, 0, 0, ?, NULL)",
                (
                    (f"{rel}/", f"folder cannot be read: {reason}")
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

    @staticmethod
    def _rows_of_dir(db: sqlite3.Connection, dir_id: int) -> dict[str, tuple]:
        """path: (size, mtime_ns, study_uid or None for a problem, dir_id)."""
        rows = {
            r[0]: (r[1], r[2], None, dir_id)
            for r in db.execute(
                "SELECT path, size, mtime_ns FROM problems WHERE dir_id=?", (dir_id,)
            )
        }
        for r in db.execute(
            "SELECT path, size, mtime_ns, study_uid FROM files WHERE dir_id=?",
            (dir_id,),
        ):
            rows[r[0]] = (r[1], r[2], r[3], dir_id)
        return rows

    @staticmethod
    def _rows_by_path(
        db: sqlite3.Connection, rel: str, files: list[tuple[str, int, int]]
    ) -> dict[str, tuple]:
        """As `_rows_of_dir`, for a folder without a row yet: by the files' paths."""
        paths = [f"{rel}/{f[0]}" if rel else f[0] for f in files]
        rows: dict[str, tuple] = {}
        for i in range(0, len(paths), 500):
            part = paths[i : i + 500]
            marks = ", ".join("?" * len(part))
            for r in db.execute(
                f"SELECT path, size, mtime_ns, dir_id FROM problems WHERE path IN ({marks})",
                part,
            ):
                rows[r[0]] = (r[1], r[2], None, r[3])
            for r in db.execute(
                f"SELECT path, size, mtime_ns, study_uid, dir_id FROM files "
                f"WHERE path IN ({marks})",
                part,
            ):
                rows[r[0]] = (r[1], r[2], r[3], r[4])
        return rows

    @staticmethod
    def _drop_orphans(
        db: sqlite3.Connection, blocked: set[str], report: ScanReport
    ) -> set[str]:
        """Delete rows without a folder that no folder claimed in this scan (their
        file is gone), except under folders that cannot be read; return the studies."""
        studies = set()
        for table, study in (("files", "study_uid"), ("problems", "NULL")):
            gone = [
                (r[0], r[1])
                for r in db.execute(
                    f"SELECT path, {study} FROM {table} WHERE dir_id IS NULL "
                    "AND path NOT LIKE '%/'"
                )
                if not _within(r[0].rpartition("/")[0], blocked)
            ]
            db.executemany(f"DELETE FROM {table} WHERE path=?", ((p,) for p, _ in gone))
            report.removed += len(gone)
            studies.update(s for _, s in gone if s is not None)
        return studies

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


def folded_condition(column: str, value: str) -> tuple[str, list]:
    """SQL for a case-insensitive wildcard filter on a folded column of `studies`
    (`name_key`, `description_key`): an index serves exact values and prefixes."""
    value = _fold(value)
    if "*" in value or "?" in value:
        return f"{column} GLOB ?", [_glob_pattern(value)]
    return f"{column} = ?", [value]


def _glob_pattern(value: str) -> str:
    """`*` and `?` stay wildcards; GLOB's own `[` is escaped as a class."""
    return "".join("[[]" if ch == "[" else ch for ch in value)
