"""What a running receiver reports about itself, for the admin and `/health/`.

The series it receives are `routing.ReceivedSeries` rows: routing owns them. The
table keeps the name it had when receiving was part of the `dispatch` app.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class ReceiverStatus(models.Model):
    """What a running receiver last reported, for the admin (one row per AE/port)."""

    name = models.CharField(max_length=64, unique=True)
    started_at = models.DateTimeField(default=timezone.now)
    heartbeat_at = models.DateTimeField(default=timezone.now)
    info = models.JSONField(default=dict, blank=True)
    refused_count = models.PositiveIntegerField(default=0)
    last_refusal = models.TextField(blank=True)
    last_refusal_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "dispatch_receiverstatus"
        verbose_name_plural = "receiver status"

    def __str__(self) -> str:
        return self.name
