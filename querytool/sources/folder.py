"""A local folder as a query source: a DICOMweb target with a `file://` URL.

Searches are answered from the folder's sqlite index (`querytool.index`), which is
rescanned incrementally first when the last scan is older than
`COURIER_INDEX_MAX_AGE` seconds. Retrieval copies the indexed files.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from django.conf import settings

from querytool.index import INDEX_NAME, FolderIndex, text_condition
from targets.paths import UnsafePath, inside

from . import (
    Criteria,
    ProgressCallback,
    RetrieveRequest,
    RetrieveResult,
    Series,
    SeriesFolders,
    Source,
    SourceError,
    Study,
    StudySearch,
)


def folder_of(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise SourceError(f"{url} is not a file:// URL.")
    return Path(unquote(parsed.path))


class FolderSource(Source):
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

    def rescan(self, progress=None):
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
        """Counts, last scan and unreadable files of the index, for the page."""
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
            add(
                text_condition(
                    "patient_name", criteria.patient_name, case_insensitive=True
                )
            )
        if criteria.accessions:
            add(
                text_condition(
                    "accession", criteria.accessions[0], case_insensitive=False
                )
            )
        if criteria.study_description:
            add(
                text_condition(
                    "study_description",
                    criteria.study_description,
                    case_insensitive=True,
                )
            )
        if criteria.study_uid:
            add(("study_uid = ?", [criteria.study_uid]))
        if criteria.date_from:
            add(("study_date >= ?", [criteria.date_from.strftime("%Y%m%d")]))
        if criteria.date_to:
            add(("study_date <= ?", [criteria.date_to.strftime("%Y%m%d")]))
        if criteria.modality:
            add(
                (
                    "study_uid IN (SELECT study_uid FROM files WHERE modality = ?)",
                    [criteria.modality.upper()],
                )
            )
        sql = (
            "SELECT study_uid, max(patient_id), max(patient_name), max(birth_date), "
            "max(study_date), max(study_time), max(accession), max(study_description), "
            "group_concat(DISTINCT modality), count(DISTINCT series_uid), count(*) "
            "FROM files"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " GROUP BY study_uid ORDER BY max(study_date) DESC, study_uid LIMIT ?"
        )
        with index.connect() as db:
            rows = db.execute(sql, [*args, limit + 1]).fetchall()
        studies = [
            Study(
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

    def find_series(self, study_uid: str) -> list[Series]:
        index = self.fresh_index()
        with self._guard(), index.connect() as db:
            rows = db.execute(
                "SELECT series_uid, max(series_number), max(modality), "
                "max(series_description), count(*) FROM files WHERE study_uid = ? "
                "GROUP BY series_uid ORDER BY max(series_number), series_uid",
                (study_uid,),
            ).fetchall()
        return [
            Series(
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
        self, request: RetrieveRequest, dest: Path, progress: ProgressCallback
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
