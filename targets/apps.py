from django.apps import AppConfig


class TargetsConfig(AppConfig):
    name = "targets"
    verbose_name = "Targets"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers system checks)
