"""The SSH seam, shared by the SFTP and rsync kinds.

No trust on first use: a target stores the SHA256 fingerprint of its server's host key
(and the key itself, for rsync's known_hosts), pinned by an admin from what Test showed.
A connection is paramiko's `SSHClient` on a socket with `TCP_NODELAY` (paramiko
leaves Nagle on, which costs about 30 ms per SFTP file on loopback): the client does
the handshake, `PinnedKey` (its host-key policy) records the key the server presents
and refuses any but the pinned one, and `Login` (its auth strategy) tries the
target's key, its password, or the service account's default keys. This module
imports no model: it reads a target's attributes (and `pin_host_key` saves them).
"""

# Why this module is long: host-key pinning, private keys, the client with its
# policy and auth strategy, and the settings rules are the one SSH seam of SFTP
# and rsync; they share the messages an admin acts on.

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from paramiko.auth_strategy import (
    AuthFailure,
    AuthSource,
    AuthStrategy,
    InMemoryPrivateKey,
    Password,
)

from targets.kinds.base import CheckReport, TargetError

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


class PinnedKey(paramiko.MissingHostKeyPolicy):
    """`SSHClient`'s host-key policy: record the key the server presents; accept
    only the pinned one (`verify=False`: record only, for a scan)."""

    def __init__(self, target: Target, *, verify: bool = True):
        self.target = target
        self.verify = verify
        self.presented: HostKey | None = None

    def missing_host_key(self, client, hostname, key) -> None:
        self.presented = HostKey.from_pkey(key)
        if self.verify:
            verify_host_key(self.target, self.presented)


class KeyUnusable(Exception):
    """The target's private key cannot be used; `error` says why."""

    def __init__(self, error: TargetError):
        super().__init__(error.message)
        self.error = error


class Login(AuthStrategy):
    """`SSHClient`'s auth strategy: the target's key, else its password, else the
    service account's default keys; `described` names what worked."""

    def __init__(self, target: Target):
        super().__init__(ssh_config=paramiko.SSHConfig())
        self.target = target
        self.labels: dict[int, str] = {}
        self.tried: list[str] = []
        self.described = ""

    def get_sources(self) -> Iterator[AuthSource]:
        user, target = self.target.username, self.target
        try:
            key = load_private_key(target)
        except TargetError as exc:
            raise KeyUnusable(exc) from None
        if key is not None:
            yield self._source(
                InMemoryPrivateKey(user, key.pkey), f"key ({key.source})"
            )
        if target.password:
            password = str(target.password)
            yield self._source(Password(user, lambda: password), "password")
        if key is None and not target.password:
            defaults = default_private_keys()
            self.tried.append(
                f"{len(defaults)} default key(s) of the service account"
                if defaults
                else "no key: the service account has none"
            )
            for pkey in defaults:
                yield self._source(
                    InMemoryPrivateKey(user, pkey),
                    "the service account's default key",
                    tried=False,
                )

    def _source(self, source: AuthSource, label: str, tried: bool = True):
        self.labels[id(source)] = label
        if tried:
            self.tried.append(label.removeprefix("key (").removesuffix(")"))
        return source

    def authenticate(self, transport: paramiko.Transport):
        result = super().authenticate(transport)
        if not transport.is_authenticated():
            # A partial success (a second factor wanted) is no login here.
            raise AuthFailure(result=result)
        self.described = self.labels.get(id(result[-1].source), "")
        return result


class _NoLogin(AuthStrategy):
    """Handshake and host key only (a scan)."""

    def __init__(self):
        super().__init__(ssh_config=paramiko.SSHConfig())

    def authenticate(self, transport):
        return None


def _client(target: Target, policy: PinnedKey) -> paramiko.SSHClient:
    """An `SSHClient` that knows only the pinned key (so paramiko asks the server
    for a key of that type first, as OpenSSH does for a key in known_hosts)."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(policy)
    pinned = pinned_host_key(target)
    if pinned is not None:
        port = target.port or DEFAULT_PORT
        name = target.host if port == DEFAULT_PORT else f"[{target.host}]:{port}"
        try:
            key = paramiko.PKey.from_type_string(
                pinned.key_type, base64.b64decode(pinned.data)
            )
        except (paramiko.SSHException, ValueError):
            pass  # unusable stored key: the policy checks the fingerprint alone
        else:
            client.get_host_keys().add(name, pinned.key_type, key)
    return client


def _handshake(
    client: paramiko.SSHClient,
    target: Target,
    sock: socket.socket,
    policy: PinnedKey,
    auth: AuthStrategy,
    where: str,
) -> None:
    """Run `client.connect()`: handshake, host key, then `auth`. A refused host key
    or a failed handshake is a `TargetError` (a failed login: `AuthFailure`)."""
    timeout = target.connect_timeout
    try:
        client.connect(
            target.host,
            port=target.port or DEFAULT_PORT,
            username=target.username,
            sock=sock,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            auth_strategy=auth,
        )
    except paramiko.BadHostKeyException as exc:
        # The stored key differs from the presented one: say so as for a print.
        policy.presented = HostKey.from_pkey(exc.key)
        verify_host_key(target, policy.presented)
        raise TargetError(f"host key mismatch: {where}", permanent=True) from None
    except (AuthFailure, KeyUnusable, TargetError):
        raise
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise TargetError(
            f"SSH handshake with {where} failed: {exc or type(exc).__name__}"
            " (is it an SSH server?)"
        ) from None


def scan_host_key(target: Target) -> HostKey:
    """Connect and handshake only, and return the host key the server presents."""
    port = target.port or DEFAULT_PORT
    where = f"{target.host}:{port}"
    sock = connect_socket(target.host, port, target.connect_timeout)
    policy = PinnedKey(target, verify=False)
    client = _client(target, policy)
    try:
        try:
            _handshake(client, target, sock, policy, _NoLogin(), where)
        except TargetError:
            if policy.presented is None:
                raise
        return policy.presented or HostKey.from_pkey(
            client.get_transport().get_remote_server_key()
        )
    finally:
        client.close()
        sock.close()


class SshSession:
    """One SSH connection to a target: connect, verify the pinned key, log in.

    Use as a context manager; `sftp()` opens an SFTP client on it and `run()` runs a
    command. `connect()` and `handshake()` can also be run on their own (for Test's
    separate checks).
    """

    def __init__(self, target: Target):
        self.target = target
        self.port = target.port or DEFAULT_PORT
        self.where = f"{target.host}:{self.port}"
        self.timeout = target.connect_timeout
        self.sock: socket.socket | None = None
        self.client: paramiko.SSHClient | None = None
        self.host_key: HostKey | None = None
        self.auth_method = ""
        # Whether `handshake()` failed at the login, after the host key passed.
        self.login_failed = False
        self._sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> SshSession:
        try:
            self.connect()
            self.handshake()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def transport(self) -> paramiko.Transport | None:
        return self.client.get_transport() if self.client is not None else None

    def connect(self) -> None:
        self.sock = connect_socket(self.target.host, self.port, self.timeout)

    def handshake(self) -> None:
        """Handshake, check the host key (`self.host_key` is what the server
        presented, even when refused), and log in; raise `TargetError`."""
        policy = PinnedKey(self.target)
        login = Login(self.target)
        self.client = _client(self.target, policy)
        try:
            _handshake(self.client, self.target, self.sock, policy, login, self.where)
        except AuthFailure as exc:
            self.login_failed = True
            raise self._login_error(login, exc) from None
        except KeyUnusable as exc:
            self.login_failed = True
            raise exc.error from None
        finally:
            if self.host_key is None:
                self.host_key = policy.presented or self._presented()
        self.auth_method = login.described

    def _presented(self) -> HostKey | None:
        transport = self.transport
        if transport is None or not transport.is_active():
            return None
        try:
            return HostKey.from_pkey(transport.get_remote_server_key())
        except paramiko.SSHException:
            return None

    def _login_error(self, login: Login, failure: AuthFailure) -> TargetError:
        allowed: list[str] = []
        for attempt in failure.result:
            error = attempt.result
            if isinstance(error, paramiko.BadAuthenticationType):
                allowed = list(error.allowed_types)
            elif isinstance(error, (EOFError, OSError)) or (
                isinstance(error, paramiko.SSHException)
                and not isinstance(error, paramiko.AuthenticationException)
            ):
                return TargetError(
                    f"connection to {self.where} lost while logging in: "
                    f"{error or type(error).__name__}"
                )
        return TargetError(
            f"authentication failed for user {self.target.username!r} on "
            f"{self.where} (tried: {', '.join(login.tried)}"
            + (f"; the server accepts: {', '.join(allowed)}" if allowed else "")
            + ")",
            permanent=True,
        )

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
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
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def login_checks(result: CheckReport, session: SshSession) -> bool:
    """Run Test's shared checks (TCP, handshake and host key, login) on `session`.

    Return True when every one passed and the session is logged in.
    """
    target = session.target
    with result.check("TCP connect") as check:
        session.connect()
        check.message = f"connected to {session.where}"
    if result.stopped:
        return False
    failure: TargetError | None = None
    try:
        session.handshake()
    except TargetError as exc:
        failure = exc
    with result.check("SSH handshake and host key") as check:
        key = session.host_key
        if key is not None:
            check.details = key.details()
        if failure is not None and not session.login_failed:
            raise failure
        check.message = f"host key {key.describe()} matches the pinned key"
    if result.stopped:
        return False
    with result.check("login") as check:
        if failure is not None:
            raise failure
        check.message = f"logged in as {target.username} with {session.auth_method}"
    return not result.stopped


# -- settings validation (SFTP, rsync) -----------------------------------------------


def settings_errors(target: Target) -> dict[str, str]:
    """The SSH kinds' shared rules: a form error by field (empty when all hold).

    Fills in the default port and normalises a pasted fingerprint on the way.
    """
    errors: dict[str, str] = {}
    if not target.port:
        target.port = DEFAULT_PORT
    if target.host_key:
        target.host_key = normalise_fingerprint(target.host_key)
        if not is_valid_fingerprint(target.host_key):
            errors["host_key"] = (
                "Enter a SHA256 fingerprint as ssh-keygen -l shows it "
                "(SHA256:...), or leave it empty and pin the key from a Test."
            )
    if target.private_key_path and not target.private_key_path.startswith("/"):
        errors["private_key_path"] = "Enter an absolute path (starting with /)."
    if target.private_key and target.private_key_path:
        errors["private_key_path"] = "Give either a key file or a pasted key, not both."
    if target.path and any(c in target.path for c in "\n\r\0"):
        errors["path"] = "The folder cannot contain line breaks."
    if target.private_key or target.private_key_path:
        try:
            load_private_key(target)
        except TargetError as exc:
            field = "private_key" if target.private_key else "private_key_path"
            errors.setdefault(field, exc.message)
    return errors
