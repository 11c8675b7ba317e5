"""XNAT subject and session labels, filled from a series' tags by templates.

The default session label includes a short hash of the StudyInstanceUID, so two
studies of one patient on one day never land in the same session. Light on purpose:
the model's field defaults and the form's validation use it.
"""

from __future__ import annotations

import hashlib
import re

# StudyUIDHash (8 hex digits of the StudyInstanceUID's SHA-1) keeps two studies of
# one patient on one day apart, even without an AccessionNumber.
DEFAULT_SUBJECT_TEMPLATE = "{PatientID}"
DEFAULT_SESSION_TEMPLATE = "{PatientID}_{StudyDate}_{StudyUIDHash}"

# Values computed from the tags rather than read from them.
COMPUTED_KEYS = {
    "StudyUIDHash": "StudyInstanceUID",
    "SeriesUIDHash": "SeriesInstanceUID",
}
TEMPLATE_KEY = re.compile(r"\{(\w+)\}")
# XNAT labels allow letters, digits, underscore and hyphen only.
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class TemplateError(ValueError):
    pass


def template_keys(template: str) -> list[str]:
    return TEMPLATE_KEY.findall(template or "")


def uid_hash(uid: str) -> str:
    """Eight hex digits of the UID's SHA-1: short, stable, practically unique."""
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


def render_label(template: str, tags: dict[str, str], what: str) -> str:
    """Fill an XNAT label template from tags; a missing tag is an error naming it."""

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key in COMPUTED_KEYS:
            source = tags.get(COMPUTED_KEYS[key], "")
            if not source:
                raise TemplateError(
                    f"the series has no {COMPUTED_KEYS[key]} for {{{key}}} in the "
                    f"{what} template {template!r}"
                )
            return uid_hash(source)
        value = str(tags.get(key, "") or "").strip()
        if not value:
            raise TemplateError(
                f"the series has no {key} for the {what} template {template!r}"
            )
        return _LABEL_UNSAFE.sub("_", value).strip("_") or "_"

    label = TEMPLATE_KEY.sub(fill, template)
    label = _LABEL_UNSAFE.sub("_", label).strip("_")
    if not label:
        raise TemplateError(f"the {what} template {template!r} gives an empty label")
    return label[:64]
