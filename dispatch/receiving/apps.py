from django.apps import AppConfig


class ReceivingConfig(AppConfig):
    name = "dispatch.receiving"
    label = "receiving"
    verbose_name = "Receiving"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers system checks)
