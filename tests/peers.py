"""Real test peers on loopback: start, wait until ready, stop by PID.

Used by the pytest fixtures in tests/fixtures/ and by the bench/ scripts. Every peer
gets free ports chosen at run time and its own temporary directory; a peer that does
not become ready raises `PeerError` with the tail of its log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class PeerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_port() -> socket.socket:
    """A port below the ephemeral range, bound but not listening: refused.

    For a peer that is down and starts later on the same port: close the socket,
    then start the peer. Outgoing connections never take a port below the
    ephemeral range as their source port, so nothing else grabs it in between
    (a port from `free_port` can be, on a busy machine).
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", random.randint(max(1024, low - 12000), low - 1)))
            return sock
        except OSError:
            sock.close()
    raise PeerError("no free port below the ephemeral range")


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_binary(path: str) -> str:
    found = shutil.which(path)
    if not found:
        raise PeerError(
            f"{path} is not installed: run the README's test command (./courier test), "
            "which installs every peer."
        )
    return found


class Peer:
    """A peer process with a working directory, a log file and a PID."""

    name = "peer"

    def __init__(self, workdir: str | Path | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"courier-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return DCMTK_ENV

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> Peer:
        cmd = self.command()
        require_binary(cmd[0])
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env(),
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(
                    f"{self.name} exited with {self.proc.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise PeerError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the peer's whole process group (storescp --fork has children),
        then SIGKILL what is left after `timeout`."""
        if not self.proc:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc:
            self._signal_group(signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.wait(5)

    def _signal_group(self, sig: int) -> None:
        # Peers start in their own session, so the group id is the leader's pid.
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Orthanc(Peer):
    """Debian's Orthanc with the DICOMweb plugin, on free ports, storage in workdir."""

    name = "orthanc"

    def __exit__(self, *exc) -> None:
        # Done with (its storage is a temporary folder): killed, not stopped. A
        # SIGTERM costs 3.5 s per Orthanc while its servers wind down, about 20 s
        # at the end of a session with six of them.
        self.kill()

    def __init__(
        self,
        workdir=None,
        *,
        aet: str = "ORTHANC",
        check_called_aet: bool = False,
        users: dict[str, str] | None = None,
        modalities: dict[str, dict] | None = None,
        max_pdu: int = 131072,
        extra: dict | None = None,
    ):
        super().__init__(workdir)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.users = users or {}
        self.config = {
            "Name": "courier-test-orthanc",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users or {"orthanc": "orthanc"},
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": False,
            "DicomModalities": modalities or {},
            "MaximumPduLength": max_pdu,
            "SyncStorageArea": False,
            "SaveJobs": False,
            "StableAge": 2,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": f"127.0.0.1:{self.http_port}",
                "Ssl": False,
            },
        }
        if extra:
            self.config.update(extra)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def command(self) -> list[str]:
        (self.workdir / "db").mkdir(exist_ok=True)
        (self.workdir / "log").mkdir(exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config, indent=1))
        return ["/usr/sbin/Orthanc", f"--logdir={self.workdir / 'log'}", str(cfg)]

    def ready(self) -> bool:
        if not port_open(self.dicom_port):
            return False
        try:
            self.rest("/system")
            return True
        except (OSError, urllib.error.URLError):
            return False

    def rest(self, path: str, method: str = "GET", body: bytes | dict | None = None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def count_instances(self) -> int:
        return self.rest("/statistics")["CountInstances"]

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        # One request, not one per instance (400 took seconds under load).
        return {
            item["MainDicomTags"]["SOPInstanceUID"]
            for item in self.rest("/instances?expand")
        }

    def find_instance(self, sop_instance_uid: str) -> str | None:
        found = self.rest("/tools/lookup", "POST", sop_instance_uid.encode())
        for item in found or []:
            if item.get("Type") == "Instance":
                return item["ID"]
        return None

    def instance_file(self, oid: str) -> bytes:
        req = urllib.request.Request(f"{self.base_url}/instances/{oid}/file")
        if self.users:
            user, password = next(iter(self.users.items()))
            token = b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def clear(self) -> None:
        """Delete every patient (and so every instance) stored so far."""
        for pid in self.rest("/patients"):
            self.rest(f"/patients/{pid}", "DELETE")


class StoreSCP(Peer):
    """dcmtk's storescp writing every received instance into `incoming/`."""

    name = "storescp"

    def __init__(
        self,
        workdir=None,
        *,
        aet: str = "STORESCP",
        max_pdu: int = 131072,
        extra_args: list[str] | None = None,
        fork: bool = False,
        accept_all: bool = True,
    ):
        super().__init__(workdir)
        self.aet = aet
        # Without --accept-all storescp takes only the uncompressed syntaxes (Explicit
        # VR Little and Big Endian, Implicit VR Little Endian): no JPEG, no deflate.
        self.accept_all = accept_all
        self.port = free_port()
        self.max_pdu = max_pdu
        self.extra_args = extra_args or []
        self.fork = fork
        self.incoming = self.workdir / "incoming"
        self.incoming.mkdir(exist_ok=True)

    def command(self) -> list[str]:
        cmd = [
            "storescp",
            "-aet",
            self.aet,
            "-od",
            str(self.incoming),
            "-pdu",
            str(self.max_pdu),
            "-fe",
            ".dcm",
        ]
        if self.accept_all:
            cmd.append("--accept-all")
        if self.fork:
            cmd.append("--fork")
        return cmd + self.extra_args + [str(self.port)]

    def ready(self) -> bool:
        return port_open(self.port)

    def files(self) -> list[Path]:
        return sorted(self.incoming.rglob("*.dcm"))

    def clear(self) -> None:
        for f in self.incoming.iterdir():
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
