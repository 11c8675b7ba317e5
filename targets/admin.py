"""Targets in the admin: an overview of every kind, a kind chooser, per-kind forms
and a real Test button (a POST view added through `get_urls()`)."""

# Why this module is long: it is the one Target admin (overview columns, the
# kind chooser, per-kind forms, Test and Trust host key views, bulk actions), whose
# methods share its form building; split, each part would reach into the others.

from __future__ import annotations

import dataclasses
import socket

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import IS_POPUP_VAR, csrf_protect_m
from django.contrib.admin.utils import flatten_fieldsets, quote, unquote
from django.core.exceptions import PermissionDenied
from django.forms.models import modelform_factory
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from .forms import REPOINT_NOTE, TargetForm
from .kinds.base import CheckReport
from .models import PROXIES, Kind, Target
from .secrets import EncryptedTextField
from .services import pause_targets, resume_targets, run_test

DISPATCH_FIELDS = (
    "max_connections",
    "retry_max_attempts",
    "retry_base_delay",
    "retry_max_delay",
    "paused",
)

SECRET_FIELDS = [
    f.name for f in Target._meta.get_fields() if isinstance(f, EncryptedTextField)
]

# The one name of the action that pins an SSH host key (button, admin action, hints).
TRUST_HOST_KEY = "Trust host key"

OK_COLOUR = "#2e7d32"
FAILED_COLOUR = "#c62828"
PAUSED_COLOUR = "#9e6a03"


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


def result_html(ok: bool, when, host: str, summary: str, checks: list[dict]) -> str:
    """A Test outcome as the target page shows it: a line, then one row per check."""
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
        '<p><span style="color:{};font-weight:bold">{}</span> at {}{}: {}</p>'
        '<table class="test-result"><thead><tr><th>check</th><th>result</th>'
        "<th>message</th><th>duration</th><th>details</th></tr></thead>"
        "<tbody>{}</tbody></table>",
        OK_COLOUR if ok else FAILED_COLOUR,
        "passed" if ok else "failed",
        _when(when),
        format_html(" on {}", host) if host else "",
        summary,
        rows,
    )


def settings_under_test(form: TargetForm) -> tuple[Target, list[str]]:
    """The target as the valid, unsaved `form` describes it, and what was left out.

    Secrets left blank mean "keep the stored one", except when the form points the
    target at another host, URL, port or user: the form then clears the stored
    secrets and the pinned host key (they must not go to a new address), and so
    does the test.
    """
    notes = [
        f"the stored {label} was not used (the address changed)"
        for label in form.cleared_labels()
    ]
    return form.instance, notes


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("paused", "Paused"), ("disabled", "Disabled")]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "active":
            return queryset.filter(enabled=True, paused=False)
        if value == "paused":
            return queryset.filter(enabled=True, paused=True)
        if value == "disabled":
            return queryset.filter(enabled=False)
        return queryset


@admin.register(Target)
class TargetAdmin(admin.ModelAdmin):
    form = TargetForm
    list_display = (
        "name",
        "kind",
        "direction",
        "address_column",
        "status_column",
        "last_test_column",
    )
    list_display_links = ("name",)
    list_filter = ("kind", "direction", StatusFilter)
    search_fields = (
        "name",
        "host",
        "path",
        "url",
        "bucket",
        "endpoint_url",
        "called_aet",
        "username",
        "contact_email",
        "description",
    )
    filter_horizontal = ("export_groups",)
    actions = ["test_selected", "trust_host_key", "pause_dispatch", "resume_dispatch"]
    readonly_fields = ("kind_display", "last_test_display")

    class Media:
        css = {"all": ["targets/target_admin.css"]}
        js = ["targets/target_admin.js"]

    # -- overview -----------------------------------------------------------------------
    @admin.display(description="address")
    def address_column(self, obj: Target) -> str:
        return obj.address

    @admin.display(description="status", ordering="enabled")
    def status_column(self, obj: Target) -> str:
        if not obj.enabled:
            state, colour = "disabled", "#666"
        elif obj.paused:
            state, colour = "paused", PAUSED_COLOUR
        else:
            state, colour = "active", OK_COLOUR
        return format_html(
            '<span class="target-status-{}" style="color:{};font-weight:bold">{}</span>',
            state,
            colour,
            state,
        )

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
        guarded = any(n in SECRET_FIELDS or n == "host_key" for n in connection)
        # Connection, Information, Query tool and Dispatch become tabs in the
        # browser (target_admin.js); without JavaScript they are the usual sections.
        fieldsets = [
            (None, {"fields": ("name", "kind_display", "direction", "enabled")}),
            (
                "Connection",
                {
                    "fields": connection,
                    "description": REPOINT_NOTE if obj is not None and guarded else "",
                    "classes": ("target-tab",),
                },
            ),
            (
                "Information",
                {
                    "fields": ("contact_email", "description"),
                    "classes": ("target-tab",),
                    "description": "For the record: whom to call when this target "
                    "has a problem, and what it is.",
                },
            ),
            (
                "Query tool",
                {
                    "fields": ("export_groups",),
                    "description": "Who may send studies retrieved on the query "
                    "page to this target (besides users allowed every target).",
                    "classes": ("target-tab",),
                },
            ),
            (
                "Dispatch",
                {
                    "fields": DISPATCH_FIELDS,
                    "description": "How the worker sends to this target.",
                    "classes": ("target-tab",),
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

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        cleared = form.cleared_labels() if change else []
        if cleared:
            self.message_user(
                request,
                f"{obj.name} points somewhere new, so its stored "
                f"{', '.join(cleared)} {'was' if len(cleared) == 1 else 'were'} "
                "cleared: enter them again if the new address needs them.",
                messages.WARNING,
            )

    @admin.display(description="kind")
    def kind_display(self, obj: Target | None) -> str:
        return obj.get_kind_display() if obj is not None else ""

    @admin.display(description="result")
    def last_test_display(self, obj: Target) -> str:
        if obj is None or obj.last_test_at is None:
            return "Not tested yet: press Test."
        stored = obj.last_test_result or {}
        return format_html(
            "{}{}",
            self._trust_button(obj),
            result_html(
                bool(obj.last_test_ok),
                obj.last_test_at,
                stored.get("host", ""),
                obj.last_test_message,
                stored.get("checks", []),
            ),
        )

    def _trust_button(self, obj: Target) -> str:
        """Offer "Trust host key" for the SSH host key the last Test saw, if not pinned.

        The button submits the form beside the Test button (outside this form).
        """
        from .ssh import last_presented_host_key, normalise_fingerprint

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
        for kind, proxy in PROXIES.items():
            params["kind"] = kind
            kinds.append(
                {
                    "kind": kind,
                    "label": Kind(kind).label,
                    "url": f"{add_url}?{params.urlencode()}",
                    "can_query": proxy.query_source_path is not None,
                    "hint": proxy.hint,
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

    # -- the form: rules for fields that do not apply, and Test without saving -------
    def render_change_form(
        self, request, context, add=False, change=False, form_url="", obj=None
    ):
        proxy = PROXIES[self._kind(request, obj)]
        context["show_if"] = [dataclasses.asdict(rule) for rule in proxy.show_if]
        return super().render_change_form(request, context, add, change, form_url, obj)

    @csrf_protect_m
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        if request.method == "POST" and "_test" in request.POST:
            # Outside the admin's transaction: a Test can take many seconds, and on
            # SQLite an open write transaction would hold off the workers' writes.
            return self._test_form_view(request, object_id, form_url, extra_context)
        return super().changeform_view(request, object_id, form_url, extra_context)

    def _test_form_view(self, request, object_id, form_url, extra_context):
        """Test the settings as they are in the form, without saving them.

        When the form holds the saved settings unchanged, this is the ordinary Test
        (its result is stored); otherwise the result is shown above the form, the
        edits stay in it, and the target's last test is left alone.
        """
        add = object_id is None
        if add:
            if not self.has_add_permission(request):
                raise PermissionDenied
            obj = None
        else:
            obj = self.get_object(request, unquote(object_id))
            if obj is None:
                return self._get_obj_does_not_exist_redirect(
                    request, self.opts, object_id
                )
            if not self.has_change_permission(request, obj):
                raise PermissionDenied
        fieldsets = self.get_fieldsets(request, obj)
        form_class = self.get_form(
            request, obj, change=not add, fields=flatten_fieldsets(fieldsets)
        )
        form = form_class(request.POST, request.FILES, instance=obj)
        form_test = ""
        if not form.is_valid():
            self.message_user(
                request,
                "Not tested: correct the errors below first.",
                messages.ERROR,
            )
        elif not add and not form.has_changed():
            self._report(request, obj, run_test(form.instance))
            return HttpResponseRedirect(request.get_full_path())
        else:
            target, notes = settings_under_test(form)
            result = run_test(target, store=False)
            form_test = self._form_test_html(result, notes)
            self.message_user(
                request,
                f"Test of the settings in the form (not saved) "
                f"{'passed' if result.ok else 'failed'}: {result.summary}",
                messages.SUCCESS if result.ok else messages.ERROR,
            )
            if typed := self._typed_secrets(form):
                # Never sent back to the browser: a Save now would drop them (or
                # keep the old ones) without a word, after a Test that used them.
                self.message_user(
                    request,
                    f"Type the {' and '.join(typed)} again before saving: "
                    f"{'it was' if len(typed) == 1 else 'they were'} used for this "
                    "Test, but secrets are never sent back to the browser, so the "
                    "form below no longer holds "
                    f"{'it' if len(typed) == 1 else 'them'}.",
                    messages.WARNING,
                )
        admin_form = helpers.AdminForm(
            form,
            list(fieldsets),
            self.get_prepopulated_fields(request, obj),
            self.get_readonly_fields(request, obj),
            model_admin=self,
        )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Add {form._meta.model._meta.verbose_name}"
            if add
            else f"Change {self.opts.verbose_name}",
            "subtitle": str(obj) if obj else None,
            "adminform": admin_form,
            "object_id": object_id,
            "original": obj,
            "is_popup": IS_POPUP_VAR in request.POST or IS_POPUP_VAR in request.GET,
            "to_field": None,
            "media": self.media + admin_form.media,
            "inline_admin_formsets": [],
            "errors": helpers.AdminErrorList(form, []),
            "preserved_filters": self.get_preserved_filters(request),
            "form_test": form_test,
            **(extra_context or {}),
        }
        return self.render_change_form(
            request, context, add=add, change=not add, obj=obj, form_url=form_url
        )

    @staticmethod
    def _typed_secrets(form: TargetForm) -> list[str]:
        """Labels of the secrets a value was typed into in this form."""
        return [
            str(form.fields[name].label).lower()
            for name in form.secret_fields
            if form.data.get(f"{form.add_prefix(name)}_0")
        ]

    def _form_test_html(self, result: CheckReport, notes: list[str]) -> str:
        html = result_html(
            result.ok,
            timezone.now(),
            socket.gethostname(),
            result.summary if result.checks else "No checks ran.",
            result.as_dict()["checks"],
        )
        if notes:
            html = format_html(
                '{}<p class="form-test-notes">Left out: {}.</p>', html, "; ".join(notes)
            )
        return html

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
        from .ssh import last_presented_host_key, pin_host_key

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
        from .ssh import last_presented_host_key

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
        n = self.resume(queryset)
        self.message_user(
            request,
            f"Resumed dispatch to {n} target(s): their waiting jobs are queued.",
            messages.SUCCESS,
        )

    def resume(self, targets) -> int:
        """Resume dispatch to `targets` (dispatch's extension of this admin also
        queues their waiting jobs at once)."""
        return resume_targets(targets)


def _secret_status(name: str):
    @admin.display(description=Target._meta.get_field(name).verbose_name)
    def status(self, obj: Target) -> str:
        return "set" if getattr(obj, name, "") else "not set"

    return status


for _name in SECRET_FIELDS:
    setattr(TargetAdmin, f"{_name}_status", _secret_status(_name))
