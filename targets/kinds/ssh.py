"""SSH plumbing shared by the SFTP and rsync kinds.

No trust on first use: a target stores the SHA256 fingerprint of its server's host key
(and the key itself, for rsync's known_hosts), pinned by an admin from what Test showed.
Every connection is a socket with `TCP_NODELAY` (paramiko leaves Nagle on, which costs
about 30 ms per SFTP file on loopback), a handshake, a host key check, then a login
with the target's key, its password, or the service account's default keys.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .base import TargetError, TestResult

if TYPE_CHECKING:
    from targets.models import Target

log = logging.getLogger(__name__)

DEFAULT_PORT = 22
# The service account's keys tried when a target has neither a key nor a password,
# in the order OpenSSH's client tries them.
DEFAULT_KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")

_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


# -- host keys -----------------------------------------------------------------------


def fingerprint_of(blob: bytes) -> str:
    """The OpenSSH-style SHA256 fingerprint of a public key blob."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode()
    return "SHA256:" + digest.rstrip("=")


def normalise_fingerprint(value: str) -> str:
    """Accept a pasted fingerprint with or without `SHA256:` and trailing `=`."""
    value = (value or "").strip()
    if not value:
        return ""
    if not value.upper().startswith("SHA256:"):
        value = "SHA256:" + value
    return "SHA256:" + value[7:].rstrip("=")


def is_valid_fingerprint(value: str) -> bool:
    return bool(_FINGERPRINT.match(normalise_fingerprint(value)))


@dataclass(frozen=True)
class HostKey:
    key_type: str  # e.g. "ssh-ed25519"
    data: str  # base64 of the public key blob, as in known_hosts

    @classmethod
    def from_pkey(cls, key: paramiko.PKey) -> HostKey:
        return cls(key.get_name(), key.get_base64())

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(base64.b64decode(self.data))

    def details(self) -> dict[str, str]:
        """What Test puts in its check's details, for "Trust host key"."""
        return {
            "host_key_fingerprint": self.fingerprint,
            "host_key_type": self.key_type,
            "host_key": self.data,
        }

    def describe(self) -> str:
        return f"{self.fingerprint} ({self.key_type})"


def pinned_host_key(target: Target) -> HostKey | None:
    """The stored key when it matches the pinned fingerprint (else only the print is known)."""
    if target.host_key_type and target.host_key_data:
        key = HostKey(target.host_key_type, target.host_key_data)
        try:
            if key.fingerprint == normalise_fingerprint(target.host_key):
                return key
        except ValueError:
            pass
    return None


def verify_host_key(target: Target, presented: HostKey) -> None:
    """Raise a permanent `TargetError` unless `presented` is the pinned key."""
    pinned = normalise_fingerprint(target.host_key)
    where = f"{target.host}:{target.port or DEFAULT_PORT}"
    if not pinned:
        raise TargetError(
            f"the host key of {where} is not pinned; the server presents "
            f"{presented.describe()}. Run Test on this target, check the fingerprint "
            'with the server\'s administrator, then press "Trust host key" beside '
            "the Test result on the target's page to pin it.",
            permanent=True,
        )
    if pinned != presented.fingerprint:
        raise TargetError(
            f"host key mismatch: {where} presented {presented.describe()} but the "
            f"pinned key is {pinned}. If the server's key was changed on purpose, run "
            'Test and press "Trust host key" for the new key; otherwise the '
            "connection may be intercepted.",
            permanent=True,
        )


def last_presented_host_key(target: Target) -> HostKey | None:
    """The host key the target's last Test saw, from the stored test result."""
    result = target.last_test_result or {}
    for check in result.get("checks", []):
        details = check.get("details") or {}
        if details.get("host_key") and details.get("host_key_type"):
            return HostKey(details["host_key_type"], details["host_key"])
    return None


def pin_host_key(target: Target, fingerprint: str) -> HostKey:
    """Pin the host key with `fingerprint` (as shown by Test) on `target` and save it.

    The key comes from the target's last Test result; if that saw another key, the
    server is asked again, and the key it presents now must have this fingerprint, so
    an admin never pins a key they were not shown.
    """
    wanted = normalise_fingerprint(fingerprint)
    if not is_valid_fingerprint(wanted):
        raise TargetError(
            f"{fingerprint!r} is not a SHA256 host key fingerprint", permanent=True
        )
    key = last_presented_host_key(target)
    stale = bool(
        target.last_test_at
        and target.updated_at
        and target.last_test_at < target.updated_at
    )
    if key is None or key.fingerprint != wanted or stale:
        # No Test since the host or port may have been edited: ask the server.
        key = scan_host_key(target)
        if key.fingerprint != wanted:
            raise TargetError(
                f"the server now presents {key.describe()}, not {wanted}: run Test "
                "again and check the fingerprint before trusting it",
                permanent=True,
            )
    target.host_key = key.fingerprint
    target.host_key_type = key.key_type
    target.host_key_data = key.data
    if target.pk:
        target.save(
            update_fields=["host_key", "host_key_type", "host_key_data", "updated_at"]
        )
    return key


def known_hosts_line(alias: str, key: HostKey) -> str:
    return f"{alias} {key.key_type} {key.data}\n"


# -- private keys ----------------------------------------------------------------------


@dataclass
class PrivateKey:
    """A loaded private key: paramiko's object, and an unencrypted OpenSSH text of it
    for the `ssh` command (written to a 0600 temp file only while it runs)."""

    pkey: paramiko.PKey
    openssh_text: str
    source: str  # "pasted key" or the path, for messages


_PKEY_CLASSES = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def _parse_private_key(data: bytes, passphrase: str, source: str) -> PrivateKey:
    password = passphrase.encode() if passphrase else None
    crypto_key = None
    for loader in (
        serialization.load_ssh_private_key,
        serialization.load_pem_private_key,
    ):
        try:
            crypto_key = loader(data, password=password)
            break
        except TypeError:
            # Encrypted without a passphrase, or a passphrase for an unencrypted key.
            raise TargetError(
                f"the private key ({source}) is encrypted: set its passphrase"
                if not password
                else f"the private key ({source}) is not encrypted: clear the passphrase",
                permanent=True,
            ) from None
        except (ValueError, UnsupportedAlgorithm):
            continue
    if crypto_key is None:
        raise TargetError(
            f"the private key ({source}) cannot be read: wrong passphrase or not an "
            "OpenSSH/PEM private key",
            permanent=True,
        )
    text = crypto_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    for cls in _PKEY_CLASSES:
        try:
            return PrivateKey(cls.from_private_key(io.StringIO(text)), text, source)
        except paramiko.SSHException:
            continue
    raise TargetError(
        f"the private key ({source}) is of a type SSH cannot use", permanent=True
    )


def load_private_key(target: Target) -> PrivateKey | None:
    """The target's own key: pasted (stored encrypted) or a file on the server."""
    passphrase = str(target.key_passphrase or "")
    if target.private_key:
        text = str(target.private_key).strip() + "\n"
        return _parse_private_key(text.encode(), passphrase, "pasted key")
    if target.private_key_path:
        path = Path(target.private_key_path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TargetError(
                f"private key file {path} not found", permanent=True
            ) from None
        except OSError as exc:
            raise TargetError(
                f"private key file {path} cannot be read: {exc.strerror or exc}",
                permanent=True,
            ) from None
        return _parse_private_key(data, passphrase, str(path))
    return None


def default_private_keys() -> list[paramiko.PKey]:
    """The service account's unencrypted default keys (~/.ssh/id_*)."""
    keys = []
    for name in DEFAULT_KEY_NAMES:
        path = Path.home() / ".ssh" / name
        if not path.exists():
            continue
        try:
            keys.append(paramiko.PKey.from_path(path))
        except (paramiko.SSHException, OSError, ValueError) as exc:
            log.info("default key %s not usable: %s", path, type(exc).__name__)
    return keys


# -- connecting --------------------------------------------------------------------------


def connect_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection with Nagle off; connection problems as transient TargetErrors."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        sock = socket.create_connection((bare, port), timeout=timeout)
    except TimeoutError:
        raise TargetError(
            f"cannot connect to {host}:{port}: no answer within {timeout:g} s"
        ) from None
    except ConnectionRefusedError:
        raise TargetError(
            f"cannot connect to {host}:{port}: connection refused "
            "(is the SSH server running on that port?)"
        ) from None
    except socket.gaierror as exc:
        raise TargetError(f"cannot resolve host name {host}: {exc.strerror}") from None
    except OSError as exc:
        raise TargetError(
            f"cannot connect to {host}:{port}: {exc.strerror or exc}"
        ) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# Host key algorithms that produce a key of each type (RSA keys sign with SHA-2).
_ALGORITHMS_FOR_TYPE = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


def _start_transport(
    sock: socket.socket, timeout: float, where: str, prefer_type: str = ""
) -> paramiko.Transport:
    transport = paramiko.Transport(sock)
    if prefer_type:
        # A server with several host keys shows the one of the pinned type first,
        # as OpenSSH does for a key in known_hosts.
        options = transport.get_security_options()
        wanted = _ALGORITHMS_FOR_TYPE.get(prefer_type, (prefer_type,))
        first = [a for a in options.key_types if a in wanted]
        options.key_types = first + [a for a in options.key_types if a not in wanted]
    transport.banner_timeout = timeout
    transport.handshake_timeout = timeout
    transport.auth_timeout = timeout
    try:
        transport.start_client(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        transport.close()
        raise TargetError(
            f"SSH handshake with {where} failed: {exc or type(exc).__name__}"
            " (is it an SSH server?)"
        ) from None
    return transport


def scan_host_key(target: Target) -> HostKey:
    """Connect and handshake only, and return the host key the server presents."""
    port = target.port or DEFAULT_PORT
    sock = connect_socket(target.host, port, target.connect_timeout)
    transport = _start_transport(
        sock, target.connect_timeout, f"{target.host}:{port}", target.host_key_type
    )
    try:
        return HostKey.from_pkey(transport.get_remote_server_key())
    finally:
        transport.close()


class SshSession:
    """One SSH connection to a target: connect, verify the pinned key, log in.

    Use as a context manager; `sftp()` opens an SFTP client on it and `run()` runs a
    command. Each step can also be run on its own (for Test's separate checks).
    """

    def __init__(self, target: Target):
        self.target = target
        self.port = target.port or DEFAULT_PORT
        self.where = f"{target.host}:{self.port}"
        self.timeout = target.connect_timeout
        self.sock: socket.socket | None = None
        self.transport: paramiko.Transport | None = None
        self.host_key: HostKey | None = None
        self.auth_method = ""
        self._sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> SshSession:
        try:
            self.connect()
            self.handshake()
            verify_host_key(self.target, self.host_key)
            self.login()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        self.sock = connect_socket(self.target.host, self.port, self.timeout)

    def handshake(self) -> HostKey:
        pinned = pinned_host_key(self.target)
        self.transport = _start_transport(
            self.sock, self.timeout, self.where, pinned.key_type if pinned else ""
        )
        self.host_key = HostKey.from_pkey(self.transport.get_remote_server_key())
        return self.host_key

    def login(self) -> str:
        """Log in with the target's key, else its password, else the default keys."""
        target = self.target
        user = target.username
        tried: list[str] = []
        key = load_private_key(target)
        if key is not None:
            tried.append(key.source)
            if self._try(lambda: self.transport.auth_publickey(user, key.pkey)):
                self.auth_method = f"key ({key.source})"
                return self.auth_method
        if target.password:
            tried.append("password")
            if self._try(
                lambda: self.transport.auth_password(user, str(target.password))
            ):
                self.auth_method = "password"
                return self.auth_method
        if key is None and not target.password:
            defaults = default_private_keys()
            tried.append(
                f"{len(defaults)} default key(s) of the service account"
                if defaults
                else "no key: the service account has none"
            )
            for pkey in defaults:
                if self._try(lambda k=pkey: self.transport.auth_publickey(user, k)):
                    self.auth_method = "the service account's default key"
                    return self.auth_method
        allowed = self._allowed_methods()
        raise TargetError(
            f"authentication failed for user {user!r} on {self.where} "
            f"(tried: {', '.join(tried)}"
            + (f"; the server accepts: {', '.join(allowed)}" if allowed else "")
            + ")",
            permanent=True,
        )

    def _try(self, attempt) -> bool:
        try:
            attempt()
        except paramiko.BadAuthenticationType as exc:
            self._allowed = list(exc.allowed_types)
            return False
        except paramiko.AuthenticationException:
            return False
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TargetError(
                f"connection to {self.where} lost while logging in: "
                f"{exc or type(exc).__name__}"
            ) from None
        return self.transport.is_authenticated()

    def _allowed_methods(self) -> list[str]:
        return getattr(self, "_allowed", [])

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = paramiko.SFTPClient.from_transport(self.transport)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                raise TargetError(
                    f"the server {self.where} refused SFTP: "
                    f"{exc or type(exc).__name__}",
                    permanent=True,
                ) from None
        return self._sftp

    def run(self, command: str, timeout: float) -> tuple[int, str]:
        """Run a POSIX shell command; return its exit code and combined output."""
        channel = self.transport.open_session(timeout=self.timeout)
        try:
            channel.settimeout(timeout)
            channel.set_combine_stderr(True)
            # The login shell may not be POSIX (tcsh, fish): hand the text to sh.
            channel.exec_command("sh -c " + shlex.quote(command))
            chunks = []
            while True:
                data = channel.recv(65536)
                if not data:
                    break
                chunks.append(data)
            rc = channel.recv_exit_status()
        except TimeoutError:
            raise TargetError(
                f"the command on {self.where} did not finish within {timeout:g} s"
            ) from None
        finally:
            channel.close()
        return rc, b"".join(chunks).decode(errors="replace")

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def login_checks(result: TestResult, session: SshSession) -> bool:
    """Run Test's shared checks (TCP, handshake and host key, login) on `session`.

    Return True when every one passed and the session is logged in.
    """
    target = session.target
    with result.check("TCP connect") as check:
        session.connect()
        check.message = f"connected to {session.where}"
    if result.stopped:
        return False
    with result.check("SSH handshake and host key") as check:
        key = session.handshake()
        check.details = key.details()
        verify_host_key(target, key)
        check.message = f"host key {key.describe()} matches the pinned key"
    if result.stopped:
        return False
    with result.check("login") as check:
        method = session.login()
        check.message = f"logged in as {target.username} with {method}"
    return not result.stopped
