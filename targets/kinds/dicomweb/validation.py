"""DICOMweb settings: an http(s) URL (or file:// for a local folder), prefixes that
are paths, credentials that match the authentication chosen, a readable CA bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ValidationError

from targets.http import ca_bundle_error, http_url_error

if TYPE_CHECKING:
    from targets.models import Target


def clean(target: Target) -> None:
    errors: dict[str, list[str]] = {}
    url_error = _url_error(target.url)
    if url_error:
        errors.setdefault("url", []).append(url_error)
    for field in ("qido_prefix", "wado_prefix", "stow_prefix"):
        value = (getattr(target, field) or "").strip().strip("/")
        if any(c in value for c in "?#") or " " in value:
            errors.setdefault(field, []).append(
                "A prefix is a path such as dicom-web or rs (no spaces, ? or #)."
            )
        setattr(target, field, value)
    local = (target.url or "").lower().startswith("file://")
    if not local and target.auth in ("", "none"):
        # Credentials with authentication left at None would silently not be
        # sent: pick the method they mean, or say (at the authentication
        # choice, which is always shown) why not.
        login = bool(target.username or target.password)
        if login and target.token:
            errors.setdefault("auth", []).append(
                "Both a login and a bearer token are set: choose Basic or "
                "Bearer token (and clear the other)."
            )
        elif target.username and target.password:
            target.auth = "basic"
        elif target.username:
            errors.setdefault("auth", []).append(
                f"The username {target.username!r} has no password, so no "
                "credentials would be sent: choose Basic and enter the password, "
                "or clear the username."
            )
        elif target.password:
            errors.setdefault("auth", []).append(
                "A password is set without a username, so no credentials would "
                "be sent: choose Basic and enter the username, or clear the "
                "password."
            )
        elif target.token:
            target.auth = "bearer"
    if not local:
        if target.auth == "basic":
            if not target.username:
                errors.setdefault("username", []).append(
                    "Basic authentication needs a username."
                )
            if not target.password:
                errors.setdefault("password", []).append(
                    "Basic authentication needs a password."
                )
        elif target.auth == "bearer" and not target.token:
            errors.setdefault("token", []).append(
                "Bearer authentication needs a token."
            )
        ca_error = ca_bundle_error(target.ca_bundle)
        if ca_error:
            errors.setdefault("ca_bundle", []).append(ca_error)
    if errors:
        raise ValidationError(errors)


def _url_error(url: str) -> str | None:
    """Why `url` is not a usable http(s) or file:// URL, or None."""
    if not url:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            return "A file:// URL names a local folder: file:///path/to/folder."
        folder = Path(unquote(parts.path))
        if not folder.is_absolute() or not folder.is_dir():
            return f"The folder {folder} does not exist on this server."
        return None
    if parts.scheme.lower() not in ("http", "https"):
        return "Enter a URL starting with http://, https:// or file://."
    return http_url_error(url)
