"""`query()` / `retrieve()` for the kinds that can be a query source.

The protocol code (C-FIND, C-GET/C-MOVE, QIDO-RS/WADO-RS, the local-folder index)
lives in `querytool.sources`, imported only when a query runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from querytool.sources import (
        Criteria,
        RetrieveRequest,
        RetrieveResult,
        Series,
        Source,
        StudySearch,
    )


class Queryable:
    """Mixin for handlers whose targets can be searched and retrieved from."""

    def query_source(self) -> Source:
        from querytool.sources import source_for

        return source_for(self.target)

    def query(self, criteria: Criteria, limit: int) -> StudySearch:
        """Find studies matching `criteria`, at most `limit` of them."""
        return self.query_source().find_studies(criteria, limit)

    def query_series(self, study_uid: str) -> list[Series]:
        return self.query_source().find_series(study_uid)

    def retrieve(
        self, request: RetrieveRequest, dest: Path, progress=None
    ) -> RetrieveResult:
        """Fetch the requested studies/series into `dest` (or C-MOVE them elsewhere)."""
        return self.query_source().retrieve(request, dest, progress)
