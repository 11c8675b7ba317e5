"""The dispatch page: jobs with their progress, attempts and errors, and actions."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from targets.models import Target

from . import services
from .models import Attempt, InstanceState, Job, State

STATE_COLOURS = {
    State.DONE: "#2e7d32",
    State.DONE_WITH_WARNINGS: "#9e6a03",
    State.FAILED: "#c62828",
    State.RETRY_WAIT: "#9e6a03",
    State.PAUSED: "#555",
    State.CANCELLED: "#555",
}


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = (
        "number",
        "started_at",
        "ended_at",
        "outcome",
        "sent",
        "present",
        "warnings",
        "failed",
        "bytes_sent",
        "error",
        "worker",
    )
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "target",
        "series_column",
        "state_column",
        "progress_column",
        "attempt_count",
        "created_at",
        "error_column",
    )
    list_filter = ("state", "target", "created_at", "source")
    search_fields = ("series_uid", "study_uid", "folder", "target__name")
    date_hierarchy = "created_at"
    list_select_related = ("target",)
    actions = ["retry_now_action", "cancel_action", "pause_targets", "resume_targets"]
    inlines = [AttemptInline]
    readonly_fields = (
        "target",
        "folder",
        "owned_spool",
        "source",
        "study_uid",
        "series_uid",
        "series_description",
        "calling_aet",
        "called_aet",
        "state",
        "created_at",
        "updated_at",
        "finished_at",
        "not_before",
        "attempt_count",
        "lease_owner",
        "lease_expires_at",
        "total",
        "sent",
        "present",
        "warnings",
        "failed",
        "bytes_sent",
        "other_files",
        "other_sent",
        "skipped",
        "last_error",
        "problem_instances",
    )
    fieldsets = (
        (None, {"fields": ("target", "state", "last_error", "problem_instances")}),
        (
            "Series",
            {
                "fields": (
                    "folder",
                    "owned_spool",
                    "source",
                    "study_uid",
                    "series_uid",
                    "series_description",
                    "calling_aet",
                    "called_aet",
                )
            },
        ),
        (
            "Progress",
            {
                "fields": (
                    "total",
                    "sent",
                    "present",
                    "warnings",
                    "failed",
                    "bytes_sent",
                    "other_files",
                    "other_sent",
                    "skipped",
                )
            },
        ),
        (
            "Timing",
            {
                "fields": (
                    "created_at",
                    "updated_at",
                    "finished_at",
                    "not_before",
                    "attempt_count",
                    "lease_owner",
                    "lease_expires_at",
                )
            },
        ),
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    # -- columns -----------------------------------------------------------------------
    @admin.display(description="series", ordering="series_uid")
    def series_column(self, job: Job) -> str:
        return job.series_description or job.series_label

    @admin.display(description="state", ordering="state")
    def state_column(self, job: Job) -> str:
        colour = STATE_COLOURS.get(job.state, "inherit")
        return format_html(
            '<span style="color:{}">{}</span>', colour, job.get_state_display()
        )

    @admin.display(description="progress")
    def progress_column(self, job: Job) -> str:
        text = f"{job.done_count} / {job.total}"
        if job.failed:
            text += f" ({job.failed} failed)"
        return text

    @admin.display(description="last error")
    def error_column(self, job: Job) -> str:
        text = job.last_error
        return text if len(text) <= 120 else text[:117] + "…"

    @admin.display(description="instances not sent")
    def problem_instances(self, job: Job) -> str:
        rows = list(
            job.instances.exclude(
                state__in=[InstanceState.SENT, InstanceState.PRESENT]
            ).values_list("path", "state", "message")[:100]
        )
        if not rows:
            return "—"
        return format_html(
            "<ul>{}</ul>",
            format_html_join(
                "", "<li><code>{}</code>: {} {}</li>", ((p, s, m) for p, s, m in rows)
            ),
        )

    # -- numbers at the top ------------------------------------------------------------
    def changelist_view(self, request: HttpRequest, extra_context=None):
        extra_context = {**(extra_context or {}), "summary": services.status_summary()}
        return super().changelist_view(request, extra_context=extra_context)

    # -- actions -----------------------------------------------------------------------
    @admin.action(description="Retry selected jobs now", permissions=["change"])
    def retry_now_action(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        n = services.retry_now(queryset)
        self.message_user(request, f"{n} jobs queued again.", messages.SUCCESS)

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel_action(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        n = services.cancel(queryset)
        self.message_user(request, f"{n} jobs cancelled.", messages.SUCCESS)

    @admin.action(
        description="Pause the targets of selected jobs", permissions=["change"]
    )
    def pause_targets(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        targets = Target.objects.filter(pk__in=queryset.values("target_id"))
        names = ", ".join(t.name for t in targets)
        services.pause_targets(targets)
        self.message_user(
            request, f"Paused {names}: their jobs wait until resumed.", messages.SUCCESS
        )

    @admin.action(
        description="Resume the targets of selected jobs", permissions=["change"]
    )
    def resume_targets(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        targets = Target.objects.filter(pk__in=queryset.values("target_id"))
        names = ", ".join(t.name for t in targets)
        services.resume_targets(targets)
        self.message_user(request, f"Resumed {names}.", messages.SUCCESS)


from . import routing_admin, target_admin  # noqa: E402, F401
