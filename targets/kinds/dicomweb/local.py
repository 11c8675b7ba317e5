"""A DICOMweb target with a `file://` URL: a local folder of DICOM files.

The proxy hands these two classes out instead of the HTTP ones for such a URL.
`LocalFolderHandler` writes each instance to
`studies/<study>/series/<series>/instances/<sop>.dcm` (the layout dicomweb-client's
`DICOMfileClient` reads). `LocalFolderQuery` answers searches from the folder's
sqlite index (`index.py`), rescanned incrementally first when the last scan is
older than `COURIER_INDEX_MAX_AGE` seconds; retrieval copies the indexed files.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.conf import settings

from targets.kinds.base import (
    FAILED,
    PRESENT,
    SENT,
    CheckReport,
    Handler,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    instance_outcome,
)
from targets.paths import UnsafePath, inside, uid_part
from targets.query import (
    Criteria,
    FoundSeries,
    FoundStudy,
    QuerySource,
    RetrieveProgress,
    RetrieveRequest,
    RetrieveResult,
    SeriesFolders,
    SourceError,
    StudySearch,
)
from targets.series import Series

from .index import (
    INDEX_NAME,
    FolderIndex,
    ScanReport,
    folded_condition,
    text_condition,
)


def folder_of(url: str) -> Path:
    """The local folder a `file://` URL names."""
    return Path(unquote(urlsplit(url or "").path))


class LocalFolderHandler(Handler):
    """Send into, and Test, the folder of a `file://` URL."""

    @property
    def folder(self) -> Path:
        return folder_of(self.target.url)

    def send(
        self,
        series: Series,
        *,
        progress: ProgressCallback | None = None,
        context: SendContext | None = None,
        connections: int | None = None,
    ) -> SendResult:
        result, report = self.start(progress)
        root = self.folder
        if not root.is_dir():
            raise TargetError(f"the folder {root} does not exist", permanent=True)
        for inst in series.instances:
            try:
                dest = inside(
                    root,
                    "studies",
                    uid_part(inst.study_uid),
                    "series",
                    uid_part(inst.series_uid),
                    "instances",
                    f"{uid_part(inst.sop_instance_uid)}.dcm",
                )
            except UnsafePath as exc:
                report(instance_outcome(inst, FAILED, str(exc)))
                continue
            if dest.is_file() and dest.stat().st_size == inst.size:
                report(instance_outcome(inst, PRESENT, "already in the folder"))
                continue
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(inst.path, "rb") as src, open(tmp, "wb") as out:
                    while block := src.read(1024 * 1024):
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise TargetError(
                    f"cannot write {dest}: {exc.strerror or exc}",
                    permanent=exc.errno in (13, 1, 30),
                ) from None
            report(instance_outcome(inst, SENT))
        return result

    def test(self) -> CheckReport:
        report = CheckReport()
        root = self.folder
        with report.check("Folder") as c:
            if not root.is_dir():
                raise TargetError(f"{root} does not exist or is not a folder")
            if not os.access(root, os.R_OK | os.X_OK):
                raise TargetError(f"{root} is not readable by Courier")
            c.message = f"{root} exists and is readable"
        if self.target.can_store and not report.stopped:
            with report.check("Writable") as c:
                probe = root / f".courier-probe-{uuid.uuid4().hex[:8]}"
                try:
                    probe.write_bytes(b"probe")
                    probe.unlink()
                except OSError as exc:
                    raise TargetError(
                        f"cannot write into {root}: {exc.strerror or exc}"
                    ) from None
                c.message = f"a file was written into {root} and removed"
        return report


class LocalFolderQuery(QuerySource):
    """Searches answered from the folder's index; retrieval copies its files."""

    indexed = True

    def __init__(self, target):
        super().__init__(target)
        self.folder = folder_of(target.url)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn file system and index errors into a `SourceError` in words."""
        try:
            yield
        except sqlite3.Error as exc:
            raise SourceError(
                f"The index of the folder {self.folder} cannot be used ({exc}): "
                f"delete {INDEX_NAME} there (or under the data folder's indexes/) "
                "and Courier builds it again."
            ) from exc
        except PermissionError as exc:
            raise SourceError(
                f"Courier cannot read the folder {self.folder}: permission denied "
                "(check the folder's permissions for the user Courier runs as)."
            ) from exc
        except OSError as exc:
            raise SourceError(
                f"The folder {self.folder} cannot be read: {exc.strerror or exc}."
            ) from exc

    def index(self) -> FolderIndex:
        if not self.folder.exists():
            raise SourceError(f"The folder {self.folder} does not exist.")
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder} is a file, not a folder.")
        with self._guard():
            return FolderIndex(self.folder)

    def rescan(self, progress=None) -> ScanReport:
        """Bring the index up to date now; return the `ScanReport`."""
        index = self.index()
        with self._guard():
            return index.scan(progress)

    def fresh_index(self) -> FolderIndex:
        index = self.index()
        with self._guard():
            if index.is_stale(settings.COURIER_INDEX_MAX_AGE):
                index.scan()
        return index

    def index_info(self) -> dict:
        index = self.index()
        with self._guard():
            return {
                **index.counts(),
                "last_scan": index.last_scan(),
                "problem_list": index.problems(limit=200),
                "path": index.path,
            }

    # -- search --------------------------------------------------------------------
    def find_studies(self, criteria: Criteria, limit: int) -> StudySearch:
        index = self.fresh_index()
        with self._guard():
            return self.search_accession_list(
                criteria, limit, lambda c, n: self._find(index, c, n)
            )

    def _find(self, index: FolderIndex, criteria: Criteria, limit: int) -> StudySearch:
        where, args = [], []

        def add(sql_args: tuple[str, list]) -> None:
            where.append(sql_args[0])
            args.extend(sql_args[1])

        if criteria.patient_id:
            add(
                text_condition(
                    "patient_id", criteria.patient_id, case_insensitive=False
                )
            )
        if criteria.patient_name:
            add(folded_condition("name_key", criteria.patient_name))
        if criteria.accessions:
            add(
                text_condition(
                    "accession", criteria.accessions[0], case_insensitive=False
                )
            )
        if criteria.study_description:
            add(folded_condition("description_key", criteria.study_description))
        if criteria.study_uid:
            add(("study_uid = ?", [criteria.study_uid]))
        if criteria.date_from:
            add(("study_date >= ?", [criteria.date_from.strftime("%Y%m%d")]))
        if criteria.date_to:
            add(("study_date <= ?", [criteria.date_to.strftime("%Y%m%d")]))
        if criteria.modality:
            add(
                (
                    "instr(',' || modalities || ',', ?) > 0",
                    [f",{criteria.modality.upper()},"],
                )
            )
        # One row per study (the index's `studies`), newest first.
        sql = (
            "SELECT study_uid, patient_id, patient_name, birth_date, study_date, "
            "study_time, accession, study_description, modalities, series_count, "
            "instance_count FROM studies"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY study_date DESC, study_uid LIMIT ?"
        )
        with index.connect() as db:
            rows = db.execute(sql, [*args, limit + 1]).fetchall()
        studies = [
            FoundStudy(
                study_uid=r[0],
                patient_id=r[1] or "",
                patient_name=r[2] or "",
                birth_date=r[3] or "",
                study_date=r[4] or "",
                study_time=r[5] or "",
                accession=r[6] or "",
                description=r[7] or "",
                modalities=sorted(m for m in (r[8] or "").split(",") if m),
                series_count=r[9],
                instance_count=r[10],
            )
            for r in rows[:limit]
        ]
        return StudySearch(studies=studies, truncated=len(rows) > limit)

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        index = self.fresh_index()
        with self._guard(), index.connect() as db:
            rows = db.execute(
                "SELECT series_uid, max(series_number), max(modality), "
                "max(series_description), count(*) FROM files WHERE study_uid = ? "
                "GROUP BY series_uid ORDER BY max(series_number), series_uid",
                (study_uid,),
            ).fetchall()
        return [
            FoundSeries(
                series_uid=r[0],
                study_uid=study_uid,
                number=r[1],
                modality=r[2] or "",
                description=r[3] or "",
                instance_count=r[4],
            )
            for r in rows
        ]

    # -- retrieve ------------------------------------------------------------------
    def retrieve(
        self, request: RetrieveRequest, dest: Path, progress: RetrieveProgress
    ) -> RetrieveResult:
        if request.move_aet:
            raise SourceError(
                "A local folder cannot C-MOVE; choose another destination."
            )
        index = self.fresh_index()
        sql = "SELECT path, series_uid, sop_instance_uid FROM files WHERE study_uid = ?"
        args: list = [request.study_uid]
        if request.series_uids:
            sql += f" AND series_uid IN ({', '.join('?' * len(request.series_uids))})"
            args += request.series_uids
        with self._guard(), index.connect() as db:
            rows = db.execute(sql + " ORDER BY path", args).fetchall()
        result = RetrieveResult()
        folders = SeriesFolders(dest)
        total = len(rows)
        progress(0, total, 0)
        for rel, series_uid, sop_uid in rows:
            try:
                # The index's paths are relative to the folder, but it is a file
                # anyone who can write the folder can edit: check it stays inside.
                shutil.copyfile(
                    inside(self.folder, rel), folders.path_for(series_uid, sop_uid)
                )
                result.completed += 1
            except UnsafePath as exc:
                result.failed += 1
                result.message = f"refused: {exc}"
            except OSError as exc:
                result.failed += 1
                result.message = f"{rel}: {exc.strerror or exc}"
            progress(result.completed, total, result.failed)
        result.series_folders = folders.written()
        if not rows:
            raise SourceError(
                "Nothing to retrieve: the study is no longer in the folder."
            )
        return result
