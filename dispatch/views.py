"""`/health/` for monitoring: database, queue, receivers, stuck and waiting jobs."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from . import overview


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    status, report = overview.health()
    # 503 only when down; "degraded" answers 200 and says so in `status`.
    return JsonResponse(report, status=503 if status == "down" else 200)
