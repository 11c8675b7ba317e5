"""DICOMweb targets against Orthanc's DICOMweb plugin with HTTP basic auth on."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pydicom
import pytest
from django.core.exceptions import ValidationError

from targets.kinds.base import FAILED, PRESENT, SENT, TargetError
from targets.kinds.dicomweb.handler import MultipartBody, status_in_words
from targets.models import DicomWebTarget
from targets.query import Criteria, SourceError
from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.fixtures.web_peers import ORTHANC_USERS
from tests.peers import free_port

REPO = Path(__file__).resolve().parents[3]


def dicomweb_target(url: str, **kwargs) -> DicomWebTarget:
    values = {
        "name": "web",
        "url": url,
        "auth": "basic",
        "username": "alice",
        "password": ORTHANC_USERS["alice"],
    }
    values.update(kwargs)
    return DicomWebTarget(**values)


def test_a_series_sent_by_stow_rs_arrives_in_orthanc(orthanc_auth, tmp_path):
    gen = make_series(tmp_path / "s", 7)
    target = dicomweb_target(orthanc_auth.dicomweb_url, stow_batch_size=3)
    seen = []

    result = target.handler.send(scan_folder(gen.folder), progress=seen.append)

    assert result.sent == 7 and result.failed == 0
    assert [o.status for o in seen] == [SENT] * 7
    stored = {orthanc_auth.find_instance(uid) for uid in gen.sop_uids}
    assert None not in stored and len(stored) == 7


def test_parallel_requests_deliver_every_instance_and_keep_the_order(
    orthanc_auth, tmp_path
):
    gen = make_series(tmp_path / "s", 40)
    target = dicomweb_target(
        orthanc_auth.dicomweb_url, stow_batch_size=4, max_connections=3
    )

    result = target.handler.send(scan_folder(gen.folder))

    assert result.sent == 40 and result.failed == 0
    assert [o.sop_instance_uid for o in result.outcomes] == gen.sop_uids
    assert all(orthanc_auth.find_instance(uid) for uid in gen.sop_uids)


def test_parallel_requests_stop_on_an_authentication_error(orthanc_auth, tmp_path):
    gen = make_series(tmp_path / "s", 12)
    target = dicomweb_target(
        orthanc_auth.dicomweb_url,
        password="wrong",
        stow_batch_size=2,
        max_connections=3,
    )
    seen = []
    with pytest.raises(TargetError) as exc:
        target.handler.send(scan_folder(gen.folder), progress=seen.append)
    assert exc.value.permanent and "authentication failed" in str(exc.value)
    assert seen == []


def test_batches_respect_the_request_size_limit(orthanc_auth, tmp_path):
    gen = make_series(tmp_path / "s", 5)
    size = gen.files[0].stat().st_size
    # Room for two instances per request.
    target = dicomweb_target(orthanc_auth.dicomweb_url, stow_max_bytes=2 * size + 10)
    batches = list(target.handler._batches(scan_folder(gen.folder).instances))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert target.handler.send(scan_folder(gen.folder)).sent == 5


def test_instances_the_server_refuses_are_failed_with_the_reason_in_words(
    orthanc_auth, tmp_path
):
    gen = make_series(tmp_path / "s", 3)
    # Orthanc refuses an instance without SeriesInstanceUID (FailedSOPSequence,
    # reason 0xC000); the rest of the request is stored.
    ds = pydicom.dcmread(gen.files[1])
    del ds.SeriesInstanceUID
    ds.save_as(gen.files[1])

    result = dicomweb_target(orthanc_auth.dicomweb_url).handler.send(
        scan_folder(gen.folder)
    )

    by_uid = {o.sop_instance_uid: o for o in result.outcomes}
    assert by_uid[gen.sop_uids[0]].status == SENT
    assert by_uid[gen.sop_uids[2]].status == SENT
    refused = by_uid[gen.sop_uids[1]]
    assert refused.status == FAILED
    assert "cannot understand (0xC000)" in refused.message
    assert orthanc_auth.find_instance(gen.sop_uids[1]) is None


def test_a_wrong_password_is_a_permanent_authentication_error(orthanc_auth, tmp_path):
    gen = make_series(tmp_path / "s", 2)
    target = dicomweb_target(orthanc_auth.dicomweb_url, password="wrong")

    with pytest.raises(TargetError) as exc:
        target.handler.send(scan_folder(gen.folder))

    assert exc.value.permanent
    assert "authentication failed" in str(exc.value)
    assert "401" in str(exc.value)
    assert "wrong" not in str(exc.value)
    assert orthanc_auth.find_instance(gen.sop_uids[0]) is None


def test_the_test_reports_a_wrong_password_as_an_authentication_failure(orthanc_auth):
    result = dicomweb_target(orthanc_auth.dicomweb_url, password="wrong").handler.test()

    assert not result.ok
    checks = {c.name: c for c in result.checks}
    assert checks["Reachable"].ok
    assert not checks["Authentication"].ok
    assert "authentication failed" in checks["Authentication"].message
    assert "wrong" not in json.dumps(result.as_dict())


def test_the_test_reports_missing_credentials_as_an_authentication_failure(
    orthanc_auth,
):
    result = dicomweb_target(orthanc_auth.dicomweb_url, auth="none").handler.test()
    checks = {c.name: c for c in result.checks}
    assert not checks["Authentication"].ok
    assert "requires authentication" in checks["Authentication"].message


def test_the_test_passes_reachability_auth_qido_and_stow(orthanc_auth):
    target = dicomweb_target(orthanc_auth.dicomweb_url, direction="both")
    result = target.handler.test()

    assert result.ok, result.summary
    names = [c.name for c in result.checks]
    assert names == [
        "Reachable",
        "Authentication",
        "QIDO-RS studies?limit=1",
        "STOW-RS",
    ]
    assert "empty STOW-RS request" in result.checks[-1].message


def test_a_wrong_stow_prefix_fails_the_stow_check(orthanc_auth):
    target = dicomweb_target(
        orthanc_auth.base_url, qido_prefix="dicom-web", stow_prefix="nowhere"
    )
    result = target.handler.test()
    checks = {c.name: c for c in result.checks}
    assert checks["QIDO-RS studies?limit=1"].ok
    assert not checks["STOW-RS"].ok
    assert "check the URL and the STOW prefix" in checks["STOW-RS"].message


def test_a_closed_port_is_a_failed_reachability_check_and_a_transient_send_error(
    tmp_path,
):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = dicomweb_target(url).handler.test()
    assert not result.ok
    assert result.checks[0].name == "Reachable"
    assert "connection refused" in result.checks[0].message

    gen = make_series(tmp_path / "s", 1)
    with pytest.raises(TargetError) as exc:
        dicomweb_target(url).handler.send(scan_folder(gen.folder))
    assert not exc.value.permanent


def test_a_server_that_never_answers_is_a_transient_timeout(tmp_path):
    # A listening socket nobody accepts from: the request goes out, no answer comes.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
    gen = make_series(tmp_path / "s", 1)
    try:
        with pytest.raises(TargetError) as exc:
            dicomweb_target(url, request_timeout=0.5).handler.send(
                scan_folder(gen.folder)
            )
        result = dicomweb_target(url, request_timeout=0.5).handler.test()
    finally:
        silent.close()
    assert not exc.value.permanent
    assert "within 0.5 s" in str(exc.value)
    assert not result.ok and "within 0.5 s" in result.checks[0].message


class _QidoAnswer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - stdlib name
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def https_server(pki):
    """A small HTTPS endpoint presenting a certificate from the TLS fixture's CA."""

    def start(cert: str):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QidoAnswer)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki[f"{cert}.pem"], pki[f"{cert}.key"])
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return f"https://127.0.0.1:{server.server_address[1]}/dicom-web"

    started: list = []
    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("cert", "settings", "words"),
    [
        ("server", {"ca_bundle": "ca.pem"}, None),
        ("server", {"verify_tls": False}, None),
        ("server", {}, "not trusted"),
        ("server", {"ca_bundle": "other-ca.pem"}, "not trusted"),
        ("expired", {"ca_bundle": "ca.pem"}, "expired"),
        ("elsewhere", {"ca_bundle": "ca.pem"}, "does not name this host"),
    ],
)
def test_https_certificates_are_checked_against_the_ca_bundle(
    https_server, pki, cert, settings, words
):
    url = https_server(cert)
    values = {k: pki[v] if k == "ca_bundle" else v for k, v in settings.items()}
    result = dicomweb_target(
        url, auth="none", direction="query", **values
    ).handler.test()

    reachable = result.checks[0]
    if words is None:
        assert result.ok, result.summary
    else:
        assert not reachable.ok and words in reachable.message


# The settings that must reach the server, and the ones that must not.
TLS_SETTINGS = [
    ("server", {"ca_bundle": "ca.pem"}, None),
    ("server", {"verify_tls": False}, None),
    # Verification off means off, whatever CA bundle is left in the field.
    ("server", {"verify_tls": False, "ca_bundle": "other-ca.pem"}, None),
    ("server", {}, "not trusted"),
    ("server", {"ca_bundle": "other-ca.pem"}, "not trusted"),
    ("expired", {"ca_bundle": "ca.pem"}, "expired"),
    ("elsewhere", {"ca_bundle": "ca.pem"}, "does not name this host"),
]


@pytest.mark.parametrize(("cert", "settings", "words"), TLS_SETTINGS)
def test_the_query_source_verifies_tls_exactly_as_the_handler_does(
    https_server, pki, cert, settings, words
):
    # Before the one HTTP seam, the query source verified against the CA bundle
    # even with verification off (its `verify` was `ca_bundle or verify_tls`).
    url = https_server(cert)
    values = {k: pki[v] if k == "ca_bundle" else v for k, v in settings.items()}
    target = dicomweb_target(url, auth="none", direction="query", **values)

    tested = target.handler.test().checks[0]
    try:
        target.query_source().find_studies(Criteria(), 10)
    except SourceError as exc:
        searched = exc.message
    else:
        searched = None

    if words is None:
        assert tested.ok and searched is None, (tested.message, searched)
    else:
        assert not tested.ok and words in tested.message
        assert searched is not None and words in searched


@pytest.mark.parametrize(
    ("environment", "settings"),
    [
        # "The system's CAs" include the process's REQUESTS_CA_BUNDLE ...
        ("ca.pem", {}),
        # ... but a target's own CA bundle wins over it.
        ("other-ca.pem", {"ca_bundle": "ca.pem"}),
    ],
)
def test_the_query_source_and_the_handler_read_the_environment_alike(
    https_server, pki, monkeypatch, environment, settings
):
    # The query source sent prepared requests past requests' environment
    # handling, so with REQUESTS_CA_BUNDLE set it disagreed with the handler.
    url = https_server("server")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki[environment])
    values = {k: pki[v] for k, v in settings.items()}
    target = dicomweb_target(url, auth="none", direction="query", **values)

    assert target.handler.test().ok
    assert target.query_source().find_studies(Criteria(), 10).studies == []


def test_the_query_source_is_configured_like_the_target(orthanc_auth, tmp_path):
    gen = make_series(tmp_path / "s", 2)
    target = dicomweb_target(orthanc_auth.dicomweb_url, direction="both")
    target.handler.send(scan_folder(gen.folder))

    found = target.query_source().find_studies(Criteria(study_uid=gen.study_uid), 10)
    assert [s.study_uid for s in found.studies] == [gen.study_uid]


def test_a_file_url_writes_the_dicomweb_folder_layout(tmp_path):
    gen = make_series(tmp_path / "s", 3)
    dest = tmp_path / "web"
    dest.mkdir()
    target = dicomweb_target(f"file://{dest}", auth="none", username="", password="")
    target.clean()

    result = target.handler.send(scan_folder(gen.folder))
    again = target.handler.send(scan_folder(gen.folder))

    assert result.sent == 3
    assert again.count(PRESENT) == 3
    for uid in gen.sop_uids:
        path = (
            dest
            / "studies"
            / gen.study_uid
            / "series"
            / gen.series_uid
            / "instances"
            / f"{uid}.dcm"
        )
        assert pydicom.dcmread(path).SOPInstanceUID == uid
    assert target.handler.test().ok


def test_a_file_url_must_name_an_existing_folder(tmp_path):
    target = dicomweb_target(f"file://{tmp_path}/missing", auth="none")
    with pytest.raises(ValidationError) as exc:
        target.clean()
    assert "does not exist" in str(exc.value.message_dict["url"])


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"url": "ftp://example.org/"}, "url", "http://, https:// or file://"),
        ({"url": "https://bob:pw@example.org/"}, "url", "own fields"),
        (
            {"url": "https://example.org/", "password": ""},
            "password",
            "needs a password",
        ),
        (
            {"url": "https://example.org/", "username": ""},
            "username",
            "needs a username",
        ),
        ({"url": "https://example.org/", "auth": "bearer"}, "token", "needs a token"),
        (
            {"url": "https://example.org/", "ca_bundle": "/nonexistent.pem"},
            "ca_bundle",
            "does not exist",
        ),
    ],
)
def test_bad_settings_are_form_errors(values, field, words):
    target = dicomweb_target(**values) if "url" in values else dicomweb_target("")
    with pytest.raises(ValidationError) as exc:
        target.clean()
    assert words in " ".join(exc.value.message_dict[field])


def test_a_ca_bundle_without_certificates_is_a_form_error(tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    target = dicomweb_target("https://example.org/", ca_bundle=str(bogus))
    with pytest.raises(ValidationError) as exc:
        target.clean()
    assert "no PEM certificate" in " ".join(exc.value.message_dict["ca_bundle"])


def test_the_multipart_body_streams_exactly_its_announced_length(tmp_path):
    gen = make_series(tmp_path / "s", 3)
    body = MultipartBody(gen.files, boundary="b")
    data = b"".join(iter(body))
    assert len(data) == len(body)
    assert data.count(b"--b\r\nContent-Type: application/dicom\r\n\r\n") == 3
    assert data.endswith(b"\r\n--b--\r\n")
    assert gen.files[0].read_bytes() in data


def test_status_codes_are_put_in_words():
    assert status_in_words(0xA700) == "out of resources (0xA700)"
    assert status_in_words(0xB000) == "coercion of data elements (0xB000)"
    assert status_in_words(0x0122) == "SOP class not supported (0x0122)"


SEND_IN_SUBPROCESS = textwrap.dedent(
    """
    import json, os, sys
    import django
    django.setup()
    from targets.models import DicomWebTarget
    from targets.series import scan_folder
    series = scan_folder(sys.argv[1])
    target = DicomWebTarget(name="big", url=sys.argv[2], auth="basic",
                            username="alice", password=os.environ["DICOMWEB_PASSWORD"],
                            stow_batch_size=50)
    handler = target.handler
    def peak_kb():
        # VmHWM is this process's own peak; ru_maxrss would include the parent's
        # (Linux keeps the high-water mark across the vfork+exec of subprocess).
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    before = peak_kb()
    result = handler.send(series)
    after = peak_kb()
    print(json.dumps({"sent": result.sent, "failed": result.failed,
                      "before_kb": before, "peak_kb": after}))
    """
)


def test_a_large_series_is_sent_with_memory_bounded_by_the_stream_not_the_series(
    orthanc_auth, tmp_path
):
    # 500 instances of 531 KB: a 265 MB series, 26 MB per request of 50. The
    # interpreter with Django and pydicom loaded is already ~100 MB, so the series
    # must be large for "well under the series size" to mean something.
    gen = make_series(tmp_path / "big", 500, size=512)
    series_bytes = gen.total_bytes
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "COURIER_DATA_DIR": str(tmp_path / "data"),
        # The environment, not argv: argv is visible to every user in `ps`.
        "DICOMWEB_PASSWORD": ORTHANC_USERS["alice"],
    }

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SEND_IN_SUBPROCESS,
            str(gen.folder),
            orthanc_auth.dicomweb_url,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["sent"] == 500 and figures["failed"] == 0
    peak = figures["peak_kb"] * 1024
    growth = (figures["peak_kb"] - figures["before_kb"]) * 1024
    assert growth < 16 * 1024**2, figures
    assert peak < series_bytes / 2, (peak, series_bytes)
    assert orthanc_auth.find_instance(gen.sop_uids[-1]) is not None
    shutil.rmtree(gen.folder)
