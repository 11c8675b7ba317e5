"""Keeping a target's secrets out of what Courier shows and logs.

Shared by every app that reports on a target (its Test, dispatch jobs, the query
tool): `scrub` blanks a target's secrets out of a message, `crash_site` says where an
exception was raised without its text (which may hold a URL with a password). The
key=value log line itself is `config.safetext.log_fields`. Imports no model, so any
module may use it.
"""

from __future__ import annotations

import traceback
from urllib.parse import quote

from django.db.models import Model

from .secrets import EncryptedTextField


def secret_values(target: Model) -> list[str]:
    """The target's secrets that are set (to keep them out of anything shown)."""
    values = []
    for field in target._meta.get_fields():
        if isinstance(field, EncryptedTextField):
            value = getattr(target, field.attname, "")
            if value:
                values.append(str(value))
    return values


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "********")
    return text


def scrub(message: str, *targets: Model | None) -> str:
    """Blank out the targets' secrets should a message ever carry one.

    Also their URL-quoted form: a library error may quote the URL it was given.
    `None` stands for a target that is gone (a deleted destination).
    """
    secrets = [s for t in targets if t is not None for s in secret_values(t)]
    quoted = [quote(s, safe="") for s in secrets]
    return redact(message, secrets + [q for q in quoted if q not in secrets])


def crash_site(exc: BaseException) -> str:
    """Where an exception was raised (innermost frames first), for the log.

    Logged instead of the traceback, whose text (an argument, a URL) could hold a
    secret.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    return " < ".join(f"{f.filename}:{f.lineno}" for f in reversed(frames[-5:]))
