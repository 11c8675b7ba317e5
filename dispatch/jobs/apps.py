from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "dispatch.jobs"
    # The label of the one app `dispatch` was before it was split in three: the
    # jobs' tables, admin URLs, permissions and migration history stay as they were.
    label = "dispatch"
    verbose_name = "Dispatch"
