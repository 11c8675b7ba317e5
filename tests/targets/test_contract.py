"""One contract for every target kind: the proxy declares every fact of its kind
(handler, query source, validation, C-MOVE, chooser hint) and each dotted path
imports; admin pages, and a `test()` that reports an unreachable target as a
failed check in words instead of raising."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils.module_loading import import_string

from targets.kinds.base import CheckReport, Handler
from targets.models import PROXIES, Kind, Target
from targets.query import QuerySource
from targets.services import run_test

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

SECRET = "contract-Secret-9f3a"


@pytest.fixture(scope="module")
def ca_cert(tmp_path_factory) -> Path:
    """A self-signed CA certificate (DICOM+TLS needs a readable one)."""
    folder = tmp_path_factory.mktemp("ca")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=Courier contract test CA",
            "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return folder / "ca.pem"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test.

    The socket stays bound but never listens (Linux answers a connect with a
    reset), so no other process can take the port in the meantime.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# A minimal valid target of each kind, pointing at something that is not there:
# each gets (tmp_path, CA certificate, closed port).
UNREACHABLE: dict[str, Callable[[Path, Path, int], dict]] = {
    Kind.DICOM: lambda tmp, ca, port: dict(
        host="127.0.0.1", port=port, called_aet="NOBODY"
    ),
    Kind.DICOM_TLS: lambda tmp, ca, port: dict(
        host="127.0.0.1", port=port, called_aet="NOBODY", tls_ca_cert=str(ca)
    ),
    Kind.DICOMWEB: lambda tmp, ca, port: dict(
        url=f"http://127.0.0.1:{port}/dicom-web",
        auth="basic",
        username="courier",
        password=SECRET,
    ),
    Kind.FOLDER: lambda tmp, ca, port: dict(path=str(tmp / "does-not-exist")),
    Kind.RSYNC: lambda tmp, ca, port: dict(
        host="127.0.0.1",
        port=port,
        username="courier",
        password=SECRET,
        path="/srv/incoming",
    ),
    Kind.S3: lambda tmp, ca, port: dict(
        bucket="images",
        endpoint_url=f"http://127.0.0.1:{port}",
        addressing_style="path",
        access_key_id="courier",
        secret_key=SECRET,
    ),
    Kind.SFTP: lambda tmp, ca, port: dict(
        host="127.0.0.1",
        port=port,
        username="courier",
        password=SECRET,
        path="/srv/incoming",
    ),
    Kind.XNAT: lambda tmp, ca, port: dict(
        url=f"http://127.0.0.1:{port}",
        project="PROJ",
        username="courier",
        password=SECRET,
    ),
}

# The first failed check for each kind and words its message must contain.
FIRST_FAILURE: dict[str, tuple[str, str]] = {
    Kind.DICOM: ("TCP connect", "connection refused"),
    Kind.DICOM_TLS: ("TCP connect", "connection refused"),
    Kind.DICOMWEB: ("Reachable", "connection refused"),
    Kind.FOLDER: ("folder exists", "does not exist"),
    Kind.RSYNC: ("TCP connect", "connection refused"),
    Kind.S3: ("endpoint reachable", "connection refused"),
    Kind.SFTP: ("TCP connect", "connection refused"),
    Kind.XNAT: ("Reachable", "connection refused"),
}

KINDS = [k.value for k in Kind]


# What every proxy declares in its own class body (never inherited: DICOM+TLS is
# a DicomTarget, but it cannot be queried).
KIND_FACTS = ("KIND", "handler_path", "query_source_path", "validation_path")
KIND_FACTS += ("can_move", "hint")


def test_every_kind_has_a_proxy_and_a_contract_entry():
    assert set(PROXIES) == set(UNREACHABLE) == set(FIRST_FAILURE) == set(KINDS)
    assert all(proxy.KIND == kind for kind, proxy in PROXIES.items())


@pytest.mark.parametrize("kind", KINDS)
def test_the_proxy_declares_every_fact_of_its_kind(kind):
    proxy = PROXIES[kind]
    missing = [name for name in KIND_FACTS if name not in vars(proxy)]
    assert not missing, f"{proxy.__name__} does not declare {missing}"
    assert proxy.hint.strip()
    assert isinstance(proxy.can_move, bool)
    if proxy.can_move:
        assert proxy.query_source_path, "only a queryable kind can C-MOVE"


@pytest.mark.parametrize("kind", KINDS)
def test_every_dotted_path_a_proxy_names_imports(kind):
    proxy = PROXIES[kind]
    paths = {
        name: value
        for name, value in vars(proxy).items()
        if name.endswith("_path") and value is not None
    }
    assert paths["handler_path"].startswith(f"targets.kinds.{kind}.")
    for name, path in paths.items():
        found = import_string(path)
        if name.endswith("handler_path"):
            assert issubclass(found, Handler), path
            assert found.test is not Handler.test
            assert found.send is not Handler.send
        elif name.endswith("query_source_path"):
            assert issubclass(found, QuerySource), path
            assert found.find_studies is not QuerySource.find_studies
        else:
            assert callable(found), path


def test_a_file_url_makes_a_dicomweb_target_a_local_folder():
    http = PROXIES[Kind.DICOMWEB](name="w", url="http://pacs/dicom-web")
    local = PROXIES[Kind.DICOMWEB](name="f", url="file:///srv/dicom")
    assert type(http.handler).__name__ == "DicomWebHandler"
    assert type(http.query_source()).__name__ == "DicomWebQuery"
    assert type(local.handler).__name__ == "LocalFolderHandler"
    assert type(local.query_source()).__name__ == "LocalFolderQuery"
    assert local.query_source().indexed and not http.query_source().indexed


@pytest.fixture
def make_target(tmp_path, ca_cert, closed_port):
    def make(kind: str) -> Target:
        target = PROXIES[kind](
            name=f"contract {kind}",
            **UNREACHABLE[kind](tmp_path, ca_cert, closed_port),
        )
        target.full_clean()
        target.save()
        return target

    return make


@pytest.mark.parametrize("kind", KINDS)
def test_the_proxy_round_trips(kind, make_target):
    target = make_target(kind)
    proxy = PROXIES[kind]

    row = Target.objects.get(pk=target.pk)
    assert type(row) is Target and row.kind == kind
    as_kind = row.as_kind()
    assert type(as_kind) is proxy
    assert as_kind.pk == target.pk
    assert list(proxy.objects.values_list("pk", flat=True)) == [target.pk]
    others = [p for k, p in PROXIES.items() if k != kind and p is not proxy]
    assert all(not p.objects.filter(pk=target.pk).exists() for p in others)
    assert row.address and SECRET not in row.address
    assert SECRET not in repr(as_kind.__dict__)


@pytest.mark.parametrize("kind", KINDS)
def test_the_admin_add_and_change_pages_render(kind, admin_client, make_target):
    add = admin_client.get(reverse("admin:targets_target_add"), {"kind": kind})
    assert add.status_code == 200
    assert add.context["adminform"].form._meta.model is PROXIES[kind]

    target = make_target(kind)
    change = admin_client.get(reverse("admin:targets_target_change", args=[target.pk]))
    assert change.status_code == 200
    assert SECRET not in change.content.decode()


@pytest.mark.parametrize("kind", KINDS)
def test_testing_an_unreachable_target_fails_a_check_in_words(
    kind, make_target, closed_port
):
    target = make_target(kind)

    result = target.handler.test()

    assert isinstance(result, CheckReport)
    assert not result.ok
    failed = [c for c in result.checks if not c.ok and not c.informational]
    assert failed, result.as_dict()
    assert all(c.message.strip() for c in failed), result.as_dict()
    assert "Traceback" not in failed[0].message
    assert not failed[0].message.startswith("internal error")
    name, words = FIRST_FAILURE[kind]
    assert failed[0].name == name, result.as_dict()
    assert words in failed[0].message
    if kind != Kind.FOLDER:
        assert f"127.0.0.1:{closed_port}" in failed[0].message
    assert SECRET not in str(result.as_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_the_stored_result_of_a_failed_test_names_the_failed_check(kind, make_target):
    target = make_target(kind)

    result = run_test(target)

    target.refresh_from_db()
    assert target.last_test_ok is False
    assert target.last_test_message == result.summary
    assert "failed:" in target.last_test_message
    assert SECRET not in target.last_test_message
