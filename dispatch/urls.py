from __future__ import annotations

from django.urls import path

from . import views

app_name = "dispatch"

urlpatterns = [
    path("health/", views.health, name="health"),
]
