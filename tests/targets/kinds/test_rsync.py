"""rsync targets: the system rsync over ssh to a real OpenSSH sshd on loopback."""

from __future__ import annotations

import logging
import stat
import uuid
from pathlib import Path

import pytest

from targets.kinds.base import PRESENT, SENT, TargetError
from targets.models import RsyncTarget
from targets.series import scan_folder
from targets.ssh import pin_host_key
from tests.dicomgen import make_series
from tests.fixtures.ssh_s3_peers import Sshd, chown_to

pytestmark = pytest.mark.django_db

# Writes its arguments and working folder where the test can read them.
SCRIPT = """#!/bin/sh
printf '%s\\n' "$PWD" "$@" > "$HOME/complete-args-$2.txt"
echo "completion script ran"
"""


@pytest.fixture
def generated(tmp_path):
    return make_series(tmp_path / "src", 5)


@pytest.fixture
def make_target(sshd):
    def make(**fields) -> RsyncTarget:
        values = {
            "name": f"rsync-{uuid.uuid4().hex[:8]}",
            "host": "127.0.0.1",
            "port": sshd.port,
            "username": sshd.key_user,
            "private_key_path": str(sshd.client_key),
            "path": f"incoming-{uuid.uuid4().hex[:8]}",
        }
        values.update(fields)
        pin = values.pop("pin", True)
        target = RsyncTarget.objects.create(**values)
        if pin:
            pin_host_key(target, sshd.host_key_fingerprint)
        return target

    return make


def named(result, name: str):
    return next(c for c in result.checks if c.name == name)


def target_folder(sshd: Sshd, user: str, target: RsyncTarget) -> Path:
    return sshd.home(user) / target.path


def install_script(
    sshd: Sshd, target: RsyncTarget, text: str = SCRIPT, mode: int = 0o755
) -> Path:
    folder = target_folder(sshd, target.username, target)
    folder.mkdir(exist_ok=True)
    chown_to(folder, target.username)
    script = folder / target.complete_script
    script.write_text(text)
    script.chmod(mode)
    chown_to(script, target.username)
    return script


def test_it_sends_the_series_into_the_layout_with_sane_modes(
    sshd, make_target, generated
):
    target = make_target()
    seen = []
    result = target.handler.send(scan_folder(generated.folder), progress=seen.append)

    assert [o.status for o in result.outcomes] == [SENT] * 5
    assert len(seen) == 5
    study = target_folder(sshd, sshd.key_user, target) / generated.study_uid
    folder = study / generated.series_uid
    for path, uid in zip(generated.files, generated.sop_uids, strict=True):
        sent = folder / f"{uid}.dcm"
        assert sent.read_bytes() == path.read_bytes()
        assert stat.S_IMODE(sent.stat().st_mode) == 0o644
        assert sent.stat().st_uid == sshd.home(sshd.key_user).stat().st_uid
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE(study.stat().st_mode) == 0o755


def test_a_second_send_reports_the_files_as_already_present(make_target, generated):
    target = make_target()
    target.handler.send(scan_folder(generated.folder))
    again = target.handler.send(scan_folder(generated.folder))
    assert [o.status for o in again.outcomes] == [PRESENT] * 5


def test_a_pasted_key_with_a_passphrase_works(sshd, make_target, generated, tmp_path):
    import subprocess

    key = tmp_path / "protected"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass phrase", "-f", str(key)],
        check=True,
    )
    # The user belongs to this session's sshd peer alone, so no other run
    # rewrites the file between this read and the restore below.
    auth = sshd.home(sshd.key_user) / ".ssh" / "authorized_keys"
    original = auth.read_text()
    auth.write_text(original + key.with_suffix(".pub").read_text())
    try:
        target = make_target(
            private_key_path="",
            private_key=key.read_text(),
            key_passphrase="pass phrase",
        )
        assert target.handler.send(scan_folder(generated.folder)).sent == 5
    finally:
        auth.write_text(original)


def test_password_login_goes_through_sshpass(sshd, make_target, generated):
    target = make_target(
        username=sshd.password_user, private_key_path="", password=sshd.password
    )
    result = target.handler.send(scan_folder(generated.folder))
    assert result.sent == 5
    folder = target_folder(sshd, sshd.password_user, target)
    assert len(list(folder.rglob("*.dcm"))) == 5


def test_a_wrong_password_fails_with_authentication_failed_and_no_secret(
    sshd, make_target, generated, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = "wrong-" + uuid.uuid4().hex
    target = make_target(
        username=sshd.password_user, private_key_path="", password=secret
    )

    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))
    result = target.handler.test()

    assert raised.value.permanent
    assert "authentication failed" in raised.value.message
    assert "authentication failed" in named(result, "login").message
    for text in (raised.value.message, str(result.as_dict()), caplog.text):
        assert secret not in text


def test_the_exclusion_filter_skips_matching_files(sshd, make_target, generated):
    target = make_target(exclude="*00002.dcm")
    assert target.handler.send(scan_folder(generated.folder)).sent == 4
    assert len(list(target_folder(sshd, sshd.key_user, target).rglob("*.dcm"))) == 4


def test_the_completion_script_gets_the_destination_folder_and_target_name(
    sshd, make_target, generated
):
    target = make_target(
        name=f"CT archive {uuid.uuid4().hex[:6]}", run_on_complete=True
    )
    install_script(sshd, target)

    target.handler.send(scan_folder(generated.folder))

    folder = target_folder(sshd, sshd.key_user, target)
    args_file = sshd.home(sshd.key_user) / f"complete-args-{target.name}.txt"
    cwd, destination, name = args_file.read_text().splitlines()
    assert Path(cwd) == folder
    assert Path(destination) == folder / generated.study_uid / generated.series_uid
    assert name == target.name


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        (None, 0, "does not exist"),
        (SCRIPT, 0o644, "not executable"),
        (
            "#!/bin/sh\necho 'archive is full' >&2\nexit 3\n",
            0o755,
            "exited with 3 (mercure_complete.sh in",
        ),
    ],
    ids=["missing", "not-executable", "non-zero-exit"],
)
def test_a_failing_completion_script_fails_the_send_with_its_output(
    sshd, make_target, generated, text, mode, expected
):
    target = make_target(run_on_complete=True)
    if text is None:
        folder = target_folder(sshd, sshd.key_user, target)
        folder.mkdir()
        chown_to(folder, sshd.key_user)
    else:
        install_script(sshd, target, text, mode)

    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))

    assert expected in raised.value.message
    if text and "exit 3" in text:
        assert "archive is full" in raised.value.message


def test_test_checks_login_rsync_folder_and_script(sshd, make_target):
    target = make_target(run_on_complete=True)
    install_script(sshd, target)

    result = target.handler.test()

    assert result.ok, result.as_dict()
    assert [c.name for c in result.checks] == [
        "rsync and ssh on Courier's server",
        "TCP connect",
        "SSH handshake and host key",
        "login",
        "rsync on the server",
        "folder exists and is writable",
        "completion script",
    ]
    handshake = named(result, "SSH handshake and host key")
    assert handshake.details["host_key_fingerprint"] == sshd.host_key_fingerprint


def test_test_fails_when_the_switch_is_on_and_the_script_is_missing(sshd, make_target):
    target = make_target(run_on_complete=True)
    folder = target_folder(sshd, sshd.key_user, target)
    folder.mkdir()
    chown_to(folder, sshd.key_user)

    result = target.handler.test()

    assert not result.ok
    assert result.checks[-1].name == "completion script"
    assert "no such file" in result.checks[-1].message


def test_an_unpinned_host_key_refuses_the_send(sshd, make_target, generated):
    target = make_target(pin=False)
    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))
    assert raised.value.permanent
    assert "not pinned" in raised.value.message
    assert sshd.host_key_fingerprint in raised.value.message


def test_a_changed_host_key_fails_the_send_permanently_saying_so(tmp_path, generated):
    server = Sshd(tmp_path / "sshd")
    with server:
        target = RsyncTarget.objects.create(
            name="rekeyed",
            host="127.0.0.1",
            port=server.port,
            username=server.key_user,
            private_key_path=str(server.client_key),
            path="incoming-rekeyed",
        )
        pinned = pin_host_key(target, server.host_key_fingerprint).fingerprint
        assert target.handler.send(scan_folder(generated.folder)).sent == 5
        server.rekey()

        with pytest.raises(TargetError) as raised:
            target.handler.send(scan_folder(generated.folder))

    assert raised.value.permanent
    assert "host key mismatch" in raised.value.message
    assert pinned in raised.value.message
    assert server.host_key_fingerprint in raised.value.message


def test_a_fingerprint_typed_in_by_hand_is_enough_to_send(sshd, make_target, generated):
    target = make_target(pin=False, host_key=sshd.host_key_fingerprint)
    assert target.handler.send(scan_folder(generated.folder)).sent == 5


def test_test_on_a_closed_port_returns_a_failed_check(make_target):
    from tests.peers import free_port

    result = make_target(port=free_port(), pin=False).handler.test()
    assert not result.ok
    assert "connection refused" in named(result, "TCP connect").message


def test_a_pinned_rsa_key_is_used_when_the_server_also_has_an_ed25519_key(
    tmp_path, generated
):
    from targets.models import SftpTarget
    from targets.ssh import HostKey

    server = Sshd(tmp_path / "sshd", rsa_host_key=True)
    rsa = HostKey(*server.rsa_host_key_path.with_suffix(".pub").read_text().split()[:2])
    with server:
        for cls in (RsyncTarget, SftpTarget):
            target = cls.objects.create(
                name=f"rsa {cls.KIND}", host="127.0.0.1", port=server.port,
                username=server.key_user, private_key_path=str(server.client_key),
                path=f"incoming-rsa-{cls.KIND}", host_key=rsa.fingerprint,
                host_key_type=rsa.key_type, host_key_data=rsa.data,
            )  # fmt: skip
            assert target.handler.send(scan_folder(generated.folder)).sent == 5
            result = target.handler.test()
            handshake = named(result, "SSH handshake and host key")
            assert handshake.ok, result.as_dict()
            assert handshake.details["host_key_type"] == "ssh-rsa"


def test_a_folder_the_user_cannot_write_fails_permanently_in_words(
    make_target, generated
):
    target = make_target(path="/courier-not-allowed-here")
    with pytest.raises(TargetError) as raised:
        target.handler.send(scan_folder(generated.folder))
    assert raised.value.permanent
    assert raised.value.message.startswith("permission denied writing to")
