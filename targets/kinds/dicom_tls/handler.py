"""DICOM+TLS targets: the DICOM handler over mutual TLS (TLS 1.2 at least).

Everything DICOM (contexts, statuses, resumes, parallel associations) is
`DicomHandler`'s; this module only supplies the SSL context through its hooks, puts
TLS failures in words (unknown CA, host name mismatch, expired certificate, client
certificate refused) and adds the handshake and the server certificate to the Test.
"""

from __future__ import annotations

import datetime
import ssl
from functools import cached_property

from targets.dicomnet.scu import LinkError, connect
from targets.kinds.base import CheckReport, TargetError
from targets.kinds.dicom.handler import DicomHandler, link_errors

from .context import TlsConfigError, build_ssl_context

# A server certificate expiring sooner than this gets a warning in the Test.
EXPIRY_WARNING_DAYS = 30
# How long the Test waits after the handshake for the server to refuse our client
# certificate (TLS 1.3 servers check it only after the client has finished).
CLIENT_CERT_GRACE_S = 0.5


def tls_error_words(exc: BaseException, host: str) -> str | None:
    """Put an SSL failure in words, or return None if `exc` is not one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, message = exc.verify_code, exc.verify_message or ""
        if code == 10 or "expired" in message:
            return "the server's certificate has expired"
        if code == 9:
            return "the server's certificate is not valid yet"
        if (
            code == 62
            or "Hostname mismatch" in message
            or "IP address mismatch" in message
        ):
            return (
                f"the server's certificate does not name {host} (host name mismatch) "
                "— fix the certificate or switch off 'verify server host name'"
            )
        if code in (2, 18, 19, 20, 21):
            return (
                "the server's certificate is not signed by the configured CA "
                "(unknown CA)"
            )
        return f"the server's certificate was not accepted ({message or code})"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
            return (
                "the server requires a client certificate and refused the connection "
                "(client certificate refused) — set the client certificate and key"
            )
        if (
            "UNKNOWN_CA" in reason
            or "BAD_CERTIFICATE" in reason
            or ("CERTIFICATE_UNKNOWN" in reason)
        ):
            return (
                "the server refused Courier's client certificate (client certificate "
                "refused: the server does not trust its CA)"
            )
        if "CERTIFICATE_EXPIRED" in reason:
            return "the server refused Courier's client certificate: it has expired"
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return "the server does not speak TLS on this port"
        if "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
            return "the server offers no TLS version of 1.2 or newer"
        return f"TLS failed ({exc.reason or exc})"
    return None


def _ssl_cause(exc: BaseException) -> BaseException | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        if isinstance(seen, ConnectionResetError | BrokenPipeError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class DicomTlsHandler(DicomHandler):
    # -- hooks of DicomHandler ---------------------------------------------------------
    @cached_property
    def _context(self) -> ssl.SSLContext:
        t = self.target
        try:
            return build_ssl_context(
                ca_cert=t.tls_ca_cert,
                client_cert=t.tls_client_cert,
                client_key=t.tls_client_key,
                passphrase=str(t.key_passphrase or ""),
                verify_hostname=t.tls_verify_hostname,
            )
        except TlsConfigError as exc:
            raise TargetError(f"TLS settings: {exc}", permanent=True) from None

    def ssl_context(self) -> ssl.SSLContext:
        return self._context

    def server_hostname(self) -> str | None:
        return self.target.host

    def open(self, contexts, calling, called):
        try:
            return super().open(contexts, calling, called)
        except LinkError as exc:
            cause = _ssl_cause(exc)
            words = self._refusal_words(cause) if cause is not None else None
            if words is None:
                raise
            where = f"{self.target.host}:{self.target.port}"
            # A refused certificate stays refused; a dropped connection may not.
            permanent = isinstance(cause, ssl.SSLError) and not isinstance(
                cause, ssl.SSLEOFError
            )
            raise LinkError(
                f"TLS with {where} failed: {words}", permanent=permanent
            ) from exc

    def _refusal_words(self, cause: BaseException) -> str | None:
        if isinstance(cause, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError):
            if not self.target.tls_client_cert:
                return (
                    "the server closed the connection after the handshake (client "
                    "certificate refused?) — it probably requires a client certificate"
                )
            return (
                "the server closed the connection after the handshake (client "
                "certificate refused?)"
            )
        return tls_error_words(cause, self.target.host)

    # -- test ----------------------------------------------------------------------------
    def test(self) -> CheckReport:
        result = CheckReport()
        with result.check("TLS settings") as c:
            self.ssl_context()
            c.message = self._settings_summary()
        if result.stopped:
            return result
        dicom = super().test()
        # The handshake and certificate checks go right after the TCP connection.
        at = next(
            (i + 1 for i, ch in enumerate(dicom.checks) if ch.name == "TCP connect"),
            None,
        )
        if at is None or not dicom.checks[at - 1].ok:
            result.checks.extend(dicom.checks)
            return result
        tls = CheckReport()
        self._test_handshake(tls)
        # After a failed handshake the association checks only repeat its error.
        later = [] if tls.stopped else dicom.checks[at:]
        result.checks.extend(dicom.checks[:at] + tls.checks + later)
        return result

    def _settings_summary(self) -> str:
        t = self.target
        who = (
            "with a client certificate"
            if t.tls_client_cert
            else "without a client certificate"
        )
        host = "verified" if t.tls_verify_hostname else "NOT verified"
        return f"TLS 1.2 or newer, {who}, server host name {host}"

    def _test_handshake(self, result: CheckReport) -> None:
        t = self.target
        cert = None
        with result.check("TLS handshake") as c, link_errors():
            sock = connect(t.host, int(t.port), t.connect_timeout)
            try:
                try:
                    tls = self.ssl_context().wrap_socket(sock, server_hostname=t.host)
                except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
                    raise TargetError(
                        "the server closed the connection during the TLS handshake "
                        "— does it speak TLS on this port?"
                    ) from None
                except ssl.SSLError as exc:
                    raise TargetError(
                        tls_error_words(exc, t.host) or str(exc), permanent=True
                    ) from None
                sock = tls
                c.message = f"{tls.version()} {tls.cipher()[0]}"
                cert = tls.getpeercert()
                self._await_refusal(tls)
                c.message += (
                    ", client certificate accepted" if t.tls_client_cert else ""
                )
            finally:
                sock.close()
        if cert is None:
            return
        with result.check("Server certificate", informational=True) as c:
            subject = ", ".join(
                f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn
            )
            expires = datetime.datetime.fromtimestamp(
                ssl.cert_time_to_seconds(cert["notAfter"]), datetime.UTC
            )
            days = (expires - datetime.datetime.now(datetime.UTC)).days
            c.details = {"subject": subject, "expires": expires.isoformat()}
            c.message = f"{subject}; expires {expires:%Y-%m-%d} (in {days} days)"
            if days < EXPIRY_WARNING_DAYS:
                c.ok = False
                c.message = (
                    f"warning: the server's certificate expires in {days} days "
                    f"({expires:%Y-%m-%d}); {subject}"
                )

    def _await_refusal(self, tls: ssl.SSLSocket) -> None:
        """With TLS 1.3 a server refuses a client certificate after the handshake:
        wait briefly for that alert. A DICOM server says nothing until we send."""
        tls.settimeout(CLIENT_CERT_GRACE_S)
        try:
            data = tls.recv(1)
        except TimeoutError:
            return
        except ssl.SSLError as exc:
            raise TargetError(
                self._refusal_words(exc) or str(exc), permanent=True
            ) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise TargetError(self._refusal_words(exc) or str(exc)) from None
        if not data:
            raise TargetError(
                self._refusal_words(ConnectionResetError()) or "connection closed"
            )
