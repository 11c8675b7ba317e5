"""Targets in the admin: an overview of every kind, a kind chooser, per-kind forms
and a real Test button (a POST view added through `get_urls()`)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.forms.models import modelform_factory
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from .forms import TargetForm
from .models import PROXIES, QUERYABLE_KINDS, Kind, Target
from .secrets import EncryptedTextField
from .services import run_test

DISPATCH_FIELDS = (
    "max_associations",
    "retry_max_attempts",
    "retry_base_delay",
    "retry_max_delay",
    "paused",
)

SECRET_FIELDS = [
    f.name for f in Target._meta.get_fields() if isinstance(f, EncryptedTextField)
]

# One line per kind on the "Add target" chooser.
KIND_HINTS = {
    Kind.DICOM: "C-STORE to a PACS, modality or workstation (DIMSE).",
    Kind.DICOM_TLS: "DICOM over TLS, with certificates.",
    Kind.DICOMWEB: "STOW-RS / QIDO-RS / WADO-RS over HTTP(S).",
    Kind.FOLDER: "Files in a local or mounted folder, one folder per series.",
    Kind.RSYNC: "rsync over SSH to a remote folder.",
    Kind.S3: "Objects in an S3 bucket (AWS or any S3-compatible store).",
    Kind.SFTP: "Files over SFTP to a remote folder.",
    Kind.XNAT: "Sessions in an XNAT project.",
}

# The one name of the action that pins an SSH host key (button, admin action, hints).
TRUST_HOST_KEY = "Trust host key"

OK_COLOUR = "#2e7d32"
FAILED_COLOUR = "#c62828"


def _as_target(obj: Target) -> Target:
    """The concrete `Target` view of a proxy instance (for URLs and the history)."""
    if type(obj) is Target:
        return obj
    base = Target.__new__(Target)
    base.__dict__ = obj.__dict__.copy()
    return base


def _short(value, limit: int = 80) -> str:
    # A public key blob in the details would stretch the table; the fingerprint beside
    # it is what people compare.
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(ms: float) -> str:
    return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"


def _when(value) -> str:
    return date_format(timezone.localtime(value), "Y-m-d H:i:s") if value else ""


@admin.register(Target)
class TargetAdmin(admin.ModelAdmin):
    form = TargetForm
    list_display = (
        "name",
        "kind",
        "direction",
        "address_column",
        "enabled",
        "last_test_column",
    )
    list_display_links = ("name",)
    list_filter = ("kind", "direction", "enabled")
    search_fields = (
        "name",
        "host",
        "path",
        "url",
        "bucket",
        "endpoint_url",
        "called_aet",
    )
    actions = ["test_selected", "trust_host_key", "pause_dispatch", "resume_dispatch"]
    readonly_fields = ("kind_display", "last_test_display")

    # -- overview -----------------------------------------------------------------------
    @admin.display(description="address")
    def address_column(self, obj: Target) -> str:
        return obj.address

    @admin.display(description="last test", ordering="last_test_at")
    def last_test_column(self, obj: Target) -> str:
        if obj.last_test_at is None:
            return "never"
        ok = obj.last_test_ok
        return format_html(
            '<span style="white-space:nowrap"><span class="test-{}" '
            'style="color:{};font-weight:bold" title="{}">{}</span> {}</span>',
            "ok" if ok else "failed",
            OK_COLOUR if ok else FAILED_COLOUR,
            obj.last_test_message,
            "ok" if ok else "failed",
            _when(obj.last_test_at),
        )

    # -- per-kind forms ---------------------------------------------------------------
    def _kind(self, request: HttpRequest, obj: Target | None) -> str:
        if obj is not None:
            return obj.kind
        kind = request.GET.get("kind", "")
        if kind not in PROXIES:
            raise Http404("Unknown target kind.")
        return kind

    def get_object(self, request, object_id, from_field=None):
        obj = super().get_object(request, object_id, from_field)
        return obj.as_kind() if obj is not None and obj.kind in PROXIES else obj

    def get_fieldsets(self, request, obj=None):
        proxy = PROXIES[self._kind(request, obj)]
        connection = proxy.connection_fields
        if obj is not None and not self.has_change_permission(request, obj):
            # A view-only page shows every field read-only, which would print a
            # secret's value: show whether it is set instead.
            connection = tuple(
                f"{name}_status" if name in SECRET_FIELDS else name
                for name in connection
            )
        fieldsets = [
            (None, {"fields": ("name", "kind_display", "direction", "enabled")}),
            ("Connection", {"fields": connection}),
            ("Information", {"fields": ("contact_email", "description")}),
            (
                "Dispatch",
                {
                    "fields": DISPATCH_FIELDS,
                    "description": "How the worker sends to this target.",
                },
            ),
        ]
        if obj is not None:
            fieldsets.insert(1, ("Last test", {"fields": ("last_test_display",)}))
        return fieldsets

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        proxy = PROXIES[self._kind(request, obj)]
        # Build the same form for the kind's proxy model, so ModelForm validation
        # runs the proxy's clean().
        return modelform_factory(
            proxy,
            form=form,
            fields=form._meta.fields,
            formfield_callback=form._meta.formfield_callback,
        )

    @admin.display(description="kind")
    def kind_display(self, obj: Target | None) -> str:
        return obj.get_kind_display() if obj is not None else ""

    @admin.display(description="result")
    def last_test_display(self, obj: Target) -> str:
        if obj is None or obj.last_test_at is None:
            return "Not tested yet: press Test above."
        checks = (obj.last_test_result or {}).get("checks", [])
        host = (obj.last_test_result or {}).get("host", "")
        rows = format_html_join(
            "",
            '<tr class="check-{}"><td>{}</td><td style="color:{};font-weight:bold">{}'
            "</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            (
                (
                    "ok" if c.get("ok") else "failed",
                    c.get("name", ""),
                    OK_COLOUR if c.get("ok") else FAILED_COLOUR,
                    "ok"
                    if c.get("ok")
                    else ("info" if c.get("informational") else "failed"),
                    c.get("message", ""),
                    _duration(c.get("duration_ms") or 0),
                    "; ".join(
                        f"{k}: {_short(v)}" for k, v in (c.get("details") or {}).items()
                    ),
                )
                for c in checks
            ),
        )
        return format_html(
            '<p><span style="color:{};font-weight:bold">{}</span> at {}{}: {}</p>{}'
            '<table class="test-result"><thead><tr><th>check</th><th>result</th>'
            "<th>message</th><th>duration</th><th>details</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            OK_COLOUR if obj.last_test_ok else FAILED_COLOUR,
            "passed" if obj.last_test_ok else "failed",
            _when(obj.last_test_at),
            format_html(" on {}", host) if host else "",
            obj.last_test_message,
            self._trust_button(obj),
            rows,
        )

    def _trust_button(self, obj: Target) -> str:
        """ "Trust host key" for the SSH host key the last Test saw, if not pinned.

        The button submits the form beside the Test button (outside this form).
        """
        from .kinds.ssh import last_presented_host_key, normalise_fingerprint

        seen = last_presented_host_key(obj)
        if seen is None or seen.fingerprint == normalise_fingerprint(obj.host_key):
            return ""
        return format_html(
            '<p class="trust-host-key">The server presented the host key<br>'
            "<code>{}</code> ({}).<br>Check it with the server's administrator, "
            'then: <button type="submit" form="trust-host-key-form" '
            'name="fingerprint" value="{}" id="trust-host-key-button" '
            'class="button">{}</button></p>',
            seen.fingerprint,
            seen.key_type,
            seen.fingerprint,
            TRUST_HOST_KEY,
        )

    # -- add: choose the kind first --------------------------------------------------
    def add_view(self, request, form_url="", extra_context=None):
        if request.GET.get("kind") not in PROXIES:
            return self.kind_chooser_view(request)
        proxy = PROXIES[request.GET["kind"]]
        extra_context = {
            **(extra_context or {}),
            "title": f"Add {proxy._meta.verbose_name}",
        }
        return super().add_view(request, form_url, extra_context)

    def kind_chooser_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_add_permission(request):
            raise PermissionDenied
        add_url = reverse("admin:targets_target_add", current_app=self.admin_site.name)
        params = request.GET.copy()
        params.pop("kind", None)
        kinds = []
        for kind, label in Kind.choices:
            if kind not in PROXIES:
                continue
            params["kind"] = kind
            kinds.append(
                {
                    "kind": kind,
                    "label": label,
                    "url": f"{add_url}?{params.urlencode()}",
                    "can_query": kind in QUERYABLE_KINDS,
                    "hint": KIND_HINTS.get(kind, ""),
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Add target: choose its kind",
            "kinds": kinds,
            "has_view_permission": self.has_view_permission(request),
        }
        return TemplateResponse(
            request, "admin/targets/target/choose_kind.html", context
        )

    # -- history and redirects under the concrete model --------------------------------
    def response_add(self, request, obj, post_url_continue=None):
        return super().response_add(request, _as_target(obj), post_url_continue)

    def response_change(self, request, obj):
        return super().response_change(request, _as_target(obj))

    def log_addition(self, request, obj, message):
        return super().log_addition(request, _as_target(obj), message)

    def log_change(self, request, obj, message):
        return super().log_change(request, _as_target(obj), message)

    def log_deletions(self, request, queryset):
        return super().log_deletions(request, [_as_target(obj) for obj in queryset])

    # -- Test ----------------------------------------------------------------------------
    def get_urls(self):
        urls = super().get_urls()
        return [
            path(
                "<path:object_id>/test/",
                self.admin_site.admin_view(self.test_view),
                name=f"{self.opts.app_label}_{self.opts.model_name}_test",
            ),
            path(
                "<path:object_id>/trust-host-key/",
                self.admin_site.admin_view(self.trust_host_key_view),
                name=f"{self.opts.app_label}_{self.opts.model_name}_trust_host_key",
            ),
        ] + urls

    def trust_host_key_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return require_POST(self._trust_host_key_view)(request, object_id)

    def _trust_host_key_view(self, request: HttpRequest, object_id: str):
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404("No such target.")
        if not self.has_change_permission(request, obj):
            raise PermissionDenied
        self._trust(request, obj, request.POST.get("fingerprint", ""))
        return HttpResponseRedirect(
            reverse(
                "admin:targets_target_change",
                args=(quote(obj.pk),),
                current_app=self.admin_site.name,
            )
        )

    def _trust(self, request: HttpRequest, obj: Target, fingerprint: str) -> None:
        """Pin `fingerprint` (one the last Test saw) on an SFTP or rsync target."""
        from .kinds.base import TargetError
        from .kinds.ssh import last_presented_host_key, pin_host_key

        seen = last_presented_host_key(obj)
        if seen is None or not fingerprint:
            self.message_user(
                request,
                f"{obj.name}: no host key to trust; run Test first "
                "(SFTP and rsync targets only).",
                messages.WARNING,
            )
            return
        try:
            pinned = pin_host_key(obj, fingerprint)
        except TargetError as exc:
            self.message_user(request, f"{obj.name}: {exc.message}", messages.ERROR)
            return
        self.log_change(request, obj, f"Pinned host key {pinned.describe()}")
        self.message_user(
            request,
            f"{obj.name}: pinned host key {pinned.describe()}.",
            messages.SUCCESS,
        )

    def test_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return require_POST(self._test_view)(request, object_id)

    def _test_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            raise Http404("No such target.")
        if not self.has_change_permission(request, obj):
            raise PermissionDenied
        result = run_test(obj)
        self._report(request, obj, result)
        change_url = reverse(
            "admin:targets_target_change",
            args=(quote(obj.pk),),
            current_app=self.admin_site.name,
        )
        return HttpResponseRedirect(change_url)

    def _report(self, request, obj: Target, result) -> None:
        if result.ok:
            self.message_user(
                request,
                f"Test of {obj.name} passed: {result.summary}",
                messages.SUCCESS,
            )
        else:
            self.message_user(
                request, f"Test of {obj.name} failed: {result.summary}", messages.ERROR
            )

    @admin.action(description=TRUST_HOST_KEY, permissions=["change"])
    def trust_host_key(self, request: HttpRequest, queryset) -> None:
        """Pin, on each selected SFTP or rsync target, the key its last Test saw."""
        from .kinds.ssh import last_presented_host_key

        for obj in queryset:
            obj = obj.as_kind()
            seen = last_presented_host_key(obj)
            self._trust(request, obj, seen.fingerprint if seen else "")

    @admin.action(description="Test selected targets", permissions=["change"])
    def test_selected(self, request: HttpRequest, queryset) -> None:
        passed = failed = 0
        for obj in queryset:
            result = run_test(obj)
            self._report(request, obj, result)
            if result.ok:
                passed += 1
            else:
                failed += 1
        level = messages.SUCCESS if not failed else messages.WARNING
        self.message_user(
            request,
            f"Tested {passed + failed}: {passed} passed, {failed} failed.",
            level,
        )

    @admin.action(
        description="Pause dispatch to selected targets", permissions=["change"]
    )
    def pause_dispatch(self, request: HttpRequest, queryset) -> None:
        from dispatch.services import pause_targets

        n = pause_targets(queryset)
        self.message_user(
            request,
            f"Paused dispatch to {n} target(s): their jobs wait until resumed.",
            messages.SUCCESS,
        )

    @admin.action(
        description="Resume dispatch to selected targets", permissions=["change"]
    )
    def resume_dispatch(self, request: HttpRequest, queryset) -> None:
        from dispatch.services import resume_targets

        n = resume_targets(queryset)
        self.message_user(
            request,
            f"Resumed dispatch to {n} target(s): their waiting jobs are queued.",
            messages.SUCCESS,
        )


def _secret_status(name: str):
    @admin.display(description=Target._meta.get_field(name).verbose_name)
    def status(self, obj: Target) -> str:
        return "set" if getattr(obj, name, "") else "not set"

    return status


for _name in SECRET_FIELDS:
    setattr(TargetAdmin, f"{_name}_status", _secret_status(_name))
