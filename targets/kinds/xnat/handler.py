"""XNAT targets: a series zipped from disk and imported in one request.

Every request goes through the HTTP seam (`targets.http`), so the target's TLS
verification and CA bundle hold for all of them. The login is XNAT's own REST one,
as its clients (xnatpy, the upload assistant) do it: the address is followed once
for a redirect, `PUT /data/services/auth` with the credentials answers a JSESSIONID,
`GET /data/auth` confirms it, `DELETE /data/JSESSION` logs out. The import itself is
one `POST /data/services/import` with the zip streamed from a temporary file, so
neither the series nor the zip is held in memory. Subject and session labels come
from templates filled with the series' tags (`labels.py`).
"""

# Why this module is long: XNAT's REST conversation (login, project and
# permission checks, import, the check afterwards) is one sequence, each step's
# errors in words beside it.

from __future__ import annotations

import logging
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import requests
from django.conf import settings

from targets import http
from targets.kinds.base import (
    FAILED,
    SENT,
    CheckReport,
    Handler,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    instance_outcome,
)
from targets.paths import plain_name, uid_part
from targets.series import Series

from .labels import (
    COMPUTED_KEYS,
    DEFAULT_SESSION_TEMPLATE,
    DEFAULT_SUBJECT_TEMPLATE,
    TemplateError,
    render_label,
    template_keys,
)

log = logging.getLogger(__name__)


class _JSession(requests.auth.AuthBase):
    """Send the login's JSESSIONID with every request, as XNAT's clients do."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, request):
        request.headers["Cookie"] = f"JSESSIONID={self.token}"
        return request


class XnatSession:
    """A logged-in XNAT: `get()` and `post()` relative to its address."""

    def __init__(self, http_session: http.HttpSession, base_url: str):
        self.http = http_session
        self.base_url = base_url

    def get(self, path: str, **kwargs) -> requests.Response:
        return http.send(self.http, "GET", self.base_url + path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return http.send(self.http, "POST", self.base_url + path, **kwargs)

    def disconnect(self) -> None:
        try:
            self.http.delete(self.base_url + "/data/JSESSION")
        finally:
            self.http.close()


class XnatHandler(Handler):
    @property
    def base_url(self) -> str:
        return (self.target.url or "").rstrip("/")

    # -- session --------------------------------------------------------------------
    def connect(self) -> XnatSession:
        """Log in; errors become TargetErrors in words."""
        t = self.target
        session = http.session_for(t)
        try:
            return self._login(session)
        except http.NoAnswer as exc:
            session.close()
            raise self._no_answer(exc, "") from None
        except BaseException:
            session.close()
            raise

    def _login(self, session: http.HttpSession) -> XnatSession:
        t = self.target
        # Where the address leads (http to https, a /xnat path): the imports are
        # POSTs, which a redirect would turn into GETs.
        pilot = http.send(session, "GET", self.base_url)
        base = _server_of(pilot.url) or self.base_url
        resp = http.send(
            session,
            "PUT",
            base + "/data/services/auth",
            data={"username": t.username, "password": str(t.password)},
        )
        if resp.status_code != 200:
            if re.search("<h3>(.*)</h3>", resp.text):
                raise self._login_refused()
            # No XNAT answer at all (a 404 or 405 from a server that has no
            # /data/services/auth).
            raise TargetError(
                f"not an XNAT server: {self._netloc} did not answer XNAT's login "
                "request (/data/services/auth); check that the URL is the XNAT's "
                "address",
                permanent=True,
            )
        session.auth = _JSession(resp.text.strip())
        check = http.send(session, "GET", base + "/data/auth")
        if check.status_code == 401 or "Login attempt failed" in check.text:
            raise self._login_refused()
        if check.status_code != 200:
            raise TargetError(
                f"XNAT login did not work: /data/auth answered HTTP {check.status_code}"
            )
        return XnatSession(session, base)

    def _login_refused(self) -> TargetError:
        return TargetError(
            f"login failed: XNAT refused user {self.target.username} — check the "
            "username and password",
            permanent=True,
        )

    def _no_answer(self, exc: http.NoAnswer, doing: str) -> TargetError:
        """A request without an answer, in words; `doing` e.g. "the import"."""
        t = self.target
        if exc.cause == http.TLS:
            return TargetError(
                f"TLS failed with {self._netloc}: {exc.words} — check the CA bundle "
                "or the server's certificate",
                permanent=True,
            )
        if exc.cause == http.TIMEOUT and doing:
            return TargetError(
                f"XNAT did not answer {doing} within {t.request_timeout:g} s"
                + (
                    " — XNAT unpacks the upload before answering; raise the request "
                    "timeout for large series"
                    if doing == "the import"
                    else ""
                )
            )
        if exc.cause == http.TIMEOUT:
            return TargetError(
                f"no answer from {self._netloc} within {t.request_timeout:g} s"
            )
        if doing == "the import":
            return TargetError(f"the upload to {self._netloc} broke off: {exc.words}")
        if doing:
            return TargetError(f"XNAT did not answer {doing}: {exc.words}")
        return TargetError(f"cannot connect to {self._netloc}: {exc.words}")

    @property
    def _netloc(self) -> str:
        return http.netloc(self.base_url)

    def _get(self, session: XnatSession, path: str, **params) -> requests.Response:
        try:
            return session.get(path, params=params)
        except http.NoAnswer as exc:
            raise self._no_answer(exc, path) from None

    def _check_project(self, session: XnatSession) -> None:
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

    def _check_write(self, session: XnatSession) -> None:
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
        connections: int | None = None,
    ) -> SendResult:
        t = self.target
        result, report = self.start(progress)
        if not series.instances:
            return result
        subject, session_label = self.labels(series)

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
    def _session(self) -> Iterator[XnatSession]:
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
        self, session: XnatSession, query: dict, path: Path, content_type: str
    ) -> requests.Response:
        """POST one file to the import service, streamed from disk."""
        try:
            with open(path, "rb") as fh:
                return session.post(
                    "/data/services/import",
                    params=query,
                    data=fh,
                    headers={"Content-Type": content_type},
                )
        except http.NoAnswer as exc:
            raise self._no_answer(exc, "the import") from None
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
        self, session: XnatSession, uri: str, subject: str, label: str
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
        with http.session_for(self.target) as session:
            try:
                resp = http.send(
                    session,
                    "GET",
                    self.base_url + "/data/version",
                    allow_redirects=False,
                )
            except http.NoAnswer as exc:
                raise TargetError(
                    f"cannot ask {self._netloc} for its XNAT version: {exc.words}"
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

    def test(self) -> CheckReport:
        result = CheckReport()
        t = self.target
        with result.check("Reachable") as c, http.session_for(t) as session:
            try:
                resp = http.send(session, "GET", self.base_url + "/")
            except http.NoAnswer as exc:
                error = self._no_answer(exc, "")
                error.permanent = False
                raise error from None
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


def _server_of(url: str) -> str:
    """The XNAT's address from the URL a request ended at (as xnatpy finds it)."""
    match = re.match(r"(.*/)(app|data)/", url or "")
    return (match.group(1) if match else url or "").rstrip("/")
