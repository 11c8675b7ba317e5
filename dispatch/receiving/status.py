"""Whether each receiver is listening, from what it last reported."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from .models import ReceiverStatus

# The receiver writes a heartbeat every 5 s; three missed minutes' worth of beats
# would be too lenient, one missed beat too strict on a loaded machine.
RECEIVER_STALE_SECONDS = 30.0


@dataclass
class ReceiverState:
    name: str
    state: str  # listening | stopped | not responding
    heartbeat_at: datetime
    heartbeat_age_s: float
    started_at: datetime
    stored: int
    refused_count: int
    last_refusal: str
    last_refusal_at: datetime | None

    @property
    def listening(self) -> bool:
        return self.state == "listening"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "heartbeat_age_s": round(self.heartbeat_age_s, 1),
            "stored": self.stored,
            "refused": self.refused_count,
            "last_refusal_at": self.last_refusal_at.isoformat()
            if self.last_refusal_at
            else None,
        }


def receivers(now: datetime | None = None) -> list[ReceiverState]:
    """Every receiver that ever reported, and whether it is listening now."""
    now = now or timezone.now()
    found = []
    for status in ReceiverStatus.objects.order_by("name"):
        age = max(0.0, (now - status.heartbeat_at).total_seconds())
        info = status.info or {}
        if info.get("stopped"):
            state = "stopped"
        elif age <= RECEIVER_STALE_SECONDS:
            state = "listening"
        else:
            state = "not responding"
        found.append(
            ReceiverState(
                name=status.name,
                state=state,
                heartbeat_at=status.heartbeat_at,
                heartbeat_age_s=age,
                started_at=status.started_at,
                stored=int(info.get("stored") or 0),
                refused_count=status.refused_count,
                last_refusal=status.last_refusal,
                last_refusal_at=status.last_refusal_at,
            )
        )
    return found
