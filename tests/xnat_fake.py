"""A small fake XNAT for the tests: the REST endpoints xnatpy and the import service use.

No XNAT server can be installed on the test machines, so this stdlib HTTP server
(in a thread, on a free loopback port) behaves like XNAT 1.8 where Courier depends on
it (see ../shared/PEERS.md section 5):

- login: `PUT/POST /data/services/auth` with form credentials answers the JSESSIONID
  (also set as a cookie); `GET /data/auth`, `GET|DELETE /data/JSESSION`,
  `GET /data/version`. Every other `/data` request needs the cookie or HTTP basic
  auth, else 401.
- projects: `GET /data/projects/<id>` (404 unknown, 403 when the user has no role),
  `GET /data/projects?permissions=edit&dataType=xnat:subjectData` (the projects the
  user may upload to: owner or member; a collaborator only reads).
- `POST /data/services/import?project=&subject=&session=&overwrite=&dest=&import-handler=`
  with a raw zip body: 400 for a body that is not a zip or holds a non-DICOM member,
  409 when the archived session exists and overwrite is none; otherwise the import
  is recorded and answered with a prearchive (or archive) URI. With
  `import-handler=gradual-DICOM` (and PROJECT_ID/SUBJECT_ID/EXPT_LABEL) each request
  carries one DICOM file, added to the same recorded import.
- `GET /data/prearchive/projects/<id>` lists prearchived sessions;
  `GET /data/projects/<p>/subjects/<s>/experiments/<e>` finds archived ones.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import ssl
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

WRITE_ROLES = {"owner", "member"}


@dataclass
class Import:
    """One accepted import, for the tests' assertions."""

    project: str
    subject: str
    session: str
    files: int
    overwrite: str
    dest: str
    import_handler: str
    uri: str
    member_names: list[str] = field(default_factory=list)


class XnatFake:
    """The fake server: `users` name -> password, `projects` id -> {user: role}."""

    def __init__(
        self,
        users: dict[str, str],
        projects: dict[str, dict[str, str]],
        *,
        version: str = "1.8.10",
        tls: tuple[str, str] | None = None,
    ):
        # (certificate, key) files: serve HTTPS with them instead of HTTP.
        self.tls = tls
        self.users = users
        self.projects = projects
        self.version = version
        self.sessions: dict[str, str] = {}  # JSESSIONID -> user
        self.imports: list[Import] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) seen
        # When true, imports are answered but not kept: the session is "lost",
        # as when XNAT fails after answering (for testing the check afterwards).
        self.lose_imports = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> XnatFake:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="xnat-fake", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> XnatFake:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def imports_for(self, project: str, session: str) -> list[Import]:
        return [
            i for i in self.imports if i.project == project and i.session == session
        ]


class _Handler(BaseHTTPRequestHandler):
    server_fake: XnatFake
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the tests read `fake.requests` instead

    # -- plumbing --------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: str | bytes = b"",
        ctype: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload) -> None:
        self._send(status, json.dumps(payload), "application/json")

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)

    def _user(self) -> str | None:
        fake = self.server_fake
        cookie = self.headers.get("Cookie") or ""
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "JSESSIONID" and value in fake.sessions:
                return fake.sessions[value]
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return None
            if fake.users.get(user) == password:
                return user
        return None

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        fake = self.server_fake
        with fake._lock:
            fake.requests.append((method, path))
        if path == "/" and method == "GET":
            return self._send(200, "<html><title>XNAT</title></html>", "text/html")
        if path == "/data/services/auth" and method in ("PUT", "POST"):
            return self._login()
        if path == "/data/version":
            return self._send(200, fake.version)
        user = self._user()
        if path == "/data/JSESSION" and method == "DELETE":
            cookie = self.headers.get("Cookie") or ""
            for part in cookie.split(";"):
                name, _, value = part.strip().partition("=")
                if name == "JSESSIONID":
                    fake.sessions.pop(value, None)
            return self._send(200, "")
        if user is None:
            self._drain()
            return self._send(401, "<h3>Login required</h3>", "text/html")
        if path == "/data/auth":
            return self._send(200, f"User '{user}' is logged in")
        if path == "/data/JSESSION":
            token = next((k for k, v in fake.sessions.items() if v == user), "")
            return self._send(200, token)
        if path == "/data/services/import" and method == "POST":
            return self._import(user, query)
        if path == "/data/projects" and method == "GET":
            return self._projects(user, query)
        segs = path.split("/")[1:]
        if segs[:2] == ["data", "projects"] and len(segs) == 3 and method == "GET":
            return self._project(user, segs[2])
        if segs[:3] == ["data", "prearchive", "projects"] and len(segs) == 4:
            return self._prearchive(user, segs[3])
        if (
            segs[:2] == ["data", "projects"]
            and len(segs) == 7
            and segs[3] == "subjects"
            and segs[5] == "experiments"
        ):
            return self._experiment(user, segs[2], segs[4], segs[6])
        return self._send(404, "Not found")

    def do_GET(self) -> None:  # noqa: N802 - stdlib names
        self._route("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    # -- endpoints ---------------------------------------------------------------
    def _login(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        fake = self.server_fake
        user, password = form.get("username", ""), form.get("password", "")
        if not user or fake.users.get(user) != password:
            return self._send(
                401,
                "<html><h3>Login attempt failed. Please try again.</h3></html>",
                "text/html",
            )
        token = secrets.token_hex(16).upper()
        with fake._lock:
            fake.sessions[token] = user
        self._send(200, token, headers={"Set-Cookie": f"JSESSIONID={token}; Path=/"})

    def _role_or_error(self, user: str, project: str) -> str | None:
        """The user's role in the project, or None after answering 404/403."""
        members = self.server_fake.projects.get(project)
        if members is None:
            self._send(404, f"Unable to find project {project}")
            return None
        role = members.get(user)
        if role is None:
            self._send(403, f"User {user} has no access to project {project}")
            return None
        return role

    def _project(self, user: str, project: str) -> None:
        if self._role_or_error(user, project) is None:
            return
        self._json(
            200,
            {
                "items": [
                    {
                        "meta": {"xsi:type": "xnat:projectData"},
                        "data_fields": {"ID": project, "name": project},
                    }
                ]
            },
        )

    def _projects(self, user: str, query: dict[str, str]) -> None:
        wanted = WRITE_ROLES if query.get("permissions") == "edit" else None
        rows = [
            {"ID": pid, "id": pid, "name": pid}
            for pid, members in sorted(self.server_fake.projects.items())
            if user in members and (wanted is None or members[user] in wanted)
        ]
        self._json(200, {"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}})

    def _import(self, user: str, query: dict[str, str]) -> None:
        fake = self.server_fake
        handler = query.get("import-handler", "")
        gradual = handler == "gradual-DICOM"
        # DICOM-zip takes project/subject/session; gradual-DICOM takes the
        # PROJECT_ID/SUBJECT_ID/EXPT_LABEL convention (both are accepted by XNAT).
        project = query.get("project") or query.get("PROJECT_ID", "")
        subject = query.get("subject") or query.get("SUBJECT_ID", "")
        session = query.get("session") or query.get("EXPT_LABEL", "")
        if not project:
            self._drain()
            return self._send(400, "The import service needs a project")
        role = self._role_or_error(user, project)
        if role is None:
            self._drain()
            return
        if role not in WRITE_ROLES:
            self._drain()
            return self._send(403, f"User {user} may not upload to project {project}")
        dest = query.get("dest", "/prearchive")
        overwrite = query.get("overwrite", "none")
        to_archive = dest.startswith("/archive")
        archived = any(
            i.project == project
            and i.session == session
            and i.dest.startswith("/archive")
            for i in fake.imports
        )
        ongoing = None
        if gradual:
            ongoing = next(
                (
                    i
                    for i in reversed(fake.imports)
                    if i.import_handler == handler
                    and (i.project, i.session, i.dest) == (project, session, dest)
                ),
                None,
            )
        if to_archive and archived and overwrite == "none" and ongoing is None:
            self._drain()
            return self._send(409, f"Session {session} already exists in {project}")
        with tempfile.TemporaryFile() as body:
            length = int(self.headers.get("Content-Length") or 0)
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    break
                body.write(chunk)
                length -= len(chunk)
            body.seek(0)
            try:
                names = _dicom_file(body) if gradual else _dicom_members(body)
            except ValueError as exc:
                return self._send(400, str(exc))
        if ongoing is not None:
            with fake._lock:
                ongoing.files += len(names)
                ongoing.member_names += names
            return self._send(200, ongoing.uri + "\r\n")
        if to_archive:
            uri = f"/data/archive/projects/{project}/subjects/{subject}/experiments/{session}"
        else:
            stamp = time.strftime("%Y%m%d_%H%M%S") + f"{len(fake.imports):03d}"
            uri = f"/data/prearchive/projects/{project}/{stamp}/{session}"
        if fake.lose_imports:
            return self._send(200, uri + "\r\n")
        with fake._lock:
            fake.imports.append(
                Import(
                    project=project,
                    subject=subject,
                    session=session,
                    files=len(names),
                    overwrite=overwrite,
                    dest=dest,
                    import_handler=handler,
                    uri=uri,
                    member_names=names,
                )
            )
        self._send(200, uri + "\r\n")

    def _prearchive(self, user: str, project: str) -> None:
        if self._role_or_error(user, project) is None:
            return
        rows = []
        for imp in self.server_fake.imports:
            if imp.project == project and imp.uri.startswith("/data/prearchive"):
                stamp = imp.uri.split("/")[-2]
                rows.append(
                    {
                        "project": project,
                        "timestamp": stamp,
                        "name": imp.session,
                        "subject": imp.subject,
                        "status": "READY",
                        "url": imp.uri[len("/data") :],
                    }
                )
        self._json(200, {"ResultSet": {"Result": rows}})

    def _experiment(self, user: str, project: str, subject: str, session: str) -> None:
        if self._role_or_error(user, project) is None:
            return
        for imp in self.server_fake.imports:
            if (imp.project, imp.subject, imp.session) == (
                project,
                subject,
                session,
            ) and imp.dest.startswith("/archive"):
                return self._json(
                    200,
                    {
                        "items": [
                            {
                                "meta": {"xsi:type": "xnat:ctSessionData"},
                                "data_fields": {"label": session, "project": project},
                            }
                        ]
                    },
                )
        self._send(404, f"Unable to find experiment {session}")


def _dicom_file(body: io.IOBase) -> list[str]:
    """One posted DICOM file (gradual-DICOM); a non-DICOM body is refused."""
    head = body.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise ValueError("The posted file is not a DICOM file")
    return ["file"]


def _dicom_members(body: io.IOBase) -> list[str]:
    """Names of the zip's members, all checked to be DICOM (Part 10 preamble)."""
    try:
        archive = zipfile.ZipFile(body)
    except zipfile.BadZipFile:
        raise ValueError("The uploaded file is not a zip archive") from None
    names = []
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            with archive.open(info) as member:
                head = member.read(132)
            if len(head) < 132 or head[128:132] != b"DICM":
                raise ValueError(f"File {info.filename} is not a DICOM file")
            names.append(info.filename)
    if not names:
        raise ValueError("The uploaded archive holds no files")
    return names
