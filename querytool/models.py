"""Query tool records: retrieval jobs (with live progress) and the audit log."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings
from django.db import models


class RetrievalState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    DONE = "done", "Done"
    PARTIAL = "partial", "Partly done"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


FINISHED = {
    RetrievalState.DONE,
    RetrievalState.PARTIAL,
    RetrievalState.FAILED,
    RetrievalState.CANCELLED,
}


@dataclass
class Delivery:
    """Where the send jobs of a retrieval to a store target stand."""

    jobs: int = 0
    active: int = 0
    done: int = 0
    # The reasons of the failed (or cancelled) send jobs.
    failures: list[str] = field(default_factory=list)
    # What a waiting job says (its error and the time to its next retry).
    waiting: str = ""
    instances: int = 0
    delivered: int = 0


class RetrievalJob(models.Model):
    """One study (or some of its series) pulled from a source in the background.

    A retrieval to a store target is finished only when its send jobs are: the
    `shown_*` properties combine its own state with `delivery` (set by
    `querytool.services.attach_deliveries`).
    """

    delivery: Delivery | None = None

    source = models.ForeignKey(
        "targets.Target", on_delete=models.SET_NULL, null=True, related_name="+"
    )
    source_name = models.CharField(max_length=64)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    # The claim and lease of the worker running it (`dispatch.jobs.lease`): renewed
    # while it runs; a running job whose lease ran out was left by a worker that
    # died, is taken over by the next that looks, and may be cancelled at once.
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    state = models.CharField(
        max_length=10, choices=RetrievalState.choices, default=RetrievalState.QUEUED
    )

    study_uid = models.CharField("study instance UID", max_length=64)
    # Empty: the whole study.
    series_uids = models.JSONField(default=list, blank=True)
    label = models.CharField(
        max_length=300, blank=True, help_text="Patient, date, accession, description."
    )

    # Exactly one destination: a store target, the download folder, or a C-MOVE AET.
    destination = models.ForeignKey(
        "targets.Target",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    destination_name = models.CharField(max_length=64, blank=True)
    download = models.BooleanField(default=False)
    move_aet = models.CharField("C-MOVE destination AET", max_length=16, blank=True)
    output_path = models.CharField(max_length=1000, blank=True)

    total = models.PositiveIntegerField(null=True, blank=True)
    done = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    message = models.TextField(blank=True)
    cancel_requested = models.BooleanField(default=False)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Dispatch job ids created for a store target destination.
    dispatch_jobs = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # The query page's permissions (grant them to groups in the admin). Which
        # store targets a user may export to: "any target", or the target's own
        # "groups that may export here".
        permissions = [
            ("search_sources", "Can search query sources and open studies"),
            (
                "retrieve_studies",
                "Can retrieve studies (download folder, C-MOVE, targets allowed)",
            ),
            ("export_to_any_target", "Can export retrieved studies to any target"),
        ]

    def __str__(self) -> str:
        return f"retrieval {self.pk} of {self.label or self.study_uid}"

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def destination_label(self) -> str:
        if self.move_aet:
            return f"C-MOVE to {self.move_aet}"
        if self.download:
            return "download folder"
        return self.destination_name or "(deleted target)"

    @property
    def percent(self) -> int | None:
        if not self.total:
            return None
        return min(100, round(100 * (self.done + self.failed) / self.total))

    @property
    def _delivering(self) -> Delivery | None:
        """The delivery, when the retrieval itself got through."""
        d = self.delivery
        if d and d.jobs and self.state in (RetrievalState.DONE, RetrievalState.PARTIAL):
            return d
        return None

    @property
    def shown_state(self) -> str:
        d = self._delivering
        if d and d.active:
            return "sending"
        if d and d.failures:
            return RetrievalState.FAILED
        return self.state

    @property
    def shown_state_label(self) -> str:
        d = self._delivering
        if d and d.active:
            return f"Sending to {self.destination_label}"
        if d and d.failures:
            return "Delivery failed"
        return self.get_state_display()

    @property
    def shown_finished(self) -> bool:
        d = self._delivering
        return self.finished and not (d and d.active)

    @property
    def shown_message(self) -> str:
        d = self._delivering
        if not d:
            return self.message
        dest = self.destination_label
        if d.failures:
            reasons = list(dict.fromkeys(d.failures))  # the same reason once
            words = (
                f"{len(d.failures)} of {d.jobs} series could not be sent to {dest}: "
                + "; ".join(reasons[:3])
                + (" …" if len(reasons) > 3 else "")
            )
        elif d.active:
            words = (
                f"Sending to {dest}: {d.delivered} of {d.instances} instances "
                f"delivered" + (f"; {d.waiting}" if d.waiting else "") + "."
            )
        else:
            words = f"Delivered to {dest}."
        return f"{self.message} {words}" if self.message else words

    def as_json(self) -> dict:
        return {
            "id": self.pk,
            "state": self.shown_state,
            "state_label": self.shown_state_label,
            "done": self.done,
            "failed": self.failed,
            "total": self.total,
            "percent": self.percent,
            "message": self.shown_message,
            "finished": self.shown_finished,
            "cancel_requested": self.cancel_requested,
        }


class AuditAction(models.TextChoices):
    SEARCH = "search", "Search"
    SERIES = "series", "Open study"
    RETRIEVE = "retrieve", "Retrieve"
    INDEX = "index", "Rescan folder"
    CANCEL = "cancel", "Cancel retrieval"
    RETRY = "retry", "Retry retrieval"
    REFUSED = "refused", "Refused (no permission)"


class AuditEntry(models.Model):
    """Who queried or retrieved what, from which source, and when."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True
    )
    username = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=10, choices=AuditAction.choices)
    source = models.ForeignKey(
        "targets.Target",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    source_name = models.CharField(max_length=64, blank=True)
    criteria = models.JSONField(default=dict, blank=True)
    result_count = models.IntegerField(null=True, blank=True)
    ok = models.BooleanField(default=True)
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "audit log entry"
        verbose_name_plural = "audit log"

    def __str__(self) -> str:
        return f"{self.username} {self.action} {self.source_name} at {self.at:%Y-%m-%d %H:%M}"
