"""DICOM settings: the User Identity login (username, optionally a password)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError

if TYPE_CHECKING:
    from targets.models import Target

# PS3.7 D.3.3.7.1: the primary and secondary fields have a 2-byte length.
MAX_FIELD_BYTES = 0xFFFF


def clean(target: Target) -> None:
    target.username = (target.username or "").strip()
    errors: dict[str, str] = {}
    if target.password and not target.username:
        errors["password"] = (
            "A password is sent only with a username (User Identity): enter the "
            "username too, or clear the password."
        )
    if len(str(target.password or "").encode("utf-8")) > MAX_FIELD_BYTES:
        errors["password"] = "Too long for DICOM User Identity (at most 65,535 bytes)."
    if errors:
        raise ValidationError(errors)
