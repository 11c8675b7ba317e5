from django.contrib import admin
from django.urls import include, path

# Not at django.setup() (config.admin_site.CourierAdminConfig): only where pages are.
admin.autodiscover()

urlpatterns = [
    path("admin/", admin.site.urls),
    path("query/", include("querytool.urls")),
    path("", include("dispatch.urls")),
]
