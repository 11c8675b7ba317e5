from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

# Not at django.setup() (config.admin_site.CourierAdminConfig): only where pages are.
admin.autodiscover()

urlpatterns = [
    # The bare host leads to the admin's home page (its status panel); anonymous
    # users go on to its login.
    path("", RedirectView.as_view(pattern_name="admin:index"), name="root"),
    path("admin/", admin.site.urls),
    path("query/", include("querytool.urls")),
    path("", include("dispatch.urls")),
]
