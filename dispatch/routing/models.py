"""Received series and routing rules.

A `ReceivedSeries` is one series as Courier's receiver got it from one sender (one
spool folder). Once complete it is matched against the enabled `Rule`s in order; every
matched rule's targets get one dispatch job each (deduplicated). The series keeps the
rules that matched and the jobs made for it.

The series lives here, in routing, not in receiving: routing reads and moves it
through its states (complete, routed, unrouted, failed), keeps its rules and jobs,
and purges it; the receiver only creates and counts it. Receiving imports routing,
never the other way round. The tables keep the names they had when routing was part
of the `dispatch` app (`db_table`).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone

from .matching import CALLED_AET, CALLING_AET, RegexError, compile_regex

# A received series' spool folder holds its instances as `*.dcm` files; the
# receiver writes a small description beside it (`<folder>.series.json`), so a
# folder whose row was never written is adopted on its next start. The description
# goes when the folder goes.
DESCRIPTION_SUFFIX = ".series.json"


def count_instances(folder: Path) -> tuple[int, int]:
    """How many instances a series folder holds, and their bytes (0, 0 if gone)."""
    count = size = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.endswith(".dcm") and entry.is_file():
                    count += 1
                    size += entry.stat().st_size
    except OSError:
        pass
    return count, size


class ReceivedSeries(models.Model):
    class State(models.TextChoices):
        RECEIVING = "receiving", "Receiving"
        COMPLETE = "complete", "Complete, waiting to be routed"
        ROUTED = "routed", "Routed"
        UNROUTED = "unrouted", "Unrouted (no rule matched)"
        FAILED = "failed", "Failed"

    series_uid = models.CharField("Series Instance UID", max_length=64, db_index=True)
    study_uid = models.CharField("Study Instance UID", max_length=64, blank=True)
    folder = models.CharField(max_length=1000, unique=True)
    calling_aet = models.CharField("calling AE title", max_length=16, blank=True)
    called_aet = models.CharField("called AE title", max_length=16, blank=True)
    peer_address = models.CharField("sender address", max_length=100, blank=True)
    first_received_at = models.DateTimeField(default=timezone.now)
    last_received_at = models.DateTimeField(default=timezone.now, db_index=True)
    instance_count = models.PositiveIntegerField("instances", default=0)
    bytes = models.PositiveBigIntegerField(default=0)
    # Top-level tags of one instance (keyword -> text), read when the series completes;
    # rule conditions on "any tag by keyword" match against it.
    tags = models.JSONField("tags summary", default=dict, blank=True)
    state = models.CharField(
        max_length=12, choices=State.choices, default=State.RECEIVING, db_index=True
    )
    state_changed_at = models.DateTimeField(default=timezone.now)
    routed_at = models.DateTimeField(null=True, blank=True)
    # Why the series is failed or unrouted, or what the last re-route did.
    note = models.TextField(blank=True)
    matched_rules = models.ManyToManyField(
        "Rule", blank=True, related_name="routed_series"
    )
    jobs = models.ManyToManyField("dispatch.Job", blank=True, related_name="received")
    # Set when the spool folder has been removed (all jobs done, or retention).
    folder_removed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "dispatch_receivedseries"
        verbose_name = "received series"
        verbose_name_plural = "received series"
        ordering = ["-last_received_at", "-id"]
        indexes = [
            models.Index(fields=["state", "last_received_at"], name="received_due"),
        ]

    def __str__(self) -> str:
        what = self.tags.get("SeriesDescription") or self.series_uid
        return f"{self.tags.get('Modality', '?')} {what} from {self.calling_aet or '?'}"

    def facts(self) -> dict[str, str]:
        """What rule conditions look at: the tags plus the AE titles it came with."""
        return {
            **{k: str(v) for k, v in self.tags.items()},
            CALLING_AET: self.calling_aet,
            CALLED_AET: self.called_aet,
        }


class Rule(models.Model):
    class Match(models.TextChoices):
        ALL = "all", "All conditions"
        ANY = "any", "Any condition"

    name = models.CharField(max_length=100, unique=True)
    enabled = models.BooleanField(default=True)
    order = models.IntegerField(
        default=100, help_text="Rules are shown and evaluated in this order."
    )
    match = models.CharField(max_length=3, choices=Match.choices, default=Match.ALL)
    stream = models.BooleanField(
        "forward as instances arrive",
        default=False,
        help_text="Judge the rule on a series' first instance and send each "
        "instance to the targets as soon as it is stored, instead of after the "
        "series is complete (the quiet period). The conditions look at one "
        "instance's header either way.",
    )
    targets = models.ManyToManyField(
        "targets.Target",
        related_name="rules",
        limit_choices_to=Q(direction__in=["store", "both"]),
        help_text="Each matching series gets one job per target.",
    )
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "dispatch_rule"
        ordering = ["order", "name"]

    def __str__(self) -> str:
        return self.name


class RuleCondition(models.Model):
    class Field(models.TextChoices):
        CALLING_AET = "calling_aet", "Calling AE title (the sender)"
        CALLED_AET = "called_aet", "Called AE title (what the sender called)"
        TAG = "tag", "DICOM tag"

    class Operator(models.TextChoices):
        EXACT = "exact", "is exactly"
        WILDCARD = "wildcard", "matches wildcard (* and ?)"
        REGEX = "regex", "matches regular expression"

    rule = models.ForeignKey(Rule, on_delete=models.CASCADE, related_name="conditions")
    field = models.CharField(max_length=12, choices=Field.choices, default=Field.TAG)
    keyword = models.CharField(
        "tag keyword",
        max_length=64,
        blank=True,
        help_text="For a DICOM tag: its keyword, e.g. Modality, StudyDescription, "
        "SeriesDescription, BodyPartExamined.",
    )
    operator = models.CharField(
        max_length=8, choices=Operator.choices, default=Operator.EXACT
    )
    value = models.CharField(
        max_length=200,
        blank=True,
        help_text="Compared case-sensitively, as DICOM does; a regular expression "
        "must match the whole value (use (?i) to ignore case).",
    )

    class Meta:
        db_table = "dispatch_rulecondition"
        ordering = ["rule", "id"]

    def __str__(self) -> str:
        what = (
            self.keyword if self.field == self.Field.TAG else self.get_field_display()
        )
        return f"{what} {self.get_operator_display()} {self.value!r}"

    @property
    def fact_name(self) -> str:
        if self.field == self.Field.CALLING_AET:
            return CALLING_AET
        if self.field == self.Field.CALLED_AET:
            return CALLED_AET
        return self.keyword

    def clean(self) -> None:
        super().clean()
        if self.field == self.Field.TAG:
            if not self.keyword:
                raise ValidationError({"keyword": "Enter the keyword of the tag."})
            # Imported here: models load at every django.setup(), pydicom costs
            # about a second of start-up (numpy) to processes that never use it.
            from pydicom.datadict import tag_for_keyword

            if tag_for_keyword(self.keyword) is None:
                raise ValidationError(
                    {
                        "keyword": f"{self.keyword!r} is not a DICOM keyword "
                        "(e.g. Modality, StudyDescription, BodyPartExamined)."
                    }
                )
        elif self.keyword:
            self.keyword = ""
        if self.operator == self.Operator.REGEX:
            # The router's own compiler (RE2, linear time): what it refuses, the
            # form refuses; no pattern can make matching hang.
            try:
                compile_regex(self.value)
            except RegexError as exc:
                raise ValidationError(
                    {
                        "value": f"Not a valid regular expression for Courier's "
                        f"linear-time matcher (RE2): {exc}. Backreferences and "
                        "look-around are not supported."
                    }
                ) from None
        elif self.operator == self.Operator.WILDCARD:
            fnmatch.translate(self.value)
