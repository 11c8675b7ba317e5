"""XNAT settings: an http(s) URL, the password for the user, a project ID, label
templates of DICOM keywords, a readable CA bundle."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from pydicom.datadict import tag_for_keyword

from targets.http import ca_bundle_error, http_url_error

if TYPE_CHECKING:
    from targets.models import Target


def clean(target: Target) -> None:
    errors: dict[str, list[str]] = {}
    url_error = _url_error(target.url)
    if url_error:
        errors.setdefault("url", []).append(url_error)
    ca_error = ca_bundle_error(target.ca_bundle)
    if ca_error:
        errors.setdefault("ca_bundle", []).append(ca_error)
    if target.username and not target.password:
        errors.setdefault("password", []).append("XNAT needs the user's password.")
    target.project = (target.project or "").strip()
    if target.project and not re.fullmatch(r"[A-Za-z0-9_-]+", target.project):
        errors.setdefault("project", []).append(
            "Enter the project ID (letters, digits, _ and -), not its title."
        )
    for field in ("subject_template", "session_template"):
        template = (getattr(target, field) or "").strip()
        setattr(target, field, template)
        if not template:
            continue
        keys = re.findall(r"\{(\w*)\}", template)
        if not keys:
            errors.setdefault(field, []).append(
                "Use at least one DICOM keyword in braces, e.g. {PatientID}."
            )
        unknown = [
            k
            for k in keys
            if k not in ("StudyUIDHash", "SeriesUIDHash") and tag_for_keyword(k) is None
        ]
        if unknown:
            errors.setdefault(field, []).append(
                "Not DICOM keywords: " + ", ".join(f"{{{k}}}" for k in unknown) + "."
            )
        if template.count("{") != template.count("}"):
            errors.setdefault(field, []).append("Unbalanced braces.")
    if errors:
        raise ValidationError(errors)


def _url_error(url: str) -> str | None:
    if not url:
        return None
    if urlsplit(url.strip()).scheme.lower() not in ("http", "https"):
        return "Enter a URL starting with http:// or https://."
    return http_url_error(url)
