"""Folder settings: an absolute path and a layout of known DICOM keywords."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError

from targets.series import layout_error

if TYPE_CHECKING:
    from targets.models import Target


def clean(target: Target) -> None:
    errors = {}
    if target.path and not target.path.startswith("/"):
        errors["path"] = "Enter an absolute path (starting with /)."
    target.layout = (target.layout or "").strip()
    if target.layout and (problem := layout_error(target.layout)):
        errors["layout"] = problem
    if errors:
        raise ValidationError(errors)
