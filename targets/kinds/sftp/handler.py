"""SFTP targets (paramiko): one file per instance under `<folder>/<layout>/`.

The series folder's other files (reports, previews, results) go beside the instances
under their own names, minus the exclusion filter.

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
import queue
import stat
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from io import BytesIO

import paramiko

from targets.kinds.base import (
    COMPLETE_MARKER,
    FAILED,
    PRESENT,
    SENT,
    CheckReport,
    Handler,
    Outcome,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    instance_outcome,
)
from targets.paths import UnsafePath, remote_inside
from targets.series import Instance, OtherFile, Series
from targets.ssh import SshSession, login_checks

log = logging.getLogger(__name__)

TMP_PREFIX = ".courier-part-"
# Parallel SFTP channels on one SSH connection (OpenSSH allows 10 sessions).
SFTP_CHANNELS = 4
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
        connections: int | None = None,
    ) -> SendResult:
        result, report, groups = self.start_grouped(series, progress)
        if not groups:
            return result

        with SshSession(self.target) as session:
            try:
                self._send_groups(session, groups, report)
            except _CONNECTION_ERRORS as exc:
                raise TargetError(
                    f"connection to {session.where} lost during the upload: "
                    f"{exc or type(exc).__name__}"
                ) from None
        return result

    def _send_groups(
        self,
        session: SshSession,
        groups: dict[str, list[tuple[Instance | OtherFile, str]]],
        report: Callable[[Outcome], None],
    ) -> None:
        sftp = session.sftp()
        made: set[str] = set()
        # (file, series folder, folder of the file, name)
        uploads: list[tuple[Instance | OtherFile, str, str, str]] = []
        folders: dict[str, bool] = {}  # series folder -> every file there is complete
        listings: dict[str, dict[str, int]] = {}

        def listing(folder: str) -> dict[str, int]:
            if folder not in listings:
                try:
                    _makedirs(sftp, folder, made)
                    listings[folder] = {
                        a.filename: a.st_size for a in sftp.listdir_attr(folder)
                    }
                except OSError as exc:
                    if isinstance(exc, _CONNECTION_ERRORS) or not _alive(sftp):
                        raise ConnectionError(str(exc)) from None
                    raise TargetError(
                        _describe(exc, f"creating folder {folder}"),
                        permanent=exc.errno == errno.EACCES,
                    ) from None
            return listings[folder]

        for rel, files in groups.items():
            try:
                series_folder = (
                    remote_inside(self.target.path, rel) if rel else self.target.path
                )
            except UnsafePath as exc:
                raise TargetError(str(exc), permanent=True) from None
            folders[series_folder] = True
            listing(series_folder)
            seen: set[str] = set()
            for inst, path in files:
                # An other file may sit in a subfolder of the series folder.
                sub, name = posixpath.split(path)
                folder = remote_inside(series_folder, sub) if sub else series_folder
                existing = listing(folder)
                if path in seen:
                    report(
                        instance_outcome(inst, PRESENT, "duplicate SOP Instance UID")
                    )
                # Size only, as the issue asks ("existing complete files with the
                # right size are not uploaded again"): comparing bytes would mean
                # downloading every file. Unlike Folder and S3, a corrected re-send
                # of the same size is therefore not written again.
                elif existing.get(name) == inst.size:
                    report(instance_outcome(inst, PRESENT))
                else:
                    uploads.append((inst, series_folder, folder, name))
                seen.add(path)

        # Several SFTP channels on the one connection: while one waits for the
        # server's answer (open, close, rename), the others keep it busy.
        channels = max(1, min(SFTP_CHANNELS, len(uploads)))
        clients = queue.SimpleQueue()
        clients.put(sftp)
        for _ in range(channels - 1):
            clients.put(paramiko.SFTPClient.from_transport(session.transport))

        def upload(
            inst: Instance | OtherFile, _series: str, folder: str, name: str
        ) -> Outcome:
            client = clients.get()
            try:
                return self._upload(client, inst, folder, name)
            finally:
                clients.put(client)

        with ThreadPoolExecutor(channels, thread_name_prefix="sftp") as pool:
            futures = {pool.submit(upload, *job): job for job in uploads}
            try:
                for future in as_completed(futures):
                    outcome = future.result()
                    if outcome.status == FAILED:
                        folders[futures[future][1]] = False
                    report(outcome)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

        if self.target.write_complete_marker:
            for folder, complete in folders.items():
                if complete:
                    self._write_marker(sftp, folder)

    def _upload(
        self,
        sftp: paramiko.SFTPClient,
        inst: Instance | OtherFile,
        folder: str,
        name: str,
    ) -> Outcome:
        """Upload one file under a temporary name and rename it into place."""
        final = posixpath.join(folder, name)
        tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
        try:
            with open(inst.path, "rb") as local:
                # Write errors surface at close (paramiko checks every pipelined
                # write's status there), so no extra stat round trip is needed.
                sftp.putfo(local, tmp, file_size=inst.size, confirm=False)
            _rename(sftp, tmp, final)
        except OSError as exc:
            if isinstance(exc, _CONNECTION_ERRORS) or not _alive(sftp):
                raise ConnectionError(str(exc)) from None
            if not inst.path.exists():
                return instance_outcome(inst, FAILED, f"{inst.path} is gone")
            _remove_quietly(sftp, tmp)
            return instance_outcome(
                inst, FAILED, _describe(exc, f"uploading to {final}")
            )
        return instance_outcome(inst, SENT)

    def _write_marker(self, sftp: paramiko.SFTPClient, folder: str) -> None:
        marker = posixpath.join(folder, COMPLETE_MARKER)
        try:
            sftp.putfo(BytesIO(b""), marker, confirm=False)
        except OSError as exc:
            if isinstance(exc, _CONNECTION_ERRORS) or not _alive(sftp):
                raise ConnectionError(str(exc)) from None
            raise TargetError(_describe(exc, f"writing {marker}")) from None

    # -- test ---------------------------------------------------------------------------
    def test(self) -> CheckReport:
        result = CheckReport()
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
            except OSError as exc:
                # Another sender may have created it in the meantime.
                try:
                    exists = stat.S_ISDIR(sftp.stat(current).st_mode or 0)
                except OSError:
                    exists = False
                if not exists:
                    raise exc from None
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
