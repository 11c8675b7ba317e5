"""Courier's admin site: its name in the header and a status panel on its home page."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig


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


class CourierAdminConfig(AdminConfig):
    default_site = "config.admin_site.CourierAdminSite"
