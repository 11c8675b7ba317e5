"""System checks for Courier's configuration (run at start-up by every command)."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.security, deploy=False)
def check_encryption_key(app_configs, **kwargs):
    """courier.E001: stored target secrets must decrypt with the configured key."""
    from django.db import connection
    from django.db.utils import DatabaseError

    from .secrets import SecretKeyMismatch

    errors = []
    if not settings.COURIER_ENCRYPTION_KEY:
        return [Error("COURIER_ENCRYPTION_KEY is empty.", id="courier.E001")]
    try:
        if "targets_target" not in connection.introspection.table_names():
            return []
        from .models import Target

        for _target in Target.objects.only(
            "password", "token", "secret_key", "key_passphrase", "private_key"
        ).iterator():
            pass
    except SecretKeyMismatch as exc:
        errors.append(
            Error(
                str(exc),
                hint="Set COURIER_ENCRYPTION_KEY to the key "
                "used when the secrets were saved.",
                id="courier.E001",
            )
        )
    except DatabaseError:
        pass
    return errors
