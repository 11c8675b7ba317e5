"""The one HTTP seam: DICOMweb (STOW-RS, QIDO-RS, WADO-RS) and XNAT go through it.

A session here verifies TLS as its target says, on every request: `requests` lets
the environment (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) override a session's `verify`,
even `verify=False`, unless it is passed with each request. The target's settings
mean: verification off, or on against its CA bundle, or on against the system's
CAs. A request that gets no HTTP answer raises `NoAnswer`, whose `words` say why
(TLS, a timeout, a refused or unresolvable host), for each caller to put in its own
error. This module imports no model: it reads a target's attributes only.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

import requests

USER_AGENT = "Courier"

# What `NoAnswer.cause` can be.
TLS, TIMEOUT, CONNECT, OTHER = "tls", "timeout", "connect", "other"


def tls_verify(verify_tls: bool, ca_bundle: str) -> bool | str:
    """`requests`' `verify` for a target: off, its CA bundle, or the system's CAs."""
    if not verify_tls:
        return False
    return ca_bundle or True


class HttpSession(requests.Session):
    """A session whose requests time out and verify TLS as configured, unless the
    caller says otherwise for one request."""

    def __init__(self, *, timeout: float, verify: bool | str):
        super().__init__()
        self.default_timeout = timeout
        self.verify = verify
        self.headers["User-Agent"] = USER_AGENT

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.default_timeout)
        # Per request, so the target's setting wins over the environment's.
        kwargs.setdefault("verify", self.verify)
        return super().request(method, url, **kwargs)


def session_for(target: Any, *, credentials: bool = False) -> HttpSession:
    """A session with the target's timeout and TLS verification; with
    `credentials`, its Basic login or bearer token as its `auth` setting says."""
    session = HttpSession(
        timeout=target.request_timeout,
        verify=tls_verify(target.verify_tls, target.ca_bundle),
    )
    if credentials and target.auth == "basic":
        session.auth = (target.username, str(target.password or ""))
    elif credentials and target.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {target.token}"
    return session


class NoAnswer(Exception):
    """A request got no HTTP answer. `cause` is TLS, TIMEOUT, CONNECT or OTHER;
    `words` say why, for a message (never with a secret: no URL query, no header)."""

    def __init__(self, cause: str, words: str):
        super().__init__(words)
        self.cause = cause
        self.words = words


def send(
    session: requests.Session, method: str, url: str, **kwargs
) -> requests.Response:
    """`session.request(...)`; a request that gets no answer raises `NoAnswer`."""
    try:
        return session.request(method, url, **kwargs)
    except requests.exceptions.RequestException as exc:
        raise no_answer(exc) from exc


def send_prepared(
    session: HttpSession, prepared: requests.PreparedRequest, *, stream: bool = False
) -> requests.Response:
    """Send a request prepared by hand (its URL as the caller built it) with the
    settings `session.request()` would use; no answer raises `NoAnswer`."""
    settings = session.merge_environment_settings(
        prepared.url, {}, stream, session.verify, None
    )
    try:
        return session.send(prepared, timeout=session.default_timeout, **settings)
    except requests.exceptions.RequestException as exc:
        raise no_answer(exc) from exc


def no_answer(exc: requests.exceptions.RequestException) -> NoAnswer:
    """Classify a `requests` failure (SSLError and ConnectTimeout are also
    ConnectionErrors, so the order matters)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return NoAnswer(TLS, ssl_words(exc))
    if isinstance(exc, requests.exceptions.Timeout):
        return NoAnswer(TIMEOUT, "the request timed out")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return NoAnswer(CONNECT, connection_words(exc))
    return NoAnswer(OTHER, type(exc).__name__)


def ssl_words(exc: Exception) -> str:
    text = str(exc)
    if "certificate has expired" in text:
        return "the server's certificate has expired"
    if "mismatch" in text:
        return "the server's certificate does not name this host (host name mismatch)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "the server's certificate is not trusted (unknown CA)"
    if "WRONG_VERSION_NUMBER" in text:
        return "the server does not speak TLS on this port"
    return "TLS handshake failed"


def connection_words(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused (nothing listens on that port)"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "the host name does not resolve"
    if "timed out" in text.lower():
        return "the connection timed out"
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the server closed the connection"
    return "connection failed"


def netloc(url: str) -> str:
    """The host (and port) of a URL, for messages."""
    return urlsplit(url).netloc or url


# -- settings validation (DICOMweb, XNAT) ----------------------------------------------


def http_url_error(url: str) -> str | None:
    """Why `url` is not a usable http(s) URL for a target, or None."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https"):
        return None  # the caller names the schemes it takes
    if not parts.hostname:
        return "The URL has no host name."
    if parts.username or parts.password:
        return "Put the username and password in their own fields, not in the URL."
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "The URL's port is not a number between 1 and 65535."
    return None


def ca_bundle_error(path: str) -> str | None:
    """Why `path` is not a readable PEM CA bundle, or None."""
    if not path:
        return None
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        return f"{path} does not exist on this server."
    except PermissionError:
        return f"{path} is not readable by Courier."
    except (ssl.SSLError, OSError, ValueError):
        return f"{path} holds no PEM certificate."
    return None
