"""The received series page with the receivers above it: listening or not, what
they stored, what they refused (a full spool disk, an instance too large).

Received series are routing's (`routing.admin`); receiving extends that page with
what only it knows, and registers the extension in its place, as the jobs app does
for the targets overview.
"""

from __future__ import annotations

from django.contrib import admin
from django.utils import timezone

from dispatch.routing.admin import ReceivedSeriesAdmin
from dispatch.routing.models import ReceivedSeries

from .models import ReceiverStatus
from .status import RECEIVER_STALE_SECONDS


class ReceivedSeriesWithReceiversAdmin(ReceivedSeriesAdmin):
    change_list_template = "admin/receiving/received_series_list.html"

    def changelist_view(self, request, extra_context=None):
        extra_context = extra_context or {}
        now = timezone.now()
        statuses = []
        for status in ReceiverStatus.objects.all():
            age = (now - status.heartbeat_at).total_seconds()
            statuses.append(
                {
                    "status": status,
                    "alive": age < RECEIVER_STALE_SECONDS,
                    "age": int(age),
                    "recent_refusal": status.last_refusal_at
                    and (now - status.last_refusal_at).total_seconds() < 24 * 3600,
                }
            )
        extra_context["receiver_statuses"] = statuses
        return super().changelist_view(request, extra_context)


admin.site.unregister(ReceivedSeries)
admin.site.register(ReceivedSeries, ReceivedSeriesWithReceiversAdmin)
