"""S3 settings: an endpoint URL without credentials, a bucket, region and prefix as
S3 spells them, and the secret for an access key id."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

from targets.validators import validate_host

if TYPE_CHECKING:
    from targets.models import Target


def clean(target: Target) -> None:
    errors: dict[str, str] = {}
    target.endpoint_url = (target.endpoint_url or "").strip().rstrip("/")
    if target.endpoint_url:
        error = _endpoint_url_error(target.endpoint_url)
        if error:
            errors["endpoint_url"] = error
    target.bucket = (target.bucket or "").strip()
    if target.bucket and not _S3_BUCKET.match(target.bucket):
        errors["bucket"] = (
            "Enter a bucket name of 3-63 lowercase letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit."
        )
    target.region = (target.region or "").strip()
    if target.region and not _S3_REGION.match(target.region):
        errors["region"] = "Enter a region such as eu-central-1 (letters, digits, -)."
    target.prefix = "/".join(p for p in (target.prefix or "").strip().split("/") if p)
    if any(p in (".", "..") for p in target.prefix.split("/")):
        errors["prefix"] = "The prefix cannot contain . or .. parts."
    if target.access_key_id and not target.secret_key:
        errors["secret_key"] = "Enter the secret access key for this access key id."
    for field in ("storage_class", "server_side_encryption"):
        value = getattr(target, field).strip()
        setattr(target, field, value)
        if value and not _S3_TOKEN.match(value):
            errors[field] = "Use the value as S3 spells it, e.g. STANDARD_IA, AES256."
    if errors:
        raise ValidationError(errors)


_S3_BUCKET = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_REGION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
_S3_TOKEN = re.compile(r"^[A-Za-z0-9_:.-]{1,40}$")


def _endpoint_url_error(url: str) -> str:
    """Why `url` is not a usable S3 endpoint URL, or "" (any S3-compatible host)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "Enter a URL such as https://s3.example.org:9000."
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "Enter an http:// or https:// URL such as https://s3.example.org:9000."
    if parts.username or parts.password:
        return (
            "Do not put credentials in the URL: use the access key id and secret "
            "fields."
        )
    if parts.query or parts.fragment:
        return "The endpoint URL cannot have a query or fragment."
    try:
        validate_host(parts.hostname)
    except ValidationError:
        return "The endpoint URL's host is not a valid host name or IP address."
    return ""
