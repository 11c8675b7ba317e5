from django.apps import AppConfig


class ReceivingConfig(AppConfig):
    name = "dispatch.receiving"
    label = "receiving"
    verbose_name = "Receiving"
