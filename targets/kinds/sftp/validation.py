"""SFTP settings: the SSH ones (port, pinned fingerprint, one private key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError

from targets.ssh import settings_errors

if TYPE_CHECKING:
    from targets.models import Target


def clean(target: Target) -> None:
    if errors := settings_errors(target):
        raise ValidationError(errors)
