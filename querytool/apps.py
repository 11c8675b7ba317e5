from django.apps import AppConfig


class QuerytoolConfig(AppConfig):
    name = "querytool"
    verbose_name = "Query tool"
