"""One contract for every target kind: proxy, admin, handler, and a `test()` that
reports an unreachable target as a failed check in words instead of raising."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.urls import reverse

from targets.kinds.base import Handler, TestResult
from targets.models import HANDLERS, PROXIES, Kind, Target, get_handler_class
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


def test_every_kind_has_a_proxy_a_handler_and_a_contract_entry():
    assert (
        set(PROXIES)
        == set(HANDLERS)
        == set(UNREACHABLE)
        == set(FIRST_FAILURE)
        == set(KINDS)
    )


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
def test_the_handler_class_is_importable(kind):
    handler_class = get_handler_class(kind)
    assert issubclass(handler_class, Handler)
    assert handler_class.test is not Handler.test
    assert handler_class.send is not Handler.send


@pytest.mark.parametrize("kind", KINDS)
def test_testing_an_unreachable_target_fails_a_check_in_words(
    kind, make_target, closed_port
):
    target = make_target(kind)

    result = target.handler.test()

    assert isinstance(result, TestResult)
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
