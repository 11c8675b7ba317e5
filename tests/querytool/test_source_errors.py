"""Every way a source can fail is a message in words on the query page, never a 500.

The failing peers are real sockets: a host name that does not resolve, a port that
refuses, a server that accepts and never answers, an HTTP server answering 403, 404,
500, 503 or not JSON, a TLS server with a certificate Courier does not trust, Orthanc
rejecting a wrong called AE title, and local folders that are missing, a file, damaged
or unreadable to the user Courier runs as.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.test import override_settings

from querytool.models import AuditEntry
from targets.models import DicomTarget, DicomWebTarget
from targets.query import Criteria, SourceError
from tests.nobody import as_nobody

pytestmark = pytest.mark.django_db

URL = "/query/"


class _Answers(BaseHTTPRequestHandler):
    """/403/…, /404/…, /500/…, /503/… answer that status; /notjson/… a web page;
    /slow/… waits longer than any test's request timeout."""

    def do_GET(self):
        head = self.path.strip("/").split("/")[0]
        if head == "slow":
            time.sleep(3)
        if head.isdigit():
            body = f"<html><body>status {head} from the test server</body></html>"
            self.send_response(int(head))
        else:
            body = "<html><body>a login page, not DICOM JSON</body></html>"
            self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def _serve(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Answers))


@pytest.fixture(scope="module")
def https_port(pki) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server.pem"], pki["server.key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(server)


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """Accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for sock in held:
        sock.close()
    listener.close()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def dicom(**fields) -> DicomTarget:
    defaults = dict(
        name="PACS",
        host="127.0.0.1",
        called_aet="PACS",
        direction="query",
        connect_timeout=10,
        acse_timeout=30,
        dimse_timeout=30,
    )
    return DicomTarget.objects.create(**{**defaults, **fields})


def web(url: str, **fields) -> DicomWebTarget:
    return DicomWebTarget.objects.create(
        name="Web", url=url, direction="query", **fields
    )


def page_error(client, source) -> str:
    """Search `source` on the page; return the error box's text (and check the rest)."""
    response = client.get(URL, {"source": source.pk, "patient_id": "P001"})
    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="query-error"' in body, body[-3000:]
    text = body.split('id="query-error">', 1)[1].split("</div>", 1)[0]
    assert "Traceback" not in body and "Server Error (500)" not in body
    entry = AuditEntry.objects.latest("at")
    assert entry.ok is False and entry.source_id == source.pk
    return text


CASES: dict[str, tuple[Callable, str]] = {
    # DICOM
    "dicom host does not resolve": (
        lambda p: dicom(host="pacs.invalid", port=104),
        "Source unreachable: the host name &#x27;pacs.invalid&#x27; does not resolve",
    ),
    "dicom connection refused": (
        lambda p: dicom(port=p["refused"]),
        "Source unreachable: connection refused by 127.0.0.1:{refused}: is the "
        "DICOM service running, and the port right?",
    ),
    "dicom no answer to the association request": (
        lambda p: dicom(port=p["silent"], acse_timeout=1),
        "127.0.0.1:{silent} accepted the connection but did not answer the "
        "association request within 1 s: is it a DICOM port?",
    ),
    "dicom port that is not DICOM": (
        lambda p: dicom(port=p["http"], acse_timeout=1),
        "127.0.0.1:{http} accepted the connection but did not answer the "
        "association request within 1 s: is it a DICOM port?",
    ),
    "dicom association rejected": (
        lambda p: dicom(port=p["strict"], called_aet="WRONG"),
        "Association rejected by 127.0.0.1:{strict}: Called AE title not "
        "recognised (check the target AET, &#x27;WRONG&#x27;).",
    ),
    # DICOMweb
    "dicomweb host does not resolve": (
        lambda p: web("http://pacs.invalid/dicom-web"),
        "Source unreachable: http://pacs.invalid: the host name does not resolve.",
    ),
    "dicomweb connection refused": (
        lambda p: web(f"http://127.0.0.1:{p['refused']}/dicom-web"),
        "Source unreachable: http://127.0.0.1:{refused}: connection refused",
    ),
    "dicomweb timeout": (
        lambda p: web(f"http://127.0.0.1:{p['http']}/slow", request_timeout=1),
        "QIDO-RS to http://127.0.0.1:{http} timed out after 1 s.",
    ),
    "dicomweb TLS not trusted": (
        lambda p: web(f"https://127.0.0.1:{p['https']}/dicom-web"),
        "TLS failed with https://127.0.0.1:{https}: the server&#x27;s certificate "
        "is not trusted (unknown CA)",
    ),
    "dicomweb 403": (
        lambda p: web(f"http://127.0.0.1:{p['http']}/403"),
        "QIDO-RS answered 403: forbidden for this user.",
    ),
    "dicomweb 404": (
        lambda p: web(f"http://127.0.0.1:{p['http']}/404"),
        "QIDO-RS answered 404 Not Found (check the URL and the QIDO/WADO prefixes)",
    ),
    "dicomweb 500": (
        lambda p: web(f"http://127.0.0.1:{p['http']}/500"),
        "QIDO-RS answered 500 Internal Server Error (the server failed: see its "
        "log): &lt;html&gt;&lt;body&gt;status 500 from the test server",
    ),
    "dicomweb 503": (
        lambda p: web(f"http://127.0.0.1:{p['http']}/503"),
        "QIDO-RS answered 503 Service Unavailable (the server failed",
    ),
    "dicomweb answer that is not JSON": (
        lambda p: web(f"http://127.0.0.1:{p['http']}/notjson"),
        "QIDO-RS answered something that is not DICOM JSON",
    ),
    # local folder
    "folder missing": (
        lambda p: web(f"file://{p['tmp']}/nowhere"),
        "The folder {tmp}/nowhere does not exist.",
    ),
    "folder is a file": (
        lambda p: web(f"file://{p['file']}"),
        "{file} is a file, not a folder.",
    ),
    "folder with a damaged index": (
        lambda p: web(f"file://{p['damaged']}"),
        "The index of the folder {damaged} cannot be used (file is not a database): "
        "delete .courier-index.sqlite3 there",
    ),
}


@pytest.fixture
def ports(
    refused_port, silent_port, http_port, https_port, orthanc_checking_aet, tmp_path
) -> dict:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / ".courier-index.sqlite3").write_bytes(b"not a database " * 100)
    (tmp_path / "a-file").write_text("not a folder")
    return {
        "refused": refused_port,
        "silent": silent_port,
        "http": http_port,
        "https": https_port,
        "strict": orthanc_checking_aet.dicom_port,
        "tmp": tmp_path,
        "file": tmp_path / "a-file",
        "damaged": damaged,
    }


@pytest.mark.parametrize("case", CASES)
def test_a_failing_source_is_explained_on_the_page(case, client, staff, ports):
    make, expected = CASES[case]
    source = make(ports)
    assert expected.format(**ports) in page_error(client, source)


def test_a_retrieval_from_a_source_that_does_not_resolve_fails_in_words(
    client, staff, tmp_path, settings
):
    from querytool import services, tasks
    from querytool.models import RetrievalState

    settings.COURIER_DOWNLOAD_DIR = tmp_path / "downloads"
    source = dicom(host="pacs.invalid", port=104)
    (job,) = services.start_retrieval(
        source,
        [services.RetrieveItem("1.2.3", [], "someone")],
        staff,
        download=True,
    )
    job = tasks.run_retrieval(job.pk)
    assert job.state == RetrievalState.FAILED
    assert job.message.startswith(
        "Source unreachable: the host name 'pacs.invalid' does not resolve"
    )


# -- a folder Courier's user cannot read -------------------------------------------


def test_folders_the_service_user_cannot_read_are_named_and_nothing_is_dropped(
    shared_tmp, query_studies
):
    data = shared_tmp / "data"
    data.mkdir()
    data.chmod(0o777)
    locked = shared_tmp / "locked"
    locked.mkdir()
    readable = shared_tmp / "readable"
    readable.mkdir()
    query_studies.copy_to(readable / "sub")

    def search(path: Path) -> Callable[[], object]:
        def run():
            # Unsaved: the forked child must not write to the parent's database.
            target = DicomWebTarget(name="f", url=path.as_uri(), direction="query")
            source = target.query_source()
            try:
                found = source.find_studies(Criteria(), 1000)
            except SourceError as exc:
                return exc.message
            return len(found.studies), source.index_info()["problem_list"]

        return run

    with override_settings(DATA_DIR=data, COURIER_INDEX_MAX_AGE=0):
        # Indexed once while readable (the index lives in the folder, root's).
        everything, problems = search(readable)()
        assert everything == len(query_studies.studies) and problems == []
        (readable / ".courier-index.sqlite3").chmod(0o666)
        readable.chmod(0o777)
        (readable / "sub").chmod(0o000)
        locked.chmod(0o000)

        assert as_nobody(search(locked)) == (
            "ok",
            f"Courier cannot read the folder {locked}: permission denied (check "
            "the folder's permissions for the user Courier runs as).",
        )
        # A sub-folder it cannot read is listed, and what was indexed under it
        # stays findable (a passing permission problem loses nothing).
        status, (count, problems) = as_nobody(search(readable))
    assert status == "ok" and count == everything
    assert problems == [("sub/", "folder cannot be read: Permission denied")]
