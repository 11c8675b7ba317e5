"""The dispatch page: jobs with their progress, attempts and errors, and actions."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.defaultfilters import filesizeformat, pluralize
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from targets import services as target_services
from targets.models import Target

# The targets overview with what jobs know of each target, registered in its place.
from . import services, target_admin  # noqa: F401
from .models import ACTIVE_STATES, Attempt, InstanceState, Job, State
from .status import status_summary

STATE_COLOURS = {
    State.DONE: "#2e7d32",
    State.DONE_WITH_WARNINGS: "#9e6a03",
    State.FAILED: "#c62828",
    State.RETRY_WAIT: "#9e6a03",
    State.PAUSED: "#555",
    State.CANCELLED: "#555",
}
# At most this many jobs' progress in one poll of the progress view.
POLL_LIMIT = 500


def progress_text(job: Job) -> str:
    text = f"{job.done_count} / {job.total}"
    if job.failed:
        text += f" ({job.failed} failed)"
    if job.committed_label:
        text += f", {job.committed_label}"
    return text


def percent(job: Job) -> int:
    if not job.total:
        return 0
    return min(100, round(100 * (job.done_count + job.failed) / job.total))


def job_progress(job: Job, now=None) -> dict:
    """What the pages show of a job and update while it is active.

    A cancelled job whose worker has not let go yet counts as active: its page
    goes on polling until it may be retried.
    """
    now = now or timezone.now()
    retryable = not services.retry_refusal(job, now)
    stopping = job.state == State.CANCELLED and not retryable
    return {
        "id": job.pk,
        "state": job.state,
        "state_label": job.get_state_display(),
        "colour": STATE_COLOURS.get(job.state, ""),
        "active": job.is_active or stopping,
        "retryable": retryable,
        "progress": progress_text(job),
        "percent": percent(job),
        "sent_size": filesizeformat(job.bytes_sent),
        "status": job.status_text(now),
    }


class TargetSearchFilter(admin.ListFilter):
    """Filter by target for any number of targets: a name box with suggestions.

    Django's related-field filter lists every target as a link, which is a page
    tall at a thousand targets. `target__id__exact` links keep working.
    """

    title = "target"
    template = "admin/dispatch/job/target_filter.html"
    id_parameter = "target__id__exact"
    name_parameter = "target_name"

    def __init__(self, request, params, model, model_admin):
        super().__init__(request, params, model, model_admin)
        for key in self.expected_parameters():
            if key in params:
                self.used_parameters[key] = params.pop(key)[-1]
        self.name_value = self.used_parameters.get(self.name_parameter, "").strip()
        target_id = self.used_parameters.get(self.id_parameter, "")
        targets = Target.objects.all()
        if self.name_value:
            self.chosen = targets.filter(name__iexact=self.name_value).first()
        elif target_id.isdigit():
            self.chosen = targets.filter(pk=int(target_id)).first()
        else:
            self.chosen = None
        self.asked = bool(self.name_value or target_id)
        if self.chosen is not None:
            self.name_value = self.chosen.name

    def has_output(self) -> bool:
        return True

    def expected_parameters(self) -> list[str]:
        return [self.id_parameter, self.name_parameter]

    def queryset(self, request, queryset):
        if self.chosen is not None:
            return queryset.filter(target=self.chosen)
        if self.asked:
            return queryset.none()
        return queryset

    @property
    def names(self) -> list[str]:
        """Names of the targets that have jobs, for the browser's suggestions."""
        return list(
            Target.objects.filter(pk__in=Job.objects.values("target_id"))
            .order_by("name")
            .values_list("name", flat=True)
        )

    def choices(self, changelist):
        mine = set(self.expected_parameters()) | {"p"}
        self.hidden = [
            (key, value)
            for key, values in self.request.GET.lists()
            if key not in mine
            for value in values
        ]
        yield {
            "selected": not self.asked,
            "query_string": changelist.get_query_string(remove=list(mine)),
            "display": "All",
        }
        if self.chosen is not None:
            yield {
                "selected": True,
                "query_string": changelist.get_query_string(
                    {self.id_parameter: self.chosen.pk}, [self.name_parameter]
                ),
                "display": self.chosen.name,
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
        "size",
        "error",
        "worker",
    )
    readonly_fields = fields

    @admin.display(description="sent")
    def size(self, attempt: Attempt) -> str:
        return filesizeformat(attempt.bytes_sent)

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
    list_filter = ("state", TargetSearchFilter, "created_at", "source")
    search_fields = ("series_uid", "study_uid", "folder", "target__name")
    date_hierarchy = "created_at"
    list_select_related = ("target",)
    actions = ["retry_now_action", "cancel_action", "pause_targets", "resume_targets"]
    inlines = [AttemptInline]
    fieldsets = (
        (None, {"fields": ("target", "live_status", "problem_instances")}),
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
                    "sent_size",
                    "other_files",
                    "other_sent",
                    "skipped",
                    "committed_column",
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
    # Everything on the page is read-only: exactly the fields the fieldsets show.
    readonly_fields = tuple(f for _, opts in fieldsets for f in opts["fields"])

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
            '<span class="job-state" data-job="{}" data-active="{}" '
            'data-state="{}" style="color:{}">{}</span>',
            job.pk,
            "1" if job.is_active else "0",
            job.state,
            colour,
            job.get_state_display(),
        )

    @admin.display(description="progress")
    def progress_column(self, job: Job) -> str:
        return format_html(
            '<span class="job-progress" data-job="{}">{}</span>',
            job.pk,
            progress_text(job),
        )

    @admin.display(description="last error")
    def error_column(self, job: Job) -> str:
        text = job.status_text()
        text = text if len(text) <= 120 else text[:117] + "…"
        return format_html(
            '<span class="job-status" data-job="{}">{}</span>', job.pk, text
        )

    @admin.display(description="storage commitment")
    def committed_column(self, job: Job) -> str:
        return job.committed_label or "not requested"

    @admin.display(description="sent")
    def sent_size(self, job: Job) -> str:
        return filesizeformat(job.bytes_sent)

    @admin.display(description="state")
    def live_status(self, job: Job) -> str:
        info = job_progress(job)
        return format_html(
            '<div id="job-live" data-job="{}" data-active="{}" data-state="{}" '
            'data-retryable="{}">'
            '<strong class="job-state" style="color:{}">{}</strong> · '
            '<span class="job-progress">{}</span> instances · '
            '<span class="job-size">{}</span> sent '
            '<progress class="job-bar" max="100" value="{}"></progress>'
            '<div class="job-status">{}</div></div>',
            job.pk,
            "1" if info["active"] else "0",
            job.state,
            "1" if info["retryable"] else "0",
            info["colour"] or "inherit",
            info["state_label"],
            info["progress"],
            info["sent_size"],
            info["percent"],
            info["status"],
        )

    @admin.display(description="files not sent")
    def problem_instances(self, job: Job) -> str:
        not_sent = job.instances.exclude(
            state__in=[InstanceState.SENT, InstanceState.PRESENT]
        )
        counts = dict(not_sent.values_list("state").annotate(n=Count("id")).order_by())
        if not counts:
            return "—"
        total = sum(counts.values())
        rows = list(not_sent.values_list("path", "state", "message")[:100])
        summary = ", ".join(
            f"{counts[s]} {InstanceState(s).label.lower()}"
            for s in InstanceState.values
            if counts.get(s)
        )
        more = (
            format_html("<li>… and {} more</li>", total - len(rows))
            if total > len(rows)
            else ""
        )
        return format_html(
            '<details id="job-files"><summary>{} file{} not sent ({})</summary>'
            "<ul>{}{}</ul></details>",
            total,
            pluralize(total),
            summary,
            format_html_join(
                "", "<li><code>{}</code>: {} {}</li>", ((p, s, m) for p, s, m in rows)
            ),
            more,
        )

    # -- numbers at the top ------------------------------------------------------------
    def changelist_view(self, request: HttpRequest, extra_context=None):
        extra_context = {**(extra_context or {}), "summary": status_summary()}
        return super().changelist_view(request, extra_context=extra_context)

    # -- live progress and the job page's buttons --------------------------------------
    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path(
                "progress/",
                view(self.progress_view),
                name="dispatch_job_progress",
            ),
            path(
                "<int:object_id>/retry/",
                view(require_POST(self.retry_view)),
                name="dispatch_job_retry",
            ),
            path(
                "<int:object_id>/cancel/",
                view(require_POST(self.cancel_view)),
                name="dispatch_job_cancel",
            ),
        ] + super().get_urls()

    def progress_view(self, request: HttpRequest) -> JsonResponse:
        """Progress of the jobs in `ids` (and the summary) for the pages' poll."""
        if not self.has_view_permission(request):
            return JsonResponse({"error": "forbidden"}, status=403)
        ids = [int(i) for i in request.GET.get("ids", "").split(",") if i.isdigit()][
            :POLL_LIMIT
        ]
        now = timezone.now()
        jobs = Job.objects.filter(pk__in=ids)
        newest = Job.objects.order_by("-id").values_list("id", flat=True).first
        data = {"jobs": [job_progress(job, now) for job in jobs]}
        if request.GET.get("summary") != "0":  # the job page does not show it
            data.update(summary=status_summary(now), newest=newest() or 0)
        return JsonResponse(data)

    def retry_view(self, request: HttpRequest, object_id: int):
        job = get_object_or_404(Job, pk=object_id)
        if not self.has_change_permission(request, job):
            return JsonResponse({"error": "forbidden"}, status=403)
        self._retry(request, [job])
        return HttpResponseRedirect(reverse("admin:dispatch_job_change", args=[job.pk]))

    def cancel_view(self, request: HttpRequest, object_id: int):
        job = get_object_or_404(Job, pk=object_id)
        if not self.has_change_permission(request, job):
            return JsonResponse({"error": "forbidden"}, status=403)
        self._cancel(request, [job])
        return HttpResponseRedirect(reverse("admin:dispatch_job_change", args=[job.pk]))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        job = self.get_object(request, object_id)
        extra_context = extra_context or {}
        if job is not None:
            extra_context.update(
                can_retry=not services.retry_refusal(job),
                can_cancel=job.state in ACTIVE_STATES,
                may_act=self.has_change_permission(request, job),
            )
        return super().change_view(request, object_id, form_url, extra_context)

    def _retry(self, request: HttpRequest, jobs: list[Job]) -> None:
        now = timezone.now()
        refusals = [r for r in (services.retry_refusal(j, now) for j in jobs) if r]
        n = services.retry_now(jobs)
        if n:
            self.message_user(
                request, f"{n} job{pluralize(n)} queued again.", messages.SUCCESS
            )
        for refusal in refusals[:10]:
            self.message_user(request, f"Not retried: {refusal}.", messages.WARNING)
        if len(refusals) > 10:
            self.message_user(
                request,
                f"… and {len(refusals) - 10} more not retried.",
                messages.WARNING,
            )

    def _cancel(self, request: HttpRequest, jobs: list[Job]) -> None:
        n = services.cancel(jobs)
        left = len(jobs) - n
        if n:
            self.message_user(
                request, f"{n} job{pluralize(n)} cancelled.", messages.SUCCESS
            )
        if left:
            self.message_user(
                request,
                f"{left} job{pluralize(left)} not cancelled: already finished.",
                messages.WARNING,
            )

    # -- actions -----------------------------------------------------------------------
    @admin.action(description="Retry selected jobs now", permissions=["change"])
    def retry_now_action(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._retry(request, list(queryset))

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel_action(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._cancel(request, list(queryset))

    @admin.action(
        description="Pause the targets of selected jobs", permissions=["change"]
    )
    def pause_targets(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        targets = Target.objects.filter(pk__in=queryset.values("target_id"))
        names = ", ".join(t.name for t in targets)
        target_services.pause_targets(targets)
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
