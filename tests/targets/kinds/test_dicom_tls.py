"""DICOM+TLS targets against dcmtk `storescp +tls` with certificates from the fixture."""

from __future__ import annotations

import json

import pydicom
import pytest
from django.core.exceptions import ValidationError

from targets.kinds.base import SENT, TargetError
from targets.models import DicomTlsTarget
from targets.series import scan_folder
from tests.dicomgen import make_series
from tests.fixtures.web_peers import TlsPeers


def tls_target(peers: TlsPeers, peer: str = "good", **kwargs) -> DicomTlsTarget:
    pki = peers.pki
    values = {
        "name": "tls",
        "host": "127.0.0.1",
        "port": getattr(peers, peer).port,
        "called_aet": "TLSSCP",
        "tls_ca_cert": pki["ca.pem"],
        "tls_client_cert": pki["client.pem"],
        "tls_client_key": pki["client.key"],
    }
    values.update(kwargs)
    return DicomTlsTarget(**values)


def checks_of(result) -> dict:
    return {c.name: c for c in result.checks}


def test_mutual_tls_sends_every_instance(tls_peers, tmp_path):
    gen = make_series(tmp_path / "s", 5)
    seen = []

    result = tls_target(tls_peers).handler.send(
        scan_folder(gen.folder), progress=seen.append
    )

    assert result.sent == 5 and [o.status for o in seen] == [SENT] * 5
    arrived = {pydicom.dcmread(f).SOPInstanceUID for f in tls_peers.good.files()}
    assert set(gen.sop_uids) <= arrived


def test_the_test_shows_the_handshake_the_certificate_and_a_c_echo(tls_peers):
    result = tls_target(tls_peers).handler.test()

    assert result.ok, result.summary
    checks = checks_of(result)
    # Both ends use this machine's OpenSSL 3, so they agree on TLS 1.3.
    assert checks["TLS handshake"].message.startswith("TLSv1.3 ")
    assert checks["TLS handshake"].message.endswith(", client certificate accepted")
    cert = checks["Server certificate"]
    assert cert.ok and "commonName=tls-scp" in cert.message
    assert cert.details["expires"]
    assert checks["C-ECHO"].ok
    names = [c.name for c in result.checks]
    assert (
        names.index("TCP connect")
        < names.index("TLS handshake")
        < names.index("Association")
    )


def test_a_certificate_expiring_within_30_days_is_a_warning_not_a_failure(tls_peers):
    result = tls_target(tls_peers, "soon").handler.test()

    assert result.ok, result.summary
    cert = checks_of(result)["Server certificate"]
    assert not cert.ok and cert.informational
    assert "expires in" in cert.message and "warning" in cert.message


@pytest.mark.parametrize(
    ("peer", "settings", "words"),
    [
        ("good", {"tls_ca_cert": "other-ca.pem"}, "unknown CA"),
        ("expired", {}, "certificate has expired"),
        ("elsewhere", {}, "host name mismatch"),
        (
            "good",
            {"tls_client_cert": "", "tls_client_key": ""},
            "client certificate refused",
        ),
        (
            "good",
            {
                "tls_client_cert": "other-client.pem",
                "tls_client_key": "other-client.key",
            },
            "client certificate refused",
        ),
    ],
    ids=["wrong-ca", "expired", "hostname", "no-client-cert", "untrusted-client-cert"],
)
def test_tls_failures_are_reported_in_words_by_test_and_send(
    tls_peers, tmp_path, peer, settings, words
):
    files = {k: tls_peers.pki[v] if v else "" for k, v in settings.items()}
    target = tls_target(tls_peers, peer, **files)

    result = target.handler.test()
    assert not result.ok
    handshake = checks_of(result)["TLS handshake"]
    assert not handshake.ok and words in handshake.message
    assert "Association" not in checks_of(result)

    gen = make_series(tmp_path / "s", 1)
    with pytest.raises(TargetError) as exc:
        target.handler.send(scan_folder(gen.folder))
    assert words in str(exc.value)


def test_host_name_checking_can_be_switched_off(tls_peers, tmp_path):
    target = tls_target(tls_peers, "elsewhere", tls_verify_hostname=False)
    gen = make_series(tmp_path / "s", 2)
    assert target.handler.send(scan_folder(gen.folder)).sent == 2


def test_an_encrypted_client_key_works_with_its_passphrase(tls_peers, tmp_path):
    target = tls_target(
        tls_peers,
        tls_client_key=tls_peers.pki["client-encrypted.key"],
        key_passphrase="open sesame",
    )
    target.clean()
    assert target.handler.test().ok


def test_plain_dicom_to_a_tls_port_is_not_mistaken_for_success(tls_peers):
    # The TLS target pointed at a plain storescp: the handshake fails in words.
    result = tls_target(tls_peers, "plain").handler.test()
    handshake = checks_of(result)["TLS handshake"]
    assert not handshake.ok
    # storescp reads the ClientHello as a malformed PDU and drops the connection.
    assert handshake.message == (
        "the server closed the connection during the TLS handshake "
        "— does it speak TLS on this port?"
    )


@pytest.mark.parametrize(
    ("settings", "field", "words"),
    [
        ({"tls_ca_cert": "/nonexistent/ca.pem"}, "tls_ca_cert", "does not exist"),
        ({"tls_ca_cert": "NOTPEM"}, "tls_ca_cert", "no PEM certificate"),
        (
            {"tls_client_cert": "/nonexistent/c.pem"},
            "tls_client_cert",
            "does not exist",
        ),
        ({"tls_client_key": ""}, "tls_client_cert", "both"),
        ({"tls_client_key": "UNREADABLE"}, "tls_client_key", "not readable"),
        ({"tls_client_key": "other-client.key"}, "tls_client_key", "does not belong"),
        ({"tls_client_key": "client-encrypted.key"}, "key_passphrase", "passphrase"),
        (
            {"tls_client_key": "client-encrypted.key", "key_passphrase": "wrong"},
            "key_passphrase",
            "passphrase",
        ),
    ],
)
def test_unusable_tls_files_are_form_errors(
    tls_peers, tmp_path, settings, field, words
):
    notpem = tmp_path / "notpem.pem"
    notpem.write_text("hello\n")
    unreadable = tmp_path / "unreadable.key"
    unreadable.mkdir()  # a folder cannot be opened as a file
    special = {"NOTPEM": str(notpem), "UNREADABLE": str(unreadable)}
    values = {}
    for key, value in settings.items():
        if value in special:
            values[key] = special[value]
        elif key != "key_passphrase" and value and not value.startswith("/"):
            values[key] = tls_peers.pki[value]
        else:
            values[key] = value
    target = tls_target(tls_peers, **values)

    with pytest.raises(ValidationError) as exc:
        target.clean()

    message = " ".join(exc.value.message_dict[field])
    assert words in message
    assert "wrong" not in json.dumps(exc.value.message_dict)


def test_good_tls_files_pass_validation(tls_peers):
    tls_target(tls_peers).clean()
