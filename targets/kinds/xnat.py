"""XNAT targets: a series zipped from disk and imported in one request.

The login, heartbeat and logout go through the `xnat` package (with
`no_parse_model=True`: the data model download needs the server's XSDs and nothing
here uses it). The import itself is one `POST /data/services/import` with the zip
streamed from a temporary file, so neither the series nor the zip is held in memory.
Subject and session labels come from templates filled with the series' tags; the
default session label includes a short hash of the StudyInstanceUID, so two studies
of one patient on one day never land in the same session.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pydicom
import requests
from django.conf import settings

from targets.models import DEFAULT_SESSION_TEMPLATE, DEFAULT_SUBJECT_TEMPLATE
from targets.paths import plain_name, uid_part
from targets.series import Series

from .base import (
    FAILED,
    SENT,
    Handler,
    Outcome,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    TestResult,
    instance_outcome,
)

if TYPE_CHECKING:
    from xnat.session import XNATSession

log = logging.getLogger(__name__)

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


class XnatHandler(Handler):
    @property
    def base_url(self) -> str:
        return (self.target.url or "").rstrip("/")

    # -- session --------------------------------------------------------------------
    def connect(self) -> XNATSession:
        """Log in with the `xnat` package; errors become TargetErrors in words."""
        import xnat
        from xnat.exceptions import XNATError, XNATLoginFailedError

        t = self.target
        try:
            return xnat.connect(
                self.base_url,
                user=t.username,
                password=str(t.password),
                verify=t.verify_tls,
                no_parse_model=True,
                default_timeout=t.request_timeout,
                loglevel="ERROR",
            )
        except XNATLoginFailedError as exc:
            if "unknown error" in str(exc):
                # xnatpy's words when the login request got no XNAT answer at all
                # (a 404 or 405 from a server that has no /data/services/auth).
                raise TargetError(
                    f"not an XNAT server: {self._netloc} did not answer XNAT's login "
                    "request (/data/services/auth); check that the URL is the XNAT's "
                    "address",
                    permanent=True,
                ) from None
            raise TargetError(
                f"login failed: XNAT refused user {t.username} — check the username "
                "and password",
                permanent=True,
            ) from None
        except requests.exceptions.SSLError:
            raise TargetError(
                f"TLS failed with {self._netloc}: the server's certificate is not "
                "trusted",
                permanent=True,
            ) from None
        except requests.exceptions.Timeout:
            raise TargetError(
                f"no answer from {self._netloc} within {t.request_timeout:g} s"
            ) from None
        except requests.exceptions.ConnectionError as exc:
            raise TargetError(
                f"cannot connect to {self._netloc}: {_connection_words(exc)}"
            ) from None
        except XNATError as exc:
            raise TargetError(f"XNAT login did not work: {_first_line(exc)}") from None

    @property
    def _netloc(self) -> str:
        return urlsplit(self.base_url).netloc or self.base_url

    def _get(self, session: XNATSession, path: str, **params) -> requests.Response:
        try:
            # verify per request: REQUESTS_CA_BUNDLE would override the session's.
            return session.interface.get(
                self.base_url + path,
                params=params,
                timeout=self.target.request_timeout,
                verify=self.target.verify_tls,
            )
        except requests.exceptions.RequestException as exc:
            raise TargetError(
                f"XNAT did not answer {path}: {_connection_words(exc)}"
            ) from None

    def _check_project(self, session: XNATSession) -> None:
        t = self.target
        resp = self._get(session, f"/data/projects/{t.project}", format="json")
        if resp.status_code == 404:
            raise TargetError(
                f"project {t.project} does not exist on XNAT (use the project ID, "
                "not its name)",
                permanent=True,
            )
        if resp.status_code == 403:
            raise TargetError(
                f"user {t.username} has no access to project {t.project}",
                permanent=True,
            )
        if resp.status_code == 401:
            raise TargetError("XNAT dropped the login session", permanent=False)
        if resp.status_code != 200:
            raise TargetError(
                f"XNAT answered HTTP {resp.status_code} for project {t.project}"
            )

    def _check_write(self, session: XNATSession) -> None:
        # The projects the user may create subjects in: what XNAT's own upload
        # assistant asks before an upload.
        t = self.target
        resp = self._get(
            session,
            "/data/projects",
            permissions="edit",
            dataType="xnat:subjectData",
            format="json",
        )
        if resp.status_code != 200:
            raise TargetError(
                f"XNAT answered HTTP {resp.status_code} when asked for writable projects"
            )
        try:
            rows = resp.json()["ResultSet"]["Result"]
        except (ValueError, KeyError, TypeError):
            raise TargetError(
                "XNAT's list of writable projects is not readable"
            ) from None
        ids = {str(r.get("ID") or r.get("id") or "") for r in rows}
        if t.project not in ids:
            raise TargetError(
                f"user {t.username} may read project {t.project} but not upload to "
                "it — XNAT needs the member or owner role",
                permanent=True,
            )

    # -- labels -----------------------------------------------------------------------
    def labels(self, series: Series) -> tuple[str, str]:
        """The (subject, session) labels for a series, from the templates."""
        t = self.target
        subject_template = t.subject_template or DEFAULT_SUBJECT_TEMPLATE
        session_template = t.session_template or DEFAULT_SESSION_TEMPLATE
        if not series.instances:
            raise TargetError("the series has no DICOM instances", permanent=True)
        first = series.instances[0]
        tags = dict(first.tags)
        wanted = {
            COMPUTED_KEYS.get(k, k)
            for k in template_keys(subject_template) + template_keys(session_template)
        }
        missing = [k for k in wanted if k not in tags]
        if missing:
            # Keywords beyond the routing tags: read them from the first file.
            try:
                ds = pydicom.dcmread(
                    first.path, stop_before_pixels=True, specific_tags=missing
                )
            except (OSError, ValueError) as exc:
                raise TargetError(f"cannot read {first.path.name}: {exc}") from None
            for key in missing:
                value = ds.get(key)
                if value not in (None, ""):
                    tags[key] = str(value)
        try:
            return (
                render_label(subject_template, tags, "subject"),
                render_label(session_template, tags, "session"),
            )
        except TemplateError as exc:
            raise TargetError(str(exc), permanent=True) from None

    # -- send -------------------------------------------------------------------------
    def send(
        self,
        series: Series,
        *,
        progress: ProgressCallback | None = None,
        context: SendContext | None = None,
    ) -> SendResult:
        t = self.target
        result = SendResult()
        if not series.instances:
            return result
        subject, session_label = self.labels(series)

        def report(outcome: Outcome) -> None:
            result.outcomes.append(outcome)
            if progress:
                progress(outcome)

        if t.import_handler == "gradual-DICOM":
            uri = self._send_gradual(series, subject, session_label, report)
        else:
            uri = self._send_zip(series, subject, session_label)
            for inst in series.instances:
                report(instance_outcome(inst, SENT))
        result.notes.append(
            f"imported into {t.project} / {subject} / {session_label} ({uri})"
        )
        return result

    def _send_zip(self, series: Series, subject: str, label: str) -> str:
        """Zip the series to a temporary file and import it in one request."""
        # In the data directory, not /tmp: a large series' zip may not fit a tmpfs.
        scratch = Path(settings.DATA_DIR) / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="xnat-", dir=scratch) as tmp:
            archive = Path(tmp) / f"{label}.zip"
            self._zip(series, archive)
            query = self._query(subject, label)
            with self._session() as session:
                resp = self._post(session, query, archive, "application/zip")
                if not _is_session_uri(resp):
                    raise self._import_error(resp, label)
                uri = resp.text.strip()
                self._check_session(session, uri, subject, label)
        return uri

    def _send_gradual(self, series: Series, subject: str, label: str, report) -> str:
        """gradual-DICOM: one request per file, each file's fate reported."""
        query = self._query(subject, label)
        uri = ""
        with self._session() as session:
            for inst in series.instances:
                resp = self._post(session, query, inst.path, "application/dicom")
                if _is_session_uri(resp):
                    uri = resp.text.strip()
                    report(instance_outcome(inst, SENT))
                elif resp.status_code == 400:
                    # XNAT could not use this one file; the others may still go.
                    report(
                        instance_outcome(
                            inst,
                            FAILED,
                            f"XNAT refused the file: {_first_line(resp.text)}",
                        )
                    )
                else:
                    raise self._import_error(resp, label)
            if not uri:
                raise TargetError(
                    "XNAT refused every file of the series", permanent=True
                )
            self._check_session(session, uri, subject, label)
        return uri

    @contextmanager
    def _session(self) -> Iterator[XNATSession]:
        session = self.connect()
        try:
            yield session
        finally:
            try:
                session.disconnect()
            except Exception:  # noqa: BLE001 - logout is best effort
                log.debug("XNAT logout failed", exc_info=True)

    def _zip(self, series: Series, archive: Path) -> None:
        """Zip the series file by file (zipfile streams each member from disk)."""
        try:
            with zipfile.ZipFile(
                archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1
            ) as zf:
                for index, inst in enumerate(series.instances):
                    # The UID is data: a member named "../x" would be written
                    # wherever the server's unzip puts it.
                    name = f"{index + 1:05d}_{uid_part(inst.sop_instance_uid)}.dcm"
                    zf.write(inst.path, plain_name(name))
        except OSError as exc:
            raise TargetError(f"cannot zip the series: {exc}") from None

    def _query(self, subject: str, label: str) -> dict[str, str]:
        t = self.target
        dest = t.destination or "prearchive"
        if t.import_handler == "gradual-DICOM":
            # The per-file handler's own key convention (as XNAT's uploaders use).
            return {
                "import-handler": "gradual-DICOM",
                "PROJECT_ID": t.project,
                "SUBJECT_ID": subject,
                "EXPT_LABEL": label,
                "inbody": "true",
                "overwrite": t.overwrite or "none",
                "dest": f"/{dest}/projects/{t.project}",
            }
        return {
            "overwrite": t.overwrite or "none",
            "dest": f"/{dest}",
            "project": t.project,
            "subject": subject,
            "session": label,
            "import-handler": t.import_handler or "DICOM-zip",
        }

    def _post(
        self, session: XNATSession, query: dict, path: Path, content_type: str
    ) -> requests.Response:
        """POST one file to the import service, streamed from disk."""
        t = self.target
        try:
            with open(path, "rb") as fh:
                return session.interface.post(
                    self.base_url + "/data/services/import",
                    params=query,
                    data=fh,
                    headers={"Content-Type": content_type},
                    timeout=t.request_timeout,
                    verify=t.verify_tls,
                )
        except requests.exceptions.Timeout:
            raise TargetError(
                f"XNAT did not answer the import within {t.request_timeout:g} s — "
                "XNAT unpacks the upload before answering; raise the request timeout "
                "for large series"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise TargetError(
                f"the upload to {self._netloc} broke off: {_connection_words(exc)}"
            ) from None
        except OSError as exc:
            raise TargetError(f"cannot read {path.name}: {exc}") from None

    def _import_error(self, resp: requests.Response, label: str) -> TargetError:
        t = self.target
        text = _first_line(resp.text)
        status = resp.status_code
        if status == 401:
            return TargetError(
                "XNAT refused the login session for the import", permanent=True
            )
        if status == 403:
            return TargetError(
                f"user {t.username} may not upload to project {t.project} ({text})",
                permanent=True,
            )
        if status == 404:
            return TargetError(
                f"project {t.project} does not exist on XNAT ({text})", permanent=True
            )
        if status == 409:
            return TargetError(
                f"session {label} already exists in {t.project} and the overwrite "
                f"policy is {t.overwrite or 'none'} ({text})",
                permanent=True,
            )
        if 400 <= status < 500:
            return TargetError(
                f"XNAT refused the import: HTTP {status} {text}", permanent=True
            )
        if status >= 500:
            return TargetError(f"XNAT failed the import: HTTP {status} {text}")
        return TargetError(
            f"XNAT answered the import with HTTP {status} but no session URI"
        )

    def _check_session(
        self, session: XNATSession, uri: str, subject: str, label: str
    ) -> None:
        t = self.target
        if uri.startswith("/data/prearchive/"):
            resp = self._get(
                session, f"/data/prearchive/projects/{t.project}", format="json"
            )
            found = False
            if resp.status_code == 200:
                try:
                    rows = resp.json()["ResultSet"]["Result"]
                except (ValueError, KeyError, TypeError):
                    rows = []
                wanted = uri[len("/data") :]
                found = any(
                    r.get("url") == wanted or r.get("name") == label for r in rows
                )
        else:
            resp = self._get(
                session,
                f"/data/projects/{t.project}/subjects/{subject}/experiments/{label}",
                format="json",
            )
            found = resp.status_code == 200
        if not found:
            raise TargetError(
                f"XNAT accepted the import but session {label} is not there afterwards "
                f"({uri})"
            )

    # -- test --------------------------------------------------------------------------
    def _probe_xnat(self) -> str:
        """Ask `/data/version` (before logging in) whether the URL is an XNAT."""
        t = self.target
        try:
            resp = requests.get(
                self.base_url + "/data/version",
                timeout=t.request_timeout,
                verify=t.verify_tls,
                allow_redirects=False,
            )
        except requests.exceptions.RequestException as exc:
            raise TargetError(
                f"cannot ask {self._netloc} for its XNAT version: "
                f"{_connection_words(exc)}"
            ) from None
        seen = _looks_like_xnat(resp)
        if seen is None:
            answer = _first_line(resp.text)[:80] if resp.status_code == 200 else ""
            raise TargetError(
                f"not an XNAT server: {self._netloc} has no XNAT API (/data/version "
                f"answered HTTP {resp.status_code}{': ' + answer if answer else ''}); "
                "check that the URL is the XNAT's address, e.g. "
                "https://xnat.example.org or https://host/xnat",
                permanent=True,
            )
        return seen

    def test(self) -> TestResult:
        result = TestResult()
        t = self.target
        with result.check("Reachable") as c:
            try:
                resp = requests.get(
                    self.base_url + "/",
                    timeout=t.request_timeout,
                    verify=t.verify_tls,
                    allow_redirects=True,
                )
            except requests.exceptions.SSLError:
                raise TargetError(
                    f"TLS failed with {self._netloc}: the certificate is not trusted"
                ) from None
            except requests.exceptions.RequestException as exc:
                raise TargetError(
                    f"cannot connect to {self._netloc}: {_connection_words(exc)}"
                ) from None
            c.message = f"{self._netloc} answered HTTP {resp.status_code}"
        if result.stopped:
            return result
        with result.check("XNAT server") as c:
            c.message = self._probe_xnat()
        if result.stopped:
            return result
        session = None
        with result.check("Login") as c:
            session = self.connect()
            c.message = f"logged in as {t.username}"
        if session is None or result.stopped:
            return result
        try:
            with result.check("Project") as c:
                self._check_project(session)
                c.message = f"project {t.project} exists and {t.username} can see it"
            if not result.stopped:
                with result.check("Upload permission") as c:
                    self._check_write(session)
                    c.message = f"{t.username} may upload to {t.project}"
        finally:
            try:
                session.disconnect()
            except Exception:  # noqa: BLE001 - logout is best effort
                log.debug("XNAT logout failed", exc_info=True)
        return result


def _looks_like_xnat(resp: requests.Response) -> str | None:
    """What `GET /data/version` says about the server: a description if it is XNAT
    (or an API that asks for a login, as XNAT's does), else None."""
    if resp.status_code in (401, 403):
        return "asks for a login, as XNAT does"
    if resp.is_redirect and "login" in resp.headers.get("Location", "").lower():
        return "sends to its login page, as XNAT does"
    text = resp.text.strip() if resp.status_code == 200 else ""
    if text and len(text) < 100 and "<" not in text:
        return f"XNAT {_first_line(text)}"
    if "xnat" in text.lower():
        return "an XNAT page answered"
    return None


def _is_session_uri(resp: requests.Response) -> bool:
    return resp.status_code == 200 and resp.text.strip().startswith("/data/")


def _first_line(value) -> str:
    text = re.sub(r"<[^>]+>", " ", str(value))
    text = " ".join(text.split())
    return text[:200]


def _connection_words(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused (nothing listens on that port)"
    if "Name or service not known" in text:
        return "the host name does not resolve"
    if "timed out" in text.lower():
        return "the connection timed out"
    if "Connection aborted" in text or "RemoteDisconnected" in text:
        return "the server closed the connection"
    return "connection failed"
