"""Courier's DICOM receiver: a C-STORE and C-ECHO SCP writing into the spool.

Every instance is written as it arrived (the peer's encoded bytes behind a file meta
header, no re-encoding) to `<spool>/incoming/<series folder>/<SOP Instance UID>.dcm`,
and both the file and its directory are fsynced before the success status goes back:
an acknowledged image is on disk. Instances are grouped into series by
(Series Instance UID, calling AE title, called AE title), so the pass-incoming
switches of DICOM targets have one value per series.

Associations are accepted by `targets.kinds.dicom_accept` (one thread per association
reading a plain blocking socket), not by pynetdicom's acceptor, whose reader and
reactor threads cost about three times Courier's own work per instance.

The association threads never touch the database. They keep the open series in
memory; one bookkeeping thread (`tick()`, once a second) writes counts and times to
the database through a `Recorder` in batches, and closes series that have been quiet
for the quiet period. A small JSON file beside each series folder (written with the
first instance) describes it, so a folder whose database row was never written (a
crash in between) is adopted on the next start instead of being lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
)
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from targets.dicomcheck import CorruptDataset, check_dataset
from targets.dicomvr import LONG_VRS
from targets.kinds.dicom_accept import Rejection, StoreRequest, StoreSCP
from targets.series import safe_path_part

log = logging.getLogger("courier.receiver")

# C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210  # "Failed: cannot understand" range 0xC000-0xCFFF
PROCESSING_FAILURE = 0x0110

SIDECAR_SUFFIX = ".series.json"

# -- file meta -------------------------------------------------------------------------


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr in LONG_VRS:
        return tag + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta_bytes(
    sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str
) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received dataset.

    Encoded directly: pydicom's writer costs about a millisecond per instance, a
    noticeable share of the receiver's time per C-STORE.
    """
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _uid(sop_class)),
            _element(0x00020003, b"UI", _uid(sop_instance)),
            _element(0x00020010, b"UI", _uid(transfer_syntax)),
            _element(0x00020012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _element(0x00020013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION)),
            _element(0x00020016, b"AE", _text(source_aet)) if source_aet else b"",
        )
    )
    group_length = _element(0x00020000, b"UL", struct.pack("<L", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


# -- the series being received --------------------------------------------------------


@dataclass
class OpenSeries:
    """A series being received, as the receiver keeps it in memory."""

    series_uid: str
    calling_aet: str
    called_aet: str
    peer_address: str
    folder: Path
    study_uid: str = ""
    first_received: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_received: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Monotonic time of the last instance, for the quiet period.
    last_instance_at: float = field(default_factory=time.monotonic)
    sop_uids: set[str] = field(default_factory=set)
    bytes: int = 0
    pk: int | None = None
    dirty: bool = True
    # Instances being written right now (the series is not closed meanwhile).
    inflight: int = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.series_uid, self.calling_aet, self.called_aet)

    @property
    def instance_count(self) -> int:
        return len(self.sop_uids)

    def sidecar(self) -> dict:
        return {
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "calling_aet": self.calling_aet,
            "called_aet": self.called_aet,
            "peer_address": self.peer_address,
            "first_received": self.first_received.isoformat(),
        }


class Recorder:
    """Where the receiver's bookkeeping goes. The default keeps nothing (tests)."""

    def restore(self, spool_incoming: Path) -> list[OpenSeries]:
        """Return the series still open from a previous run (to continue them)."""
        return []

    def save(self, series: list[OpenSeries]) -> None:
        """Write new and changed series (creating rows, setting `pk`)."""

    def close(self, series: OpenSeries) -> None:
        """The series has been quiet for the quiet period: hand it to routing."""

    def refused(self, reason: str, count: int) -> None:
        """`count` instances were refused for lack of resources (shown in the admin)."""

    def heartbeat(self, info: dict) -> None:
        """The receiver is alive (called every few seconds)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, *parts: bytes) -> None:
    """Write `parts` to `path` atomically (replacing any file there), fsynced."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        total = sum(len(p) for p in parts)
        written = os.writev(fd, parts)
        if written < total:  # a short write: finish it piece by piece
            rest = memoryview(b"".join(parts))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Receiver:
    """The C-STORE/C-ECHO SCP. `start()` serves in the background, `stop()` ends it."""

    def __init__(
        self,
        *,
        ae_title: str,
        port: int,
        spool_dir: str | Path,
        host: str = "0.0.0.0",
        accepted_calling_aets: Iterable[str] = (),
        min_free_bytes: int = 0,
        quiet_seconds: float = 60.0,
        recorder: Recorder | None = None,
        max_pdu: int = 0,
        tick_seconds: float = 1.0,
    ):
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.incoming = Path(spool_dir) / "incoming"
        self.accepted = [a.strip() for a in accepted_calling_aets if a.strip()]
        self.min_free_bytes = min_free_bytes
        self.quiet_seconds = quiet_seconds
        self.recorder = recorder or Recorder()
        self.max_pdu = max_pdu
        self.tick_seconds = tick_seconds
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str, str], OpenSeries] = {}
        self._refusals: list[str] = []
        self._free: tuple[float, int] = (-1.0, 0)
        self._server = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Counters shown in the heartbeat; changed and read under `_lock` only
        # (associations run in parallel threads).
        self.stats = {"stored": 0, "replaced": 0, "refused": 0, "corrupt": 0}

    # -- lifecycle -------------------------------------------------------------------

    def supported_contexts(self) -> list[PresentationContext]:
        # Receive every storage SOP class in whatever transfer syntax the sender
        # prefers (compressed ones included): the bytes are stored as they came.
        contexts = [
            build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            for cx in AllStoragePresentationContexts
        ]
        return [*contexts, build_context(Verification)]

    def start(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for series in self.recorder.restore(self.incoming):
            series.last_instance_at = time.monotonic()
            self._open[series.key] = series
        # Any called AE title is accepted and recorded: with transparent routing
        # modalities call Courier by the final destination's AE title.
        self._server = StoreSCP(
            (self.host, self.port),
            contexts=self.supported_contexts(),
            on_store=self.handle_store,
            on_rejected=self._log_rejected,
            accepted_calling_aets=self.accepted,
            max_pdu=self.max_pdu,
            max_associations=64,
            acse_timeout=30,
            dimse_timeout=60,
            network_timeout=120,
        )
        self.port = self._server.server_address[1]
        self._server.start()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run_bookkeeping, name="receiver-bookkeeping", daemon=True
        )
        self._thread.start()
        log.info(
            "event=receiver_started ae_title=%s port=%s spool=%s accepted_calling=%s",
            self.ae_title,
            self.port,
            self.incoming,
            ",".join(self.accepted) or "any",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.tick(final=True)

    def request_stop(self) -> None:
        """Ask `wait_stopped()` to return (safe from a signal handler)."""
        self._stop.set()

    def wait_stopped(self) -> None:
        """Block until `request_stop()`, then stop serving."""
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- association handlers (one thread per association) ------------------------

    def _log_rejected(self, rejection: Rejection) -> None:
        log.warning(
            "event=association_rejected calling_aet=%s peer=%s reason=%s",
            rejection.calling_aet,
            rejection.address,
            rejection.reason,
        )

    def handle_store(self, request: StoreRequest) -> int:
        calling, called = request.calling_aet, request.called_aet
        peer = f"{request.address}:{request.port}"
        ts, raw = request.transfer_syntax, request.dataset
        try:
            uids = check_dataset(raw, ts)
        except CorruptDataset as exc:
            with self._lock:
                self.stats["corrupt"] += 1
            log.warning(
                "event=instance_refused status=0x%04X calling_aet=%s peer=%s "
                "sop_instance=%s reason=%r",
                CANNOT_UNDERSTAND,
                calling,
                peer,
                request.sop_instance,
                str(exc),
            )
            return CANNOT_UNDERSTAND
        free = self._free_bytes(len(raw))
        if free - len(raw) < self.min_free_bytes:
            return self._refuse_full(calling, peer, f"{free} bytes free")

        sop_uid = uids["SOPInstanceUID"]
        try:
            series = self._series_for(uids, calling, called, peer)
        except OSError as exc:  # the series' folder or description not written
            return self._refuse_write(calling, peer, exc)
        meta = file_meta_bytes(
            uids["SOPClassUID"] or request.sop_class,
            sop_uid,
            ts,
            calling,
        )
        path = series.folder / f"{safe_path_part(sop_uid)}.dcm"
        try:
            write_durably(path, meta, raw)
        except OSError as exc:
            with self._lock:
                series.inflight -= 1
            return self._refuse_write(calling, peer, exc)
        except BaseException:
            with self._lock:
                series.inflight -= 1
            raise
        now = datetime.now(UTC)
        with self._lock:
            series.inflight -= 1
            replaced = sop_uid in series.sop_uids
            series.sop_uids.add(sop_uid)
            series.last_received = now
            series.last_instance_at = time.monotonic()
            series.bytes += len(meta) + len(raw)
            series.dirty = True
            self.stats["replaced" if replaced else "stored"] += 1
        return SUCCESS

    def _free_bytes(self, incoming: int) -> int:
        """Free bytes on the spool disk, looked up at most every half second.

        Between look-ups what was written since is subtracted, so a burst cannot
        overrun the threshold by more than half a second of writes.
        """
        now = time.monotonic()
        with self._lock:
            checked_at, free = self._free
            if now - checked_at < 0.5:
                self._free = (checked_at, free - incoming)
                return free
        try:
            free = shutil.disk_usage(self.incoming).free
        except OSError:
            free = 0
        with self._lock:
            self._free = (now, free - incoming)
        return free

    def _refuse_full(self, calling: str, peer: str, detail: str) -> int:
        return self._refuse(
            calling,
            peer,
            f"spool disk nearly full ({detail}, keeping {self.min_free_bytes} bytes "
            f"free): instances refused with 'out of resources'",
        )

    def _refuse_write(self, calling: str, peer: str, exc: OSError) -> int:
        """Answer 'out of resources' for a failed write, recorded like a full disk."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return self._refuse_full(calling, peer, exc.strerror or str(exc))
        return self._refuse(
            calling,
            peer,
            f"cannot write to the spool ({exc}): instances refused with "
            f"'out of resources'",
        )

    def _refuse(self, calling: str, peer: str, reason: str) -> int:
        log.error(
            "event=instance_refused status=0x%04X calling_aet=%s peer=%s reason=%r",
            OUT_OF_RESOURCES,
            calling,
            peer,
            reason,
        )
        with self._lock:
            self.stats["refused"] += 1
            self._refusals.append(reason)
        return OUT_OF_RESOURCES

    def _series_for(
        self, uids: dict[str, str], calling: str, called: str, peer: str
    ) -> OpenSeries:
        key = (uids["SeriesInstanceUID"], calling, called)
        with self._lock:
            series = self._open.get(key)
            if series is not None:
                # Counted under the lock: the series is not closed while an
                # instance is being written into its folder.
                series.inflight += 1
                return series
            name = (
                f"{safe_path_part(uids['SeriesInstanceUID'])}."
                f"{safe_path_part(calling, 'none')}.{secrets.token_hex(4)}"
            )
            series = OpenSeries(
                series_uid=uids["SeriesInstanceUID"],
                study_uid=uids["StudyInstanceUID"],
                calling_aet=calling,
                called_aet=called,
                peer_address=peer,
                folder=self.incoming / name,
            )
            # Made under the lock: a second association of the same series waits
            # for the folder and its description instead of racing to create them.
            try:
                series.folder.mkdir(parents=True)
                write_durably(
                    self.incoming / f"{name}{SIDECAR_SUFFIX}",
                    json.dumps(series.sidecar()).encode(),
                )
            except OSError:
                # No empty, undescribed folder left behind; the next instance of
                # the series tries again from scratch.
                with contextlib.suppress(OSError):
                    series.folder.rmdir()
                raise
            series.inflight += 1
            self._open[key] = series
            log.info(
                "event=series_started series_uid=%s calling_aet=%s called_aet=%s "
                "peer=%s folder=%s",
                series.series_uid,
                calling,
                called,
                peer,
                series.folder,
            )
            return series

    # -- bookkeeping ----------------------------------------------------------------

    def _run_bookkeeping(self) -> None:
        beat = 0.0
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick()
                if time.monotonic() - beat > 5:
                    beat = time.monotonic()
                    self.recorder.heartbeat(self.info())
            except Exception:  # keep receiving even if the database is away
                log.exception("event=receiver_bookkeeping_failed")

    def info(self) -> dict:
        with self._lock:
            open_count = len(self._open)
            stats = dict(self.stats)
        return {
            "ae_title": self.ae_title,
            "port": self.port,
            "open_series": open_count,
            **stats,
        }

    def tick(self, *, final: bool = False) -> list[OpenSeries]:
        """Save changed series, close the quiet ones; return the closed ones."""
        now = time.monotonic()
        with self._lock:
            dirty = [s for s in self._open.values() if s.dirty]
            for s in dirty:
                s.dirty = False
            quiet = (
                []
                if final
                else [
                    s
                    for s in self._open.values()
                    if now - s.last_instance_at >= self.quiet_seconds and not s.inflight
                ]
            )
            # Out of the map first: an instance arriving from now on starts a new
            # series (and folder), never lands in one that is being routed.
            for s in quiet:
                del self._open[s.key]
            refusals, self._refusals = self._refusals, []
        try:
            if dirty:
                self.recorder.save(dirty)
        except Exception:
            with self._lock:
                for s in dirty:
                    s.dirty = True
                for s in quiet:  # closed on a later tick, once saving works again
                    self._open.setdefault(s.key, s)
            raise
        if refusals:
            self.recorder.refused(refusals[-1], len(refusals))
        for s in quiet:
            self.recorder.close(s)
            log.info(
                "event=series_complete series_uid=%s calling_aet=%s instances=%d "
                "folder=%s",
                s.series_uid,
                s.calling_aet,
                s.instance_count,
                s.folder,
            )
        return quiet

    def open_series(self) -> list[OpenSeries]:
        with self._lock:
            return list(self._open.values())
