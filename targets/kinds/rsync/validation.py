"""rsync settings: the SSH ones (as SFTP's), and a completion script that is one
file name or path (Courier adds its arguments)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError

from targets.ssh import settings_errors

if TYPE_CHECKING:
    from targets.models import Target


def clean(target: Target) -> None:
    if errors := settings_errors(target):
        raise ValidationError(errors)
    if target.run_on_complete:
        script = (target.complete_script or "").strip()
        target.complete_script = script
        if not script:
            raise ValidationError(
                {"complete_script": "Name the script to run after the transfer."}
            )
        if any(c in script for c in "\n\r\0\t "):
            raise ValidationError(
                {
                    "complete_script": (
                        "Give only the script's file name or path: no spaces; Courier "
                        "adds the destination folder and target name as arguments."
                    )
                }
            )
