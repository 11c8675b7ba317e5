"""A series as the receiver keeps it in memory, and where its bookkeeping goes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path


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
        return (self.series_uid, self.calling_aet, self.called_aet)

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
