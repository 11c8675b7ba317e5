"""The targets overview with what dispatch knows about each target: its waiting jobs,
its last send, and why a target with jobs cannot be deleted.

`targets` knows nothing of jobs, so the jobs app extends the targets admin here and
registers the extension in its place (resuming a target also queues its jobs).
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, IntegerField, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html

from targets.admin import FAILED_COLOUR, OK_COLOUR, PAUSED_COLOUR, TargetAdmin
from targets.models import Target

from . import services
from .models import ACTIVE_STATES, FINISHED_STATES, Job, State

OUTCOME_COLOURS = {
    State.DONE: OK_COLOUR,
    State.DONE_WITH_WARNINGS: PAUSED_COLOUR,
    State.FAILED: FAILED_COLOUR,
    State.CANCELLED: "#666",
}


def jobs_url(target_id: int, states=()) -> str:
    url = f"{reverse('admin:dispatch_job_changelist')}?target__id__exact={target_id}"
    if states:
        url += "&state__in=" + ",".join(states)
    return url


def _count(jobs) -> Subquery:
    return Coalesce(
        Subquery(
            jobs.order_by().values("target_id").annotate(n=Count("id")).values("n")[:1],
            output_field=IntegerField(),
        ),
        Value(0),
    )


class TargetWithJobsAdmin(TargetAdmin):
    list_display = TargetAdmin.list_display + ("waiting_column", "last_send_column")

    def get_queryset(self, request):
        mine = Q(target_id=OuterRef("pk"))
        last = Job.objects.filter(mine, finished_at__isnull=False).order_by(
            "-finished_at", "-id"
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                waiting_jobs=_count(Job.objects.filter(mine, state__in=ACTIVE_STATES)),
                last_send_at=Subquery(last.values("finished_at")[:1]),
                last_send_state=Subquery(last.values("state")[:1]),
            )
        )

    @admin.display(description="waiting jobs", ordering="waiting_jobs")
    def waiting_column(self, obj: Target) -> str:
        n = getattr(obj, "waiting_jobs", 0)
        if not n:
            return "0"
        return format_html(
            '<a class="waiting-jobs" href="{}">{}</a>',
            jobs_url(obj.pk, ACTIVE_STATES),
            n,
        )

    @admin.display(description="last send", ordering="last_send_at")
    def last_send_column(self, obj: Target) -> str:
        state = getattr(obj, "last_send_state", None)
        if not state:
            return "never"
        return format_html(
            '<span style="white-space:nowrap"><a class="last-send-{}" href="{}" '
            'style="color:{};font-weight:bold">{}</a> {}</span>',
            state,
            jobs_url(obj.pk, FINISHED_STATES),
            OUTCOME_COLOURS.get(state, "inherit"),
            State(state).label.lower(),
            date_format(timezone.localtime(obj.last_send_at), "Y-m-d H:i:s"),
        )

    def resume(self, targets) -> int:
        """Resume dispatch to `targets` and queue their waiting jobs at once."""
        return services.resume_targets(targets)

    # -- delete: say what to do instead of listing the jobs that block it ----------
    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(
            objs, request
        )
        if protected:
            protected = [line for line in map(self._jobs_line, objs) if line]
        return deleted, counts, perms_needed, protected

    def _jobs_line(self, target: Target) -> str:
        by_state = dict(
            Job.objects.filter(target_id=target.pk)
            .values_list("state")
            .annotate(n=Count("id"))
            .order_by()
        )
        if not by_state:
            return ""
        waiting = sum(by_state.get(s, 0) for s in ACTIVE_STATES)
        finished = sum(by_state.get(s, 0) for s in FINISHED_STATES)
        return format_html(
            '{}: <a href="{}">{} waiting or sending</a>, <a href="{}">{} finished</a>',
            target.name,
            jobs_url(target.pk, ACTIVE_STATES),
            waiting,
            jobs_url(target.pk, FINISHED_STATES),
            finished,
        )


admin.site.unregister(Target)
admin.site.register(Target, TargetWithJobsAdmin)
