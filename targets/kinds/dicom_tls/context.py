"""The client SSL context of a DICOM+TLS target, from its files (light: the form's
validation builds one too)."""

from __future__ import annotations

import ssl


class TlsConfigError(ValueError):
    """A certificate, key or CA file cannot be used (a form error when saving)."""


def build_ssl_context(
    *,
    ca_cert: str,
    client_cert: str = "",
    client_key: str = "",
    passphrase: str = "",
    verify_hostname: bool = True,
) -> ssl.SSLContext:
    """Return a client SSL context, or raise `TlsConfigError` saying which file is bad."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = verify_hostname
    try:
        ctx.load_verify_locations(cafile=ca_cert)
    except FileNotFoundError:
        raise TlsConfigError(f"the CA certificate {ca_cert} does not exist") from None
    except PermissionError:
        raise TlsConfigError(f"the CA certificate {ca_cert} is not readable") from None
    except (ssl.SSLError, OSError, ValueError):
        raise TlsConfigError(
            f"the CA certificate {ca_cert} holds no PEM certificate"
        ) from None
    if client_cert or client_key:
        if not (client_cert and client_key):
            raise TlsConfigError("give both the client certificate and its key")
        for what, path in (
            ("client certificate", client_cert),
            ("client key", client_key),
        ):
            try:
                with open(path, "rb"):
                    pass
            except FileNotFoundError:
                raise TlsConfigError(f"the {what} {path} does not exist") from None
            except OSError:
                raise TlsConfigError(f"the {what} {path} is not readable") from None
        try:
            # Always a callable: with None, OpenSSL would prompt on the terminal.
            ctx.load_cert_chain(
                client_cert, client_key, password=lambda: (passphrase or "").encode()
            )
        except (ssl.SSLError, ValueError, OSError) as exc:
            reason = str(getattr(exc, "reason", "") or exc).upper()
            if _is_encrypted_key(client_key):
                if not passphrase:
                    raise TlsConfigError(
                        "the client key is encrypted: enter its passphrase"
                    ) from None
                raise TlsConfigError(
                    "the client key cannot be decrypted with this passphrase"
                ) from None
            if "KEY_VALUES_MISMATCH" in reason:
                raise TlsConfigError(
                    "the client key does not belong to the client certificate"
                ) from None
            raise TlsConfigError(
                "the client certificate or key is not PEM "
                f"({getattr(exc, 'reason', None) or 'unreadable'})"
            ) from None
    return ctx


def _is_encrypted_key(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return b"ENCRYPTED" in head
