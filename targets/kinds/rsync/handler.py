"""rsync targets: the system `rsync` over `ssh`, checking the pinned host key.

The series is staged as hard links in `<tmp>/<layout>/<SOPInstanceUID>.dcm` (its other
files, such as reports and previews, beside them under their own names, minus the
exclusion filter) and sent with one rsync run into `<folder>/`. ssh gets a generated known_hosts holding only the
pinned key (`StrictHostKeyChecking=yes`), never the service account's. Login uses the
target's key (pasted or a file; written unencrypted to a 0600 temp file for the run),
else its password through `sshpass -e` (in the environment, never on the command
line), else the service account's default key. When the switch is on, the completion
script runs afterwards as `<script> <destination_folder> <target_name>` from the
target folder, over SSH.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from targets.kinds.base import (
    FAILED,
    PRESENT,
    SENT,
    CheckReport,
    Handler,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    instance_outcome,
)
from targets.paths import UnsafePath, inside, remote_inside
from targets.series import Instance, OtherFile, Series
from targets.ssh import (
    DEFAULT_PORT,
    HostKey,
    SshSession,
    known_hosts_line,
    load_private_key,
    login_checks,
    pinned_host_key,
    scan_host_key,
    verify_host_key,
)

log = logging.getLogger(__name__)

# The name the generated known_hosts file knows the server by (any host, any port).
HOST_ALIAS = "courier-target"
# rsync's own I/O timeout: a stalled connection fails the run instead of hanging.
IO_TIMEOUT = 120
SCRIPT_TIMEOUT = 600.0
MAX_OUTPUT = 4000

# ssh's own login failure, e.g. "user@host: Permission denied (publickey,password)."
# (rsync's "failed: Permission denied (13)" is about files).
_SSH_AUTH_FAILED = re.compile(
    r"Permission denied \((?:publickey|password|keyboard-interactive|hostbased|gssapi)"
)
# An itemised line: 11 characters of change flags, a space, the path.
_ITEM = re.compile(r"^([<>ch.*][fdLDS].{9}) (.+)$")


class RsyncHandler(Handler):
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
        folders = list(groups)
        staged: dict[str, Instance | OtherFile] = {}
        duplicates: list[Instance | OtherFile] = []
        for rel, files in groups.items():
            for inst, name in files:
                try:
                    path = remote_inside("", rel, name)
                except UnsafePath as exc:
                    report(instance_outcome(inst, FAILED, str(exc)))
                    continue
                if path in staged:
                    duplicates.append(inst)
                else:
                    staged[path] = inst
        if not staged:
            return result

        staging = _staging_parent(series.root)
        with tempfile.TemporaryDirectory(prefix="courier-rsync-", dir=staging) as tmp:
            workdir = Path(tmp)
            stage = workdir / "stage"
            for rel, inst in list(staged.items()):
                try:
                    _link(inst.path, inside(stage, rel))
                except FileNotFoundError:
                    del staged[rel]
                    report(instance_outcome(inst, FAILED, f"{inst.path} is gone"))
            if not staged:
                return result
            statuses = self._rsync(workdir, stage)

        for rel, inst in staged.items():
            report(instance_outcome(inst, statuses.get(rel, SENT)))
        for inst in duplicates:
            report(instance_outcome(inst, PRESENT, "duplicate SOP Instance UID"))

        if self.target.run_on_complete:
            self.run_complete_script(folders)
        return result

    def _rsync(self, workdir: Path, stage: Path) -> dict[str, str]:
        """Run rsync; return SENT/PRESENT by staged path from its itemised output."""
        target = self.target
        dest = target.path.rstrip("/") + "/" if target.path.rstrip("/") else "./"
        cmd, env = self.ssh_command(workdir)
        argv = [
            # --omit-dir-times: leave the target folder's own times alone.
            "rsync",
            "--recursive",
            "--times",
            "--omit-dir-times",
            "--mkpath",
            # New folders and files get sane modes whatever the spool's were.
            "--chmod=D755,F644",
            f"--timeout={IO_TIMEOUT}",
            # -ii lists unchanged files too, so a retry can say what was there.
            "--itemize-changes",
            "--itemize-changes",
            "--out-format=%i %n",
            "-e",
            cmd,
            f"{stage}/",
            f"{target.username}@{HOST_ALIAS}:{dest}",
        ]
        if env.get("SSHPASS"):
            argv = ["sshpass", "-e", *argv]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError as exc:
            raise TargetError(
                f"{exc.filename} is not installed on Courier's server", permanent=True
            ) from None
        if proc.returncode != 0:
            raise self._rsync_error(
                proc.returncode, proc.stderr, bool(env.get("SSHPASS"))
            )
        log.debug("rsync to %s: %s", target.name, proc.stdout[-2000:])
        statuses: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            match = _ITEM.match(line)
            if not match or match.group(1)[1] != "f":
                continue
            item, name = match.groups()
            statuses[name] = SENT if item[0] in "<>c" else PRESENT
        return statuses

    def _has_key(self) -> bool:
        return bool(self.target.private_key or self.target.private_key_path)

    def ssh_command(self, workdir: Path) -> tuple[str, dict[str, str]]:
        """The `ssh` command line for rsync's `-e`, and the environment to run in.

        Writes the known_hosts file (and the key, if the target has one) to `workdir`.
        """
        target = self.target
        key = self.host_key_for_send()
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text(known_hosts_line(HOST_ALIAS, key))
        opts = [
            "ssh",
            "-p",
            str(target.port or DEFAULT_PORT),
            "-o",
            f"HostName={_bare(target.host)}",
            "-o",
            f"HostKeyAlias={HOST_ALIAS}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "CheckHostIP=no",
            "-o",
            "UpdateHostKeys=no",
            "-o",
            f"ConnectTimeout={max(1, round(target.connect_timeout))}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ]
        env = {k: v for k, v in os.environ.items() if k != "SSHPASS"}
        private_key = load_private_key(target)
        if private_key is not None:
            key_file = workdir / "id"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(private_key.openssh_text)
            opts += [
                "-i",
                str(key_file),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "KbdInteractiveAuthentication=no",
            ]
        elif target.password:
            env["SSHPASS"] = str(target.password)
            opts += [
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
                "-o",
                "NumberOfPasswordPrompts=1",
            ]
        else:
            # The service account's default keys (~/.ssh/id_*), never a prompt.
            opts += ["-o", "BatchMode=yes", "-o", "PasswordAuthentication=no"]
        return " ".join(shlex.quote(o) for o in opts), env

    def host_key_for_send(self) -> HostKey:
        """The pinned key to write into known_hosts; refuse when none is pinned."""
        target = self.target
        key = pinned_host_key(target)
        if key is not None:
            return key
        # Only a fingerprint (typed in, or unpinned): look at what the server shows
        # now and accept it only if it is the pinned one.
        presented = scan_host_key(target)
        verify_host_key(target, presented)
        return presented

    def _rsync_error(self, rc: int, stderr: str, password: bool) -> TargetError:
        text = _tail(stderr)
        where = f"{self.target.host}:{self.target.port or DEFAULT_PORT}"
        if "Host key verification failed" in stderr or "HOST IDENTIFICATION" in stderr:
            # Say which key the server shows now, as Test and SFTP do.
            try:
                verify_host_key(self.target, scan_host_key(self.target))
            except TargetError as exc:
                return exc
            return TargetError(
                f"host key verification failed for {where}", permanent=True
            )
        if password and rc == 5:  # sshpass: the password was refused
            return TargetError(
                f"authentication failed for user {self.target.username!r} on {where} "
                "(password refused)",
                permanent=True,
            )
        if _SSH_AUTH_FAILED.search(stderr):
            return TargetError(
                f"authentication failed for user {self.target.username!r} on {where}: "
                f"{text}",
                permanent=True,
            )
        if "command not found" in stderr or rc == 127:
            return TargetError(
                f"rsync is not installed on {where}: {text}", permanent=True
            )
        if "Permission denied" in stderr or "Read-only file system" in stderr:
            return TargetError(
                f"permission denied writing to {self.target.path} on {where}: {text}",
                permanent=True,
            )
        if "No space left" in stderr or "Disk quota" in stderr:
            return TargetError(f"the server's disk is full: {text}")
        if rc == 255 or rc in (10, 12, 30, 35):
            return TargetError(f"cannot reach {where} (rsync exit {rc}): {text}")
        return TargetError(f"rsync failed with exit code {rc}: {text}")

    # -- completion script ----------------------------------------------------------------
    def script_command(self, args: list[str]) -> str:
        """Shell text: cd into the target folder, check the script, run it."""
        script = self.target.complete_script
        run = script if "/" in script else f"./{script}"
        q = shlex.quote
        return (
            f"cd -- {q(self.target.path)} || exit 125\n"
            f'if [ ! -e {q(run)} ]; then echo "no such file: $PWD/"{q(script)}; '
            "exit 127; fi\n"
            f'if [ ! -x {q(run)} ]; then echo "not executable: $PWD/"{q(script)}; '
            "exit 126; fi\n"
            + (f"exec {q(run)} " + " ".join(args) + " 2>&1\n" if args else "exit 0\n")
        )

    def run_complete_script(self, folders: list[str]) -> None:
        """Run the completion script once per destination folder of the series."""
        with SshSession(self.target) as session:
            for rel in folders:
                # The destination as an absolute path, resolved on the server.
                dest = '"$PWD"/' + shlex.quote(rel) if rel else '"$PWD"'
                command = self.script_command([dest, shlex.quote(self.target.name)])
                rc, output = session.run(command, SCRIPT_TIMEOUT)
                if rc != 0:
                    what = {
                        125: "cannot enter the target folder",
                        126: "the completion script is not executable",
                        127: "the completion script does not exist",
                    }.get(rc, f"the completion script exited with {rc}")
                    raise TargetError(
                        f"{what} ({self.target.complete_script} in "
                        f"{self.target.path}): {_tail(output) or '(no output)'}",
                        permanent=rc in (125, 126, 127),
                    )

    # -- test ---------------------------------------------------------------------------
    def test(self) -> CheckReport:
        result = CheckReport()
        with result.check("rsync and ssh on Courier's server") as check:
            tools = ["rsync", "ssh"] + (
                ["sshpass"] if self.target.password and not self._has_key() else []
            )
            missing = [tool for tool in tools if not shutil.which(tool)]
            if missing:
                raise TargetError(
                    f"{', '.join(missing)} not installed here: install the Debian "
                    "packages rsync, openssh-client and sshpass (./courier run does)"
                )
            check.message = "found " + ", ".join(tools)
        if result.stopped:
            return result
        session = SshSession(self.target)
        q = shlex.quote
        try:
            if not login_checks(result, session):
                return result
            with result.check("rsync on the server") as check:
                rc, out = session.run("command -v rsync", 30)
                if rc != 0:
                    raise TargetError(
                        "rsync is not installed on the server (or not "
                        f"on the login's PATH): {_tail(out)}"
                    )
                check.message = f"found {out.strip()}"
            with result.check("folder exists and is writable") as check:
                folder = q(self.target.path)
                rc, out = session.run(
                    f"[ -d {folder} ] || {{ echo 'no such folder'; exit 3; }}\n"
                    f"p={folder}/.courier-probe-$$\n"
                    ': > "$p" || exit 4\nrm -f -- "$p" || exit 5\n',
                    30,
                )
                if rc != 0:
                    raise TargetError(
                        {
                            3: f"folder {self.target.path} does not exist on the server",
                            4: f"folder {self.target.path} is not writable: {_tail(out)}",
                            5: f"the probe file in {self.target.path} could not be "
                            f"removed: {_tail(out)}",
                        }.get(rc, _tail(out))
                    )
                check.message = (
                    f"{self.target.path} exists; a probe file was written and removed"
                )
            if self.target.run_on_complete and not result.stopped:
                with result.check("completion script") as check:
                    rc, out = session.run(self.script_command([]), 30)
                    if rc != 0:
                        raise TargetError(_tail(out) or f"exit code {rc}")
                    check.message = (
                        f"{self.target.complete_script} is present and executable"
                    )
        except (OSError, EOFError) as exc:
            lost = TargetError(
                f"connection to {session.where} lost: {exc or type(exc).__name__}"
            )
            with result.check("connection"):
                raise lost from None
        finally:
            session.close()
        return result


def _staging_parent(source: Path) -> str | None:
    """A folder for the staged hard links on the same file system as the series.

    The system temp folder is often another file system (tmpfs) than Courier's
    spool, where hard links fail and every file would be copied.
    """
    from django.conf import settings

    try:
        device = source.stat().st_dev
    except OSError:
        return None
    for candidate in (Path(settings.DATA_DIR) / "tmp", Path(tempfile.gettempdir())):
        try:
            candidate.mkdir(mode=0o700, exist_ok=True)
            if candidate.stat().st_dev == device:
                return str(candidate)
        except OSError:
            continue
    return None


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise TargetError(f"cannot stage {src}: {exc.strerror}") from None
        # The temp folder is on another file system: copy instead.
        shutil.copy2(src, dst)


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _tail(text: str) -> str:
    text = (text or "").strip()
    return text[-MAX_OUTPUT:]
