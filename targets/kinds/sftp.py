"""SFTP targets (paramiko): one file per instance under `<folder>/<layout>/`.

Each file is written under a hidden temporary name and renamed into place
(`posix-rename@openssh.com`, atomic on the server), so a consumer never sees half a
file; a `.complete` marker follows when a series folder is whole. A retry skips files
already there with the right size, so it finishes a partial upload instead of
starting again.
"""

from __future__ import annotations

import errno
import logging
import posixpath
import stat
import uuid
from collections.abc import Callable
from io import BytesIO

import paramiko

from targets.models import DEFAULT_LAYOUT
from targets.series import Instance, LayoutError, Series, render_layout
from targets.validators import split_globs

from .base import (
    FAILED,
    PRESENT,
    SENT,
    Handler,
    Outcome,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    TestResult,
    instance_outcome,
)
from .folder import COMPLETE_MARKER, instance_file_name
from .ssh import SshSession, login_checks

log = logging.getLogger(__name__)

TMP_PREFIX = ".courier-part-"
_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, ConnectionError, TimeoutError)


def _describe(exc: OSError, doing: str) -> str:
    if exc.errno == errno.EACCES:
        return f"permission denied while {doing}"
    if exc.errno == errno.ENOENT:
        return f"no such file or folder while {doing}"
    reason = exc.strerror or (exc.args[-1] if exc.args else "") or type(exc).__name__
    return f"{reason} while {doing}"


def _alive(sftp: paramiko.SFTPClient) -> bool:
    transport = sftp.get_channel().get_transport()
    return transport is not None and transport.is_active()


class SftpHandler(Handler):
    # -- send -------------------------------------------------------------------------
    def send(
        self,
        series: Series,
        *,
        progress: ProgressCallback | None = None,
        context: SendContext | None = None,
    ) -> SendResult:
        result = SendResult()

        def report(outcome: Outcome) -> None:
            result.outcomes.append(outcome)
            if progress:
                progress(outcome)

        series = series.excluding(split_globs(self.target.exclude))
        layout = self.target.layout or DEFAULT_LAYOUT
        groups: dict[str, list[Instance]] = {}
        for inst in series.instances:
            try:
                rel = render_layout(layout, inst.tags)
            except LayoutError as exc:
                report(instance_outcome(inst, FAILED, str(exc)))
                continue
            groups.setdefault(rel, []).append(inst)
        if not groups:
            return result

        with SshSession(self.target) as session:
            sftp = session.sftp()
            made: set[str] = set()
            for rel, instances in groups.items():
                folder = (
                    posixpath.join(self.target.path, rel) if rel else self.target.path
                )
                try:
                    self._send_group(sftp, folder, instances, made, report)
                except _CONNECTION_ERRORS as exc:
                    raise TargetError(
                        f"connection to {session.where} lost during the upload: "
                        f"{exc or type(exc).__name__}"
                    ) from None
        return result

    def _send_group(
        self,
        sftp: paramiko.SFTPClient,
        folder: str,
        instances: list[Instance],
        made: set[str],
        report: Callable[[Outcome], None],
    ) -> None:
        try:
            _makedirs(sftp, folder, made)
            existing = {a.filename: a.st_size for a in sftp.listdir_attr(folder)}
        except OSError as exc:
            raise TargetError(
                f"{_describe(exc, f'creating folder {folder}')}",
                permanent=exc.errno == errno.EACCES,
            ) from None

        failed = False
        seen: set[str] = set()
        for inst in instances:
            name = instance_file_name(inst)
            if name in seen:
                report(instance_outcome(inst, PRESENT, "duplicate SOP Instance UID"))
                continue
            seen.add(name)
            if existing.get(name) == inst.size:
                report(instance_outcome(inst, PRESENT))
                continue
            final = posixpath.join(folder, name)
            tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
            try:
                # confirm=True stats the upload and raises if the size differs.
                sftp.put(str(inst.path), tmp, confirm=True)
                _rename(sftp, tmp, final)
            except FileNotFoundError as exc:
                if exc.filename == str(inst.path) or not exc.filename:
                    failed = True
                    report(instance_outcome(inst, FAILED, _describe(exc, "uploading")))
                    continue
                raise
            except OSError as exc:
                if isinstance(exc, _CONNECTION_ERRORS) or not _alive(sftp):
                    raise ConnectionError(str(exc)) from None
                failed = True
                _remove_quietly(sftp, tmp)
                report(
                    instance_outcome(
                        inst, FAILED, _describe(exc, f"uploading to {final}")
                    )
                )
                continue
            report(instance_outcome(inst, SENT))

        if self.target.write_complete_marker and not failed:
            marker = posixpath.join(folder, COMPLETE_MARKER)
            try:
                sftp.putfo(BytesIO(b""), marker, confirm=False)
            except OSError as exc:
                if isinstance(exc, _CONNECTION_ERRORS):
                    raise
                raise TargetError(_describe(exc, f"writing {marker}")) from None

    # -- test ---------------------------------------------------------------------------
    def test(self) -> TestResult:
        result = TestResult()
        session = SshSession(self.target)
        try:
            if not login_checks(result, session):
                return result
            with result.check("folder exists and is writable") as check:
                check.message = self._probe_folder(session)
        except _CONNECTION_ERRORS as exc:
            lost = TargetError(
                f"connection to {session.where} lost: {exc or type(exc).__name__}"
            )
            with result.check("connection"):
                raise lost from None
        finally:
            session.close()
        return result

    def _probe_folder(self, session: SshSession) -> str:
        sftp = session.sftp()
        folder = self.target.path
        try:
            attrs = sftp.stat(folder)
        except FileNotFoundError:
            raise TargetError(
                f"folder {folder} does not exist on the server "
                f"(logged in as {self.target.username})"
            ) from None
        except OSError as exc:
            raise TargetError(_describe(exc, f"looking at {folder}")) from None
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise TargetError(f"{folder} is not a folder")
        probe = posixpath.join(folder, f".courier-probe-{uuid.uuid4().hex[:12]}")
        try:
            sftp.putfo(BytesIO(b"courier write test\n"), probe)
        except OSError as exc:
            raise TargetError(
                _describe(exc, f"writing a probe file into {folder}")
            ) from None
        try:
            sftp.remove(probe)
        except OSError as exc:
            raise TargetError(
                _describe(exc, f"removing the probe file {probe}")
            ) from None
        return f"{folder} exists; a probe file was written and removed"


def _makedirs(sftp: paramiko.SFTPClient, folder: str, made: set[str]) -> None:
    """mkdir -p over SFTP, remembering what exists."""
    if not folder or folder in made:
        return
    parts = folder.split("/")
    current = "/" if folder.startswith("/") else ""
    for part in parts:
        if not part:
            continue
        current = posixpath.join(current, part) if current else part
        if current in made:
            continue
        try:
            attrs = sftp.stat(current)
            if not stat.S_ISDIR(attrs.st_mode or 0):
                raise TargetError(
                    f"{current} on the server is a file, not a folder", permanent=True
                )
        except FileNotFoundError:
            try:
                sftp.mkdir(current, mode=0o755)
            except OSError:
                # Another sender may have created it in the meantime.
                if not stat.S_ISDIR(sftp.stat(current).st_mode or 0):
                    raise
        made.add(current)


def _rename(sftp: paramiko.SFTPClient, tmp: str, final: str) -> None:
    try:
        sftp.posix_rename(tmp, final)
    except OSError as exc:
        if isinstance(exc, _CONNECTION_ERRORS):
            raise
        # A server without the posix-rename extension: SFTP's plain rename refuses
        # to replace, so remove the old file first (not atomic, but complete).
        _remove_quietly(sftp, final)
        sftp.rename(tmp, final)


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except OSError:
        pass
