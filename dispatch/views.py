"""`/health/` for monitoring: database, queue, age of the oldest waiting job."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from . import services


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    ok, report = services.health()
    return JsonResponse(report, status=200 if ok else 503)
