"""Courier's admin site: its name in the header and a status panel on its home page."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.apps import SimpleAdminConfig
from django.contrib.admin.checks import check_admin_app, check_dependencies
from django.core import checks


class CourierAdminSite(admin.AdminSite):
    site_header = "Courier"
    site_title = "Courier"
    index_title = "Status"
    # No "View site": the header links staff to the query page instead.
    site_url = None

    def index(self, request, extra_context=None):
        # Imported when the page is asked for: this module loads with the app
        # registry, before any model may be imported.
        from dispatch.overview import site_status

        context = dict(extra_context or {})
        if request.user.has_perm("dispatch.view_job"):
            context["status"] = site_status()
        return super().index(request, context)


def check_admin_pages(app_configs, **kwargs):
    """Django's admin checks, over every app's admin module (loaded first)."""
    admin.autodiscover()
    return check_admin_app(app_configs, **kwargs)


class CourierAdminConfig(SimpleAdminConfig):
    """The admin, its pages loaded with the URLconf instead of at `django.setup()`.

    Every app's admin module imports its services (and with them the senders,
    pydicom, pynetdicom): most of a management command's start-up, for pages it
    never serves. `config.urls` runs the autodiscovery (the web server loads the
    URLconf before its first request, `config.wsgi`), and so do the admin's checks.
    """

    default_site = "config.admin_site.CourierAdminSite"

    def ready(self) -> None:
        checks.register(check_dependencies, checks.Tags.admin)
        checks.register(check_admin_pages, checks.Tags.admin)
