"""Query tool in the admin: the audit log and the retrieval jobs, read-only."""

from __future__ import annotations

from django.contrib import admin

from .models import AuditEntry, RetrievalJob


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "at",
        "username",
        "action",
        "source_name",
        "result_count",
        "ok",
        "short_detail",
    )
    list_filter = ("action", "ok", "source_name")
    search_fields = ("username", "source_name", "detail", "criteria")
    date_hierarchy = "at"
    fields = (
        "at",
        "username",
        "user",
        "action",
        "source_name",
        "source",
        "criteria",
        "result_count",
        "ok",
        "detail",
    )

    @admin.display(description="detail")
    def short_detail(self, obj: AuditEntry) -> str:
        return obj.detail[:120]


@admin.register(RetrievalJob)
class RetrievalJobAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "created_at",
        "created_by",
        "source_name",
        "label",
        "destination_label",
        "state",
        "done",
        "failed",
        "total",
    )
    list_filter = ("state", "source_name")
    search_fields = ("label", "study_uid", "source_name", "destination_name")
