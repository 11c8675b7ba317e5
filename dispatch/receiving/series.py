"""A series as the receiver keeps it in memory, and where its bookkeeping goes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# Instances without a Series Instance UID are kept too (dcmtk's storescp and
# pydicom take them): grouped per Study Instance UID and AE titles into a series of
# their own, whose folder name starts with this.
NO_SERIES_UID = "no-series-uid"


def series_key(
    series_uid: str, study_uid: str, calling_aet: str, called_aet: str
) -> tuple[str, str, str]:
    """What an instance's series is known by while it is being received."""
    group = series_uid or f"{NO_SERIES_UID}:{study_uid}"
    return (group, calling_aet, called_aet)


@dataclass
class OpenSeries:
    """A series being received, as the receiver keeps it in memory."""

    series_uid: str
    calling_aet: str
    called_aet: str
    peer_address: str
    folder: Path
    study_uid: str = ""
    first_received: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_received: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Monotonic time of the last instance, for the quiet period.
    last_instance_at: float = field(default_factory=time.monotonic)
    sop_uids: set[str] = field(default_factory=set)
    bytes: int = 0
    pk: int | None = None
    dirty: bool = True
    # Instances being written right now (the series is not closed meanwhile).
    inflight: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return series_key(
            self.series_uid, self.study_uid, self.calling_aet, self.called_aet
        )

    @property
    def instance_count(self) -> int:
        return len(self.sop_uids)

    def sidecar(self) -> dict:
        return {
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "calling_aet": self.calling_aet,
            "called_aet": self.called_aet,
            "peer_address": self.peer_address,
            "first_received": self.first_received.isoformat(),
        }


class Bookkeeper:
    """Where the receiver's bookkeeping goes. The default keeps nothing (tests).

    `dispatch.receiving.bookkeeping.DatabaseBookkeeper` keeps it in the database.
    """

    def restore(self, spool_incoming: Path) -> list[OpenSeries]:
        """Return the series still open from a previous run (to continue them)."""
        return []

    def save(self, series: list[OpenSeries]) -> list[OpenSeries] | None:
        """Write new and changed series (creating rows, setting `pk`).

        Return the series that could not be written (tried again later); raise
        only when nothing could be.
        """

    def close(self, series: OpenSeries) -> None:
        """The series has been quiet for the quiet period: hand it to routing."""

    def refused(self, reason: str, count: int) -> None:
        """`count` instances were refused for lack of resources (shown in the admin)."""

    def heartbeat(self, info: dict) -> None:
        """The receiver is alive (called every few seconds)."""

    def commitment_report(self, report, calling_aet: str, address: str) -> bool:
        """A peer reported on a Storage Commitment transaction (a
        `targets.dicomnet.commitment.Report`): keep it and return True; return
        False if it answers no transaction Courier asked that peer for (dropped,
        the drop logged); raise if it cannot be kept. Called from an association's
        thread, before the peer is answered."""
        return True
