"""DICOM+TLS settings: the CA certificate, client certificate, key and passphrase
must make an SSL context (the form names the file that does not)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ValidationError

from .context import TlsConfigError, build_ssl_context

if TYPE_CHECKING:
    from targets.models import Target


def clean(target: Target) -> None:
    from targets.kinds.dicom.validation import clean as clean_dicom

    clean_dicom(target)
    if not target.tls_ca_cert:
        return
    for field in ("tls_ca_cert", "tls_client_cert", "tls_client_key"):
        setattr(target, field, (getattr(target, field) or "").strip())
    try:
        build_ssl_context(
            ca_cert=target.tls_ca_cert,
            client_cert=target.tls_client_cert,
            client_key=target.tls_client_key,
            passphrase=str(target.key_passphrase or ""),
            verify_hostname=target.tls_verify_hostname,
        )
    except TlsConfigError as exc:
        text = str(exc)
        field = (
            "tls_ca_cert"
            if "CA certificate" in text
            else "key_passphrase"
            if "passphrase" in text
            else "tls_client_key"
            if "client key" in text
            else "tls_client_cert"
        )
        raise ValidationError({field: text[0].upper() + text[1:] + "."}) from None
