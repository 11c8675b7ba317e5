"""The query contract: what a kind that can be queried implements.

A queryable target hands out a `QuerySource` (`target.query_source()`): find studies
and series, and retrieve them. The kinds implement it in their own packages (DICOM:
C-FIND / C-GET / C-MOVE; DICOMweb: QIDO-RS / WADO-RS, or the local-folder index for a
`file://` URL); the query tool only uses it. Sources raise `SourceError` with a
message in words (never a secret) for anything the page shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from targets.paths import inside, plain_name, uid_part

if TYPE_CHECKING:
    from targets.kinds.dicomweb.index import ScanReport
    from targets.models import Target


class SourceError(Exception):
    """A query or retrieve failed; the message is shown to the user as is."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Cancelled(Exception):
    """The retrieval was cancelled by the user."""


@dataclass
class Criteria:
    """What to search for. Empty fields do not restrict the search."""

    patient_id: str = ""
    patient_name: str = ""
    accessions: list[str] = field(default_factory=list)
    date_from: date | None = None
    date_to: date | None = None
    modality: str = ""
    study_description: str = ""
    study_uid: str = ""

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("date_from", "date_to"):
            out[key] = out[key].isoformat() if out[key] else None
        return {k: v for k, v in out.items() if v}

    @property
    def date_range(self) -> str:
        """The DICOM range form: YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD- or ''."""
        if not self.date_from and not self.date_to:
            return ""
        lo = self.date_from.strftime("%Y%m%d") if self.date_from else ""
        hi = self.date_to.strftime("%Y%m%d") if self.date_to else ""
        if lo and lo == hi:
            return lo
        return f"{lo}-{hi}"

    def for_accession(self, accession: str) -> Criteria:
        """A copy restricted to one accession number."""
        return Criteria(**{**self.__dict__, "accessions": [accession]})


@dataclass
class FoundStudy:
    """A study as a source lists it."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    description: str = ""
    modalities: list[str] = field(default_factory=list)
    series_count: int | None = None
    instance_count: int | None = None


@dataclass
class FoundSeries:
    """A series of a study as a source lists it."""

    series_uid: str
    study_uid: str
    number: int | None = None
    modality: str = ""
    description: str = ""
    instance_count: int | None = None


@dataclass
class StudySearch:
    studies: list[FoundStudy] = field(default_factory=list)
    # More matches exist than the limit let through.
    truncated: bool = False
    # Accessions of the list that matched nothing, in the order given.
    missing_accessions: list[str] = field(default_factory=list)


@dataclass
class RetrieveRequest:
    """What to pull: a whole study, or some of its series."""

    study_uid: str
    series_uids: list[str] = field(default_factory=list)
    # DICOM only: ask the source to C-MOVE to this AE title instead of C-GET.
    move_aet: str = ""


@dataclass
class RetrieveResult:
    completed: int = 0
    failed: int = 0
    warnings: int = 0
    # The source's final word, e.g. "partial: 2 sub-operations failed".
    message: str = ""
    # Folders written (one per series) when the instances came to Courier.
    series_folders: list[Path] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return self.failed > 0


# Called with (done, total, failed) as instances arrive; total may be None.
# It raises `Cancelled` when the user cancelled the retrieval.
RetrieveProgress = Callable[[int, "int | None", int], None]


class QuerySource:
    """A queryable target. Subclasses implement the three operations."""

    # Whether Courier keeps an index of this source (a local folder): the query page
    # then shows the index's counts and offers a rescan.
    indexed: ClassVar[bool] = False

    def __init__(self, target: Target):
        self.target = target

    def find_studies(self, criteria: Criteria, limit: int) -> StudySearch:
        """Return at most `limit` studies matching `criteria`."""
        raise NotImplementedError

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        """Return the series of one study."""
        raise NotImplementedError

    def retrieve(
        self, request: RetrieveRequest, dest: Path, progress: RetrieveProgress
    ) -> RetrieveResult:
        """Fetch the instances into `dest/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`.

        With `request.move_aet` (only where the kind `can_move`) the source sends
        them elsewhere and nothing is written under `dest`.
        """
        raise NotImplementedError

    def rescan(self, progress=None) -> ScanReport:
        """Bring the source's index up to date now (`indexed` sources only)."""
        raise SourceError(f"{self.target.name} is not a local folder.")

    def index_info(self) -> dict:
        """Counts, last scan and unreadable files of the index, for the page."""
        raise SourceError(f"{self.target.name} is not a local folder.")

    # -- shared helper: a list of accessions is one search per accession ----------
    def search_accession_list(
        self,
        criteria: Criteria,
        limit: int,
        one: Callable[[Criteria, int], StudySearch],
    ) -> StudySearch:
        if len(criteria.accessions) <= 1:
            result = one(criteria, limit)
            if criteria.accessions and not result.studies:
                result.missing_accessions = list(criteria.accessions)
            return result
        out = StudySearch()
        seen: set[str] = set()
        for accession in criteria.accessions:
            found = one(criteria.for_accession(accession), limit)
            if not found.studies:
                out.missing_accessions.append(accession)
            out.truncated |= found.truncated
            for study in found.studies:
                if study.study_uid in seen:
                    continue
                seen.add(study.study_uid)
                if len(out.studies) >= limit:
                    out.truncated = True
                    continue
                out.studies.append(study)
        return out


class SeriesFolders:
    """The folders a retrieval writes: `dest/<series>/<sop>.dcm`, names from data.

    Both UIDs come from the source (a PACS holding an instance whose
    SeriesInstanceUID is `../../x` is enough): each becomes one cleaned name, and
    the folder is checked to be inside `dest` before anything is written.
    """

    def __init__(self, dest: Path):
        self.dest = dest
        self.folders: dict[str, Path] = {}

    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        """Where the instance goes (its series folder created); raise `UnsafePath`."""
        folder = self.folders.get(series_uid)
        if folder is None:
            folder = inside(self.dest, uid_part(series_uid))
            folder.mkdir(parents=True, exist_ok=True)
            self.folders[series_uid] = folder
        return folder / plain_name(uid_part(sop_uid) + ".dcm")

    def written(self) -> list[Path]:
        return list(self.folders.values())
