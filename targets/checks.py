"""System checks for Courier's configuration (run at start-up by every command)."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


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


@register(Tags.security)
def check_data_dir(app_configs, **kwargs):
    """courier.W010: the data directory and its files are Courier's user's alone."""
    from .paths import loose_files

    loose = loose_files(settings.DATA_DIR)
    if not loose:
        return []
    shown = ", ".join(str(p) for p in loose[:5])
    return [
        Warning(
            f"Others may read or write the data directory or its files: {shown}.",
            hint="It holds the database (sessions too) and the keys: run Courier "
            "as the user owning it (it then fixes the modes at start-up), or "
            f"chmod 700 {settings.DATA_DIR} and chmod 600 the files in it.",
            id="courier.W010",
        )
    ]
