from django.urls import path

from . import views

app_name = "querytool"
urlpatterns = [
    path("", views.query_page, name="query"),
    path("retrieve/", views.retrieve, name="retrieve"),
    path("reindex/", views.reindex, name="reindex"),
    path("jobs.json", views.jobs_json, name="jobs_json"),
    path("jobs/<int:pk>/cancel/", views.cancel_job, name="cancel"),
    path("jobs/<int:pk>/retry/", views.retry_job, name="retry"),
]
