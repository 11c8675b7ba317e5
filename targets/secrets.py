"""Secrets at rest: target passwords, tokens, keys are stored encrypted.

The key comes from `settings.COURIER_ENCRYPTION_KEY`. Values are Fernet tokens in the
database; in Python they are `Secret` strings whose `repr` never shows the value, so a
secret in a traceback's locals or a debug log stays hidden.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import models

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

PREFIX = "fernet:"


class Secret(str):
    """A string that keeps its value out of `repr` (logs, tracebacks, shells)."""

    def __repr__(self) -> str:
        return "Secret('********')" if self else "Secret('')"


class SecretKeyMismatch(ImproperlyConfigured):
    pass


def _fernet() -> Fernet:
    # Imported on first use: a command whose targets hold no secret (a DICOM send)
    # does not load cryptography's bindings at start-up.
    from cryptography.fernet import Fernet

    key = settings.COURIER_ENCRYPTION_KEY
    if not key:
        raise ImproperlyConfigured(
            "COURIER_ENCRYPTION_KEY is not set: target secrets cannot be stored."
        )
    digest = hashlib.sha256(key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt(value: str) -> str:
    return PREFIX + _fernet().encrypt(value.encode()).decode()


def decrypt(token: str) -> Secret:
    if not token:
        return Secret("")
    if not token.startswith(PREFIX):
        raise SecretKeyMismatch("A stored secret is not in Courier's encrypted format.")
    from cryptography.fernet import InvalidToken

    try:
        return Secret(_fernet().decrypt(token[len(PREFIX) :].encode()).decode())
    except InvalidToken:
        raise SecretKeyMismatch(
            "Stored target secrets cannot be decrypted: COURIER_ENCRYPTION_KEY is not "
            "the key they were stored with."
        ) from None


class EncryptedTextField(models.TextField):
    """A text column holding an encrypted secret; blank means "not set"."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("blank", True)
        kwargs.setdefault("default", "")
        super().__init__(*args, **kwargs)

    def from_db_value(self, value, expression, connection):
        return decrypt(value) if value else Secret("")

    def to_python(self, value):
        if isinstance(value, Secret) or value is None:
            return value
        if isinstance(value, str) and value.startswith(PREFIX):
            # The serialised (dumpdata) form: `loaddata` must store the secret,
            # not an encryption of its token.
            try:
                return decrypt(value)
            except SecretKeyMismatch as exc:
                raise ValidationError(str(exc), code="secret_key_mismatch") from None
        return Secret(value)

    def get_prep_value(self, value):
        if not value:
            return ""
        return encrypt(str(value))

    def value_to_string(self, obj) -> str:
        """Serialise the encrypted form only: `dumpdata` never prints a secret."""
        return self.get_prep_value(self.value_from_object(obj))
