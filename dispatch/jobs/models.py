"""Jobs: one series folder to one target, with every attempt and instance.

A `Job` is the durable unit of work (a row, not a queue message): huey only carries
"run job N" and every worker decides from the row what to do. `Attempt` records each
try; `JobInstance` records each file's fate so a retry sends only what did not get
through.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class State(models.TextChoices):
    QUEUED = "queued", "Queued"
    SENDING = "sending", "Sending"
    RETRY_WAIT = "retry-wait", "Waiting to retry"
    PAUSED = "paused", "Paused (target disabled or paused)"
    # A job of a series still arriving (a rule that forwards as instances arrive)
    # that sent what was there: it is queued again when more land, and a last
    # time when the series is complete.
    FOLLOWING = "following", "Waiting for the series' next instances"
    DONE = "done", "Done"
    DONE_WITH_WARNINGS = "done-with-warnings", "Done with warnings"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


# States a job can still leave by itself (the rest need an operator).
ACTIVE_STATES = (
    State.QUEUED,
    State.SENDING,
    State.RETRY_WAIT,
    State.PAUSED,
    State.FOLLOWING,
)
FINISHED_STATES = (
    State.DONE,
    State.DONE_WITH_WARNINGS,
    State.FAILED,
    State.CANCELLED,
)
SUCCESS_STATES = (State.DONE, State.DONE_WITH_WARNINGS)
UNSUCCESSFUL_STATES = (State.FAILED, State.CANCELLED)


class DispatchError(Exception):
    """A send cannot even be queued (unknown folder, query-only target, ...)."""


class JobOrigin(models.TextChoices):
    """Where a job came from (a query source is something else: a `Target`)."""

    SEND_SERIES = "send_series", "send_series command"
    QUEUE = "queue", "send_series --queue"
    ROUTE = "route", "routing"
    ADMIN = "admin", "admin"
    QUERY = "query", "query tool"


class Job(models.Model):
    target = models.ForeignKey(
        "targets.Target", on_delete=models.PROTECT, related_name="jobs"
    )
    folder = models.CharField(max_length=1000, help_text="The series folder to send.")
    # Courier owns the folder (a spool folder): it deletes it once every job of
    # the folder is done. Folders given on the command line are never deleted.
    owned_spool = models.BooleanField(default=False)
    source = models.CharField(max_length=16, choices=JobOrigin.choices)
    study_uid = models.CharField("Study Instance UID", max_length=64, blank=True)
    series_uid = models.CharField("Series Instance UID", max_length=64, blank=True)
    series_description = models.CharField(max_length=200, blank=True)
    # How the series arrived, for the pass-incoming switches of DICOM targets.
    calling_aet = models.CharField("incoming Source AET", max_length=16, blank=True)
    called_aet = models.CharField("incoming Target AET", max_length=16, blank=True)
    # The series is still arriving: its instances join the job as they land
    # (`growing`), and the job cannot be done before routing closes it.
    series_open = models.BooleanField("series still arriving", default=False)

    state = models.CharField(
        max_length=20, choices=State.choices, default=State.QUEUED, db_index=True
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Earliest time the next attempt may start (retry-wait backoff).
    not_before = models.DateTimeField(default=timezone.now)
    attempt_count = models.PositiveIntegerField("attempts", default=0)
    # attempt_count when an operator last retried the job: attempt numbers keep
    # counting up, the target's retry budget counts from here.
    attempt_base = models.PositiveIntegerField(
        "attempts before the last manual retry", default=0
    )

    # The lease: the worker sending the job and until when its claim holds. A worker
    # renews it while it sends; an expired lease means the worker died.
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # This job's share of the target's parallel connections while it is sending, so
    # that all jobs of a target together never exceed `Target.max_connections`.
    connections = models.PositiveSmallIntegerField(default=1)

    total = models.PositiveIntegerField("instances", default=0)
    sent = models.PositiveIntegerField(default=0)
    present = models.PositiveIntegerField("already present", default=0)
    warnings = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    bytes_sent = models.PositiveBigIntegerField(default=0)
    # The series folder's other files (reports, previews, results): those the
    # target delivers beside the instances, how many of them got there, and those
    # left out (excluded by the filter, a kind that sends DICOM only, unreadable).
    other_files = models.PositiveIntegerField("other files", default=0)
    other_sent = models.PositiveIntegerField("other files delivered", default=0)
    skipped = models.PositiveIntegerField("other files left out", default=0)
    # Storage Commitment: instances the target reported committed; None when the
    # target was never asked (its "Request storage commitment" is off).
    committed = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["target", "state"], name="job_target_state"),
            models.Index(fields=["state", "not_before"], name="job_state_due"),
            models.Index(fields=["folder"], name="job_folder"),
        ]

    def __str__(self) -> str:
        return (
            f"job {self.pk}: {self.series_label} ({self.files_label}) → {self.target}"
        )

    @property
    def files_label(self) -> str:
        """What the job carries, e.g. "12 instances + 2 other files; 1 left out"."""
        text = f"{self.total} instance{'' if self.total == 1 else 's'}"
        if self.other_files:
            text += f" + {self.other_files} other file{'' if self.other_files == 1 else 's'}"
        if self.skipped:
            text += f"; {self.skipped} file{'' if self.skipped == 1 else 's'} left out"
        return text

    @property
    def series_label(self) -> str:
        return self.series_uid or self.folder.rstrip("/").rsplit("/", 1)[-1]

    @property
    def committed_label(self) -> str:
        """ "12 of 20 committed" once the target was asked to commit; else ""."""
        if self.committed is None:
            return ""
        return f"{self.committed} of {self.total} committed"

    @property
    def done_count(self) -> int:
        return self.sent + self.present

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    def next_retry_text(self, now=None) -> str:
        """When a waiting job tries again, computed now: "next retry in 12 s"."""
        if self.state != State.RETRY_WAIT:
            return ""
        seconds = round((self.not_before - (now or timezone.now())).total_seconds())
        if seconds <= 0:
            return "retrying now"
        if seconds < 120:
            return f"next retry in {seconds} s"
        if seconds < 7200:
            return f"next retry in {round(seconds / 60)} min"
        return f"next retry in {seconds / 3600:.1f} h"

    def status_text(self, now=None) -> str:
        """The last error, with the time to the next retry when it waits."""
        retry = self.next_retry_text(now)
        if retry and self.last_error:
            return f"{self.last_error}; {retry}"
        return retry or self.last_error


class Attempt(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=200)
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    # done | done-with-warnings | failed | error (transient) | interrupted | ...
    outcome = models.CharField(max_length=20, blank=True)
    sent = models.PositiveIntegerField(default=0)
    present = models.PositiveIntegerField("already present", default=0)
    warnings = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    bytes_sent = models.PositiveBigIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["job", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["job", "number"], name="attempt_number_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of job {self.job_id}"

    @property
    def duration(self) -> float | None:
        if not self.ended_at:
            return None
        return (self.ended_at - self.started_at).total_seconds()


class InstanceState(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    WARNING = "warning", "Sent with warning"
    PRESENT = "present", "Already present"
    FAILED = "failed", "Failed"


class Commitment(models.TextChoices):
    """Where an instance is in Storage Commitment (its target asks for it)."""

    NONE = "", "Not asked"
    WAITING = "waiting", "Waiting for the report"
    COMMITTED = "committed", "Committed"
    FAILED = "failed", "Not committed"


class JobInstance(models.Model):
    """One file of a job and its fate; only pending files are sent by an attempt."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="instances")
    path = models.CharField(max_length=1000)
    sop_instance_uid = models.CharField(max_length=64, blank=True)
    # False for the series folder's other files (reports, previews, results).
    dicom = models.BooleanField(default=True)
    state = models.CharField(
        max_length=8, choices=InstanceState.choices, default=InstanceState.PENDING
    )
    message = models.TextField(blank=True)
    bytes = models.PositiveBigIntegerField(default=0)
    # Storage Commitment: a delivered instance is asked for until it is committed;
    # one the target did not commit goes back to pending with the reason.
    commitment = models.CharField(
        max_length=10, choices=Commitment.choices, default=Commitment.NONE, blank=True
    )
    updated_at = models.DateTimeField(auto_now=True)
    # What the folder scan read when the job was made, so that an attempt sends
    # without reading the file again: the file's size, and `stamp` (size, mtime
    # and inode) to tell that it is still the file that was read; the header
    # (SOP Class UID, transfer syntax, `targets.series.HEADER_TAGS`). Rows from
    # before these columns (stamp empty) are read again when sent.
    size = models.PositiveBigIntegerField(default=0)
    stamp = models.CharField(max_length=64, blank=True)
    sop_class_uid = models.CharField(max_length=64, blank=True)
    transfer_syntax = models.CharField(max_length=64, blank=True)
    tags = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["job", "path"]
        constraints = [
            models.UniqueConstraint(fields=["job", "path"], name="job_instance_unique"),
        ]
        indexes = [
            models.Index(
                fields=["job", "state"],
                name="job_instance_pending",
                condition=Q(state="pending"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.path} ({self.state})"


class StorageCommitment(models.Model):
    """One Storage Commitment transaction (PS3.4 Annex J) and what the peer reported.

    Keyed by the transaction UID. The receiver writes the peer's N-EVENT-REPORT
    here (`dispatch.jobs.commitment.record_report`), whichever association it came
    on; the sending side finds its request's answer by the UID it chose.
    """

    class Outcome(models.TextChoices):
        WAITING = "waiting", "Waiting for the report"
        COMMITTED = "committed", "All committed"
        FAILED = "failed", "Some failed"

    transaction_uid = models.CharField("Transaction UID", max_length=64, unique=True)
    outcome = models.CharField(
        max_length=10, choices=Outcome.choices, default=Outcome.WAITING
    )
    created_at = models.DateTimeField(default=timezone.now)
    reported_at = models.DateTimeField(null=True, blank=True)
    # Who sent the report: its calling AE title and address. Until then the AE
    # title it must come from (the target's called AE title; `record_report`).
    reported_by = models.CharField(max_length=16, blank=True)
    reported_from = models.CharField(max_length=100, blank=True)
    # [[SOP Class UID, SOP Instance UID], ...] committed, and
    # [[SOP Class UID, SOP Instance UID, failure reason], ...] not.
    committed = models.JSONField(default=list, blank=True)
    failed = models.JSONField(default=list, blank=True)

    class Meta:
        verbose_name = "storage commitment"

    def __str__(self) -> str:
        return f"{self.transaction_uid} ({self.get_outcome_display()})"
