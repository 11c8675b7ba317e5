"""Field validators shared by the target kinds."""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ValidationError

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def validate_ae_title(value: str) -> None:
    """Check an AE title: 1-16 characters, no backslash or control characters,
    not all spaces (PS3.5 6.2, VR AE)."""
    if value is None or value == "":
        return
    if len(value) > 16:
        raise ValidationError(
            "An AE title has at most 16 characters (this one has %(n)d).",
            params={"n": len(value)},
            code="ae_length",
        )
    if "\\" in value:
        raise ValidationError(
            "An AE title cannot contain a backslash.", code="ae_backslash"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError(
            "An AE title cannot contain control characters.", code="ae_control"
        )
    if not value.strip(" "):
        raise ValidationError("An AE title cannot be all spaces.", code="ae_spaces")


def validate_host(value: str) -> None:
    """Accept a DNS name, an IPv4 or an IPv6 address (brackets allowed)."""
    if not value:
        return
    candidate = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(candidate)
        return
    except ValueError:
        pass
    name = candidate.rstrip(".")
    if (
        len(name) > 253
        or not name
        or not all(_HOSTNAME_LABEL.match(label) for label in name.split("."))
    ):
        raise ValidationError(
            "Enter a host name, an IPv4 address or an IPv6 address.", code="host"
        )


def split_globs(value: str) -> list[str]:
    """Split a comma-separated exclusion filter into trimmed, non-empty globs."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def validate_globs(value: str) -> None:
    for glob in split_globs(value):
        if "/" in glob and glob.startswith("/"):
            raise ValidationError(
                "Exclusion patterns match names inside the series, not absolute paths "
                "(%(g)s).",
                params={"g": glob},
                code="glob",
            )
