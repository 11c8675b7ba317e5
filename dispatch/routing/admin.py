"""Admin for routing rules (with a preview of what they would match) and received series."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.defaultfilters import pluralize
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from dispatch.jobs.models import DispatchError
from targets.models import Direction, Target

from . import services
from .matching import RuleSpec
from .models import ReceivedSeries, Rule, RuleCondition

PREVIEW_LIMIT = 50


class RuleConditionInline(admin.TabularInline):
    model = RuleCondition
    extra = 1
    fields = ("field", "keyword", "operator", "value")


@admin.register(Rule)
class RuleAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "enabled",
        "order",
        "match",
        "stream",
        "condition_list",
        "target_list",
    )
    list_editable = ("enabled", "order")
    list_filter = ("enabled",)
    search_fields = ("name", "description")
    filter_horizontal = ("targets",)
    inlines = [RuleConditionInline]
    fields = ("name", "enabled", "order", "match", "stream", "targets", "description")

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("conditions", "targets")

    @admin.display(description="conditions")
    def condition_list(self, rule: Rule) -> str:
        joiner = " and " if rule.match == Rule.Match.ALL else " or "
        return joiner.join(str(c) for c in rule.conditions.all()) or "(every series)"

    @admin.display(description="targets")
    def target_list(self, rule: Rule) -> str:
        return ", ".join(t.name for t in rule.targets.all())

    def get_urls(self):
        view = self.admin_site.admin_view(self.preview_view)
        return [
            path("preview/", view, name="routing_rule_preview"),
            path("<int:object_id>/preview/", view, name="routing_rule_preview_saved"),
        ] + super().get_urls()

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        rule = self.get_object(request, object_id)
        if rule is not None:
            extra_context["preview_rows"] = self._preview_rows(services.rule_spec(rule))
        return super().change_view(request, object_id, form_url, extra_context)

    def _preview_rows(self, spec: RuleSpec) -> list[tuple]:
        return [
            (row, bool(names))
            for row, names in services.preview([spec], limit=PREVIEW_LIMIT)
        ]

    def preview_view(self, request: HttpRequest, object_id: int | None = None):
        """Which recent series the rule as edited (not saved yet) would match."""
        if not self.has_view_permission(request):
            return HttpResponse(status=403)
        data = request.POST if request.method == "POST" else None
        if data is None:
            rule = get_object_or_404(Rule, pk=object_id) if object_id else None
            spec = services.rule_spec(rule) if rule else RuleSpec("", "all", [])
            errors: list[str] = []
        else:
            spec, errors = _spec_from_post(data)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": f"Preview of rule {spec.name or '(unnamed)'}",
            "spec": spec,
            "errors": errors,
            "rows": [] if errors else self._preview_rows(spec),
            "limit": PREVIEW_LIMIT,
        }
        return TemplateResponse(request, "admin/routing/rule_preview.html", context)


def _spec_from_post(data) -> tuple[RuleSpec, list[str]]:
    """Build a `RuleSpec` from the rule form's POST data, with form errors."""
    errors: list[str] = []
    conditions = []
    try:
        total = int(data.get("conditions-TOTAL_FORMS", "0"))
    except ValueError:
        total = 0
    for i in range(min(total, 200)):
        prefix = f"conditions-{i}-"
        if data.get(prefix + "DELETE"):
            continue
        cond = RuleCondition(
            field=data.get(prefix + "field", ""),
            keyword=(data.get(prefix + "keyword") or "").strip(),
            operator=data.get(prefix + "operator", ""),
            value=data.get(prefix + "value", ""),
        )
        if (
            cond.field == RuleCondition.Field.TAG
            and not cond.keyword
            and not cond.value
        ):
            continue  # the empty extra row
        try:
            cond.clean()
        except Exception as exc:  # ValidationError: shown, not raised
            msgs = getattr(exc, "messages", [str(exc)])
            errors.append(f"condition {i + 1}: {' '.join(msgs)}")
            continue
        if cond.operator not in RuleCondition.Operator.values:
            errors.append(f"condition {i + 1}: choose an operator")
            continue
        conditions.append((cond.fact_name, cond.operator, cond.value))
    match = data.get("match") if data.get("match") in Rule.Match.values else "all"
    return RuleSpec(data.get("name", ""), match, conditions), errors


def _store_targets() -> list[Target]:
    """Targets a series can be sent to by hand: enabled, and not query-only."""
    return list(
        Target.objects.filter(
            enabled=True, direction__in=[Direction.STORE, Direction.BOTH]
        ).order_by("name")
    )


def _job_states(series: ReceivedSeries) -> str:
    jobs = list(series.jobs.all())
    if not jobs:
        return "-"
    return ", ".join(f"{j.target.name}: {j.get_state_display()}" for j in jobs)


@admin.register(ReceivedSeries)
class ReceivedSeriesAdmin(admin.ModelAdmin):
    list_display = (
        "last_received_at",
        "state",
        "modality",
        "description",
        "calling_aet",
        "called_aet",
        "instance_count",
        "rules",
        "job_states",
    )
    list_filter = ("state", "calling_aet", "called_aet")
    search_fields = (
        "series_uid",
        "study_uid",
        "calling_aet",
        "called_aet",
        "peer_address",
    )
    date_hierarchy = "last_received_at"
    actions = ["reroute"]
    readonly_fields = (
        "state",
        "note",
        "series_uid",
        "study_uid",
        "calling_aet",
        "called_aet",
        "peer_address",
        "first_received_at",
        "last_received_at",
        "instance_count",
        "bytes",
        "folder",
        "folder_removed_at",
        "routed_at",
        "tags_table",
        "rules",
        "jobs_table",
    )
    fieldsets = (
        (None, {"fields": ("state", "note", "rules", "jobs_table")}),
        (
            "How it arrived",
            {
                "fields": (
                    "calling_aet",
                    "called_aet",
                    "peer_address",
                    "first_received_at",
                    "last_received_at",
                    "instance_count",
                    "bytes",
                    "routed_at",
                )
            },
        ),
        (
            "Series",
            {
                "fields": (
                    "series_uid",
                    "study_uid",
                    "folder",
                    "folder_removed_at",
                    "tags_table",
                )
            },
        ),
    )

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .prefetch_related("matched_rules", "jobs__target")
        )

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_reroute_permission(self, request):
        return request.user.has_perm("routing.view_receivedseries") and (
            request.user.has_perm("dispatch.add_job") or request.user.is_superuser
        )

    @admin.display(description="modality")
    def modality(self, obj: ReceivedSeries) -> str:
        return obj.tags.get("Modality", "")

    @admin.display(description="series description")
    def description(self, obj: ReceivedSeries) -> str:
        return obj.tags.get("SeriesDescription", "")

    @admin.display(description="matched rules")
    def rules(self, obj: ReceivedSeries) -> str:
        return ", ".join(r.name for r in obj.matched_rules.all()) or "-"

    @admin.display(description="jobs")
    def job_states(self, obj: ReceivedSeries) -> str:
        return _job_states(obj)

    @admin.display(description="jobs")
    def jobs_table(self, obj: ReceivedSeries) -> str:
        jobs = list(obj.jobs.select_related("target").order_by("id"))
        if not jobs:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td><a href='{}'>job {}</a></td><td>{}</td><td>{}</td>"
            "<td>{} / {}</td><td>{}</td></tr>",
            (
                (
                    reverse("admin:dispatch_job_change", args=[j.pk]),
                    j.pk,
                    j.target.name,
                    j.get_state_display(),
                    j.done_count,
                    j.total,
                    j.last_error[:200],
                )
                for j in jobs
            ),
        )
        return format_html(
            "<table><tr><th>job</th><th>target</th><th>state</th><th>done</th>"
            "<th>last error</th></tr>{}</table>",
            rows,
        )

    @admin.display(description="tags summary")
    def tags_table(self, obj: ReceivedSeries) -> str:
        tags = obj.tags or {}
        first = [k for k in services.SUMMARY_KEYWORDS if k in tags]
        rest = sorted(k for k in tags if k not in first)
        rows = format_html_join(
            "",
            "<tr><th>{}</th><td>{}</td></tr>",
            ((k, tags[k]) for k in first + rest),
        )
        return format_html("<table>{}</table>", rows) if tags else "-"

    @admin.action(
        description="Re-route selected series with the current rules",
        permissions=["reroute"],
    )
    def reroute(self, request: HttpRequest, queryset) -> None:
        done = []
        for series in queryset:
            result = services.route_series(series.pk, reroute=True)
            if result is None:
                self.message_user(
                    request,
                    f"{series}: not re-routed ({series.get_state_display()}).",
                    messages.WARNING,
                )
            else:
                n = len(result.job_ids)
                done.append(
                    f"{series}: {result.state}, {n} new job{pluralize(n)}"
                    f"{'; ' + result.note if result.note else ''}"
                )
        for line in done:
            self.message_user(request, line, messages.SUCCESS)

    def get_urls(self):
        return [
            path(
                "<int:object_id>/reroute/",
                self.admin_site.admin_view(self.reroute_view),
                name="routing_receivedseries_reroute",
            ),
            path(
                "<int:object_id>/send/",
                self.admin_site.admin_view(self.send_view),
                name="routing_receivedseries_send",
            ),
        ] + super().get_urls()

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        series = self.get_object(request, object_id)
        if series is not None and self.has_reroute_permission(request):
            sendable = (
                series.state
                in (
                    ReceivedSeries.State.UNROUTED,
                    ReceivedSeries.State.FAILED,
                    ReceivedSeries.State.ROUTED,
                )
                and not series.folder_removed_at
            )
            if sendable:
                extra_context["send_targets"] = _store_targets()
        return super().change_view(request, object_id, form_url, extra_context)

    def send_view(self, request: HttpRequest, object_id: int):
        """Send the series to the target chosen on its page (an operator's choice)."""
        if request.method != "POST" or not self.has_reroute_permission(request):
            return HttpResponse(status=405 if request.method != "POST" else 403)
        series = get_object_or_404(ReceivedSeries, pk=object_id)
        back = HttpResponseRedirect(
            reverse("admin:routing_receivedseries_change", args=[series.pk])
        )
        target = next(
            (t for t in _store_targets() if str(t.pk) == request.POST.get("target")),
            None,
        )
        if target is None:
            self.message_user(request, "Choose a target to send to.", messages.ERROR)
            return back
        try:
            result = services.send_by_hand(
                series.pk, target, user=request.user.get_username()
            )
        except DispatchError as exc:
            self.message_user(
                request, f"Not sent to {target.name}: {exc}.", messages.ERROR
            )
            return back
        self.message_user(
            request,
            format_html(
                'Sending to {}: <a href="{}">job {}</a>.',
                target.name,
                reverse("admin:dispatch_job_change", args=[result.job_ids[0]]),
                result.job_ids[0],
            ),
            messages.SUCCESS,
        )
        return back

    def reroute_view(self, request: HttpRequest, object_id: int):
        if request.method != "POST" or not self.has_reroute_permission(request):
            return HttpResponse(status=405 if request.method != "POST" else 403)
        series = get_object_or_404(ReceivedSeries, pk=object_id)
        self.reroute(request, ReceivedSeries.objects.filter(pk=series.pk))
        return HttpResponseRedirect(
            reverse("admin:routing_receivedseries_change", args=[series.pk])
        )
