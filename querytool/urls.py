from django.urls import path

from . import views

app_name = "querytool"
urlpatterns = [path("", views.query_page, name="query")]
