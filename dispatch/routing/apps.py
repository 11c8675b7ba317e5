from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "dispatch.routing"
    label = "routing"
    verbose_name = "Routing"
