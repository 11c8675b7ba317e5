# Why this module is long: it is one state machine, the receiver and the sink each
# C-STORE streams into (`IncomingInstance`), sharing the receiver's lock, its open
# series and its refusal counters; split apart, the sink's calls into the receiver
# would become a public interface of their own. The files it writes and checks are
# in `files.py`, the series it keeps in `series.py`, its database side in
# `bookkeeping.py`.
"""Courier's DICOM receiver: a C-STORE and C-ECHO SCP writing into the spool.

Every instance is written as it arrived (the peer's encoded bytes behind a file meta
header, no re-encoding) to `<spool>/incoming/<series folder>/<SOP Instance UID>.dcm`,
and both the file and its directory are fsynced before the success status goes back:
an acknowledged image is on disk. Instances are grouped into series by
(Series Instance UID, calling AE title, called AE title), so the pass-incoming
switches of DICOM targets have one value per series.

Associations are accepted by `targets.dicomnet.scp` (one thread per association
reading a plain blocking socket), not by pynetdicom's acceptor, whose reader and
reactor threads cost about three times Courier's own work per instance.

A dataset is never held in memory: its fragments are written to a file under
`<spool>/incoming/.partial/` as they arrive (behind the file meta, made from the
C-STORE request), refused early when the disk is short of space or the instance
grows past `max_instance_bytes`, checked from the file once complete (the dataset's
SOP Class and Instance UIDs must be the request's, as storescp insists), and renamed
into its series folder.

The association threads never touch the database. They keep the open series in
memory; one bookkeeping thread (`tick()`, once a second) writes counts and times to
the database through a `Bookkeeper` in batches, and closes series that have been quiet
for the quiet period. A small JSON file beside each series folder (written with the
first instance) describes it, so a folder whose database row was never written (a
crash in between) is adopted on the next start instead of being lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification

from config.safetext import log_fields
from dispatch.routing.models import DESCRIPTION_SUFFIX
from targets.dicomnet import commitment as protocol
from targets.dicomnet.check import DEFLATED, CorruptDataset, walk_dataset
from targets.dicomnet.scp import (
    DEFAULT_MAX_PDU,
    Limits,
    Rejection,
    StoreRequest,
    StoreSCP,
)
from targets.series import safe_path_part

from . import commitment
from .files import (
    TooLarge,
    check_stored,
    file_meta_bytes,
    fsync_dir,
    instance_file_name,
    unprintable,
    write_all,
    write_durably,
)
from .journal import Journal, Record, syncfs
from .series import NO_SERIES_UID, Bookkeeper, OpenSeries, series_key

log = logging.getLogger("courier.receiver")

# C-STORE statuses (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210  # "Failed: cannot understand" range 0xC000-0xCFFF
DOES_NOT_MATCH = 0xA900  # "Error: data set does not match SOP class"
PROCESSING_FAILURE = 0x0110

# Datasets being received, beside the series folders (same disk: renamed into them).
PARTIAL_DIR = ".partial"
# A partial file untouched this long belongs to no live association (each must send
# something every idle timeout): removed when a receiver starts.
STALE_PARTIAL_SECONDS = 600
# While a dataset streams in, the free space is looked at again after this many bytes.
SPACE_CHECK_BYTES = 8 * 1024 * 1024
# A dataset up to this size is also kept in memory to be checked (per association).
KEEP_IN_MEMORY = 256 * 1024
DEFAULT_MAX_INSTANCE_BYTES = 4 * 1024**3


class IncomingInstance:
    """One C-STORE's dataset on its way to the spool (a `DatasetSink`).

    Written to a partial file as it arrives, so memory never holds the instance
    (a small one, up to `KEEP_IN_MEMORY`, is also kept to be checked without
    reading it back). Once a refusal is decided (spool disk short of space,
    instance too large, a write failing), the rest is read and dropped, and
    `finish()` answers it.
    """

    def __init__(self, receiver: Receiver, request: StoreRequest):
        self.rx = receiver
        self.request = request
        self.peer = f"{request.address}:{request.port}"
        self.status: int | None = None
        self.size = 0
        self.unchecked = 0  # bytes written since the free space was looked at
        self.fd = -1
        self.path: str | None = None  # the partial file (a str: no Path per instance)
        self.offset = 0
        self.meta = b""  # written with the first piece of the dataset
        self.file_meta = b""
        self.head: bytearray | None = bytearray()
        free = receiver._space_short(0)
        if free is not None:
            self.status = receiver._refuse_full(request, f"{free} bytes free")
            return
        meta = file_meta_bytes(
            request.sop_class, request.sop_instance, request.transfer_syntax,
            request.calling_aet,
        )  # fmt: skip
        path = f"{receiver.partial_prefix}{next(receiver.partial_numbers)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            try:
                self.fd = os.open(path, flags, 0o640)
            except FileNotFoundError:  # the spool folder was removed under us
                receiver.partial.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(path, flags, 0o640)
            self.path = path
        except OSError as exc:
            self._fail(receiver._refuse_write(request, exc))
            return
        self.meta, self.offset = meta, len(meta)
        self.file_meta = meta

    def write(self, data: bytes | memoryview) -> None:
        if self.status is not None:
            return
        rx = self.rx
        self.size += len(data)
        if self.size > rx.max_instance_bytes:
            self._fail(
                rx._refuse(
                    self.request,
                    f"instance larger than {rx.max_instance_bytes} bytes (the "
                    "receiver's maximum instance size): refused with 'out of "
                    "resources'",
                )
            )
            return
        self.unchecked += len(data)
        if self.unchecked >= SPACE_CHECK_BYTES:
            if (free := rx._space_short(self.unchecked)) is not None:
                self._fail(rx._refuse_full(self.request, f"{free} bytes free"))
                return
            self.unchecked = 0
        if self.head is not None:
            if self.size <= KEEP_IN_MEMORY:
                self.head += data
            else:
                self.head = None
        try:
            if self.meta:
                write_all(self.fd, self.meta, data)
                self.meta = b""
            else:
                write_all(self.fd, data)
        except OSError as exc:
            self._fail(rx._refuse_write(self.request, exc))

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None

    def _fail(self, status: int) -> None:
        self.status = status
        self.discard()

    def finish(self) -> int:
        """Check the whole dataset, file it in its series folder; return the status."""
        try:
            if self.status is None:
                self.status = self._file()
            return self.status
        finally:
            self.discard()  # whatever was not renamed into a series folder

    def _file(self) -> int:
        rx, request = self.rx, self.request
        if (free := rx._space_short(self.unchecked)) is not None:
            return rx._refuse_full(request, f"{free} bytes free")
        assert self.path is not None
        syntax = request.transfer_syntax
        try:
            if self.head is not None and syntax != DEFLATED:
                uids = walk_dataset(self.head, syntax, ordered=False)
            else:
                uids = check_stored(self.path, self.offset, syntax,
                                  max_inflated=rx.max_instance_bytes)  # fmt: skip
        except CorruptDataset as exc:
            return rx._refuse_corrupt(request, CANNOT_UNDERSTAND, str(exc))
        except TooLarge as exc:
            return rx._refuse(request, f"deflated instance {exc}: refused")
        problem = _identity_problem(uids, request)
        if problem is not None:
            status, reason = problem
            return rx._refuse_corrupt(request, status, reason)
        sop_uid = uids["SOPInstanceUID"]
        try:
            series = rx._series_for(uids, request)
        except OSError as exc:  # the series' folder or description not written
            return rx._refuse_write(request, exc)
        target = os.path.join(str(series.folder), instance_file_name(sop_uid))
        try:
            return self._store(series, target, sop_uid)
        except OSError as exc:
            return rx._refuse_write(request, exc)
        finally:
            with rx._lock:
                series.inflight -= 1

    def _store(self, series: OpenSeries, target: str, sop_uid: str) -> int:
        """Make the instance durable, then put it in its series folder.

        A small instance (its bytes still in memory) goes through the journal: one
        record flushed, then the file renamed into place without a sync (a crash
        before the next checkpoint is repaired from the record at start-up). A
        large one, or when the journal cannot take it: the file fdatasynced,
        renamed, the folder fsynced (two commits).
        """
        rx = self.rx
        assert self.path is not None
        ticket = None
        if self.head is not None and rx.journal is not None:
            relative = f"{series.folder.name}/{os.path.basename(target)}"
            ticket = rx.journal.append(relative, self.file_meta, self.head)
        if ticket is None:
            os.fdatasync(self.fd)
            if rx.journal is not None and os.path.exists(target):
                # A replacement: an earlier copy's journal record, not yet
                # checkpointed, would be replayed over this one after a crash.
                rx.journal.checkpoint()
        try:
            os.replace(self.path, target)
            self.path = None
            if ticket is None:
                fsync_dir(series.folder)
        except BaseException:
            if ticket is not None:
                rx.journal.abort(ticket)
            raise
        if ticket is not None:
            rx.journal.done(ticket)
        rx._stored(series, sop_uid, self.offset + self.size)
        return SUCCESS


def _identity_problem(
    uids: dict[str, str], request: StoreRequest
) -> tuple[int, str] | None:
    """Refuse UIDs Courier cannot keep exactly, or that are not the request's.

    As dcmtk's storescp: no SOP Class UID is 0xC210, one that differs from the
    C-STORE request's (SOP Class or Instance) is 0xA900. A UID with control or
    non-ASCII characters (a NUL, a newline) is 0xC210: no valid UID has them, and
    they would end up in file names, database rows and log lines.
    """
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                    "StudyInstanceUID"):  # fmt: skip
        if unprintable(uids[keyword]):
            return CANNOT_UNDERSTAND, (
                f"the dataset's {keyword} has control or non-ASCII characters"
            )
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not uids[keyword]:
            return CANNOT_UNDERSTAND, f"the dataset has no {keyword}"
    for keyword, requested in (("SOPClassUID", request.sop_class),
                               ("SOPInstanceUID", request.sop_instance)):  # fmt: skip
        if uids[keyword] != requested:
            return DOES_NOT_MATCH, (
                f"the dataset's {keyword} {uids[keyword]!r} is not the one in the "
                f"C-STORE request ({requested!r})"
            )
    return None


class SpoolInUse(RuntimeError):
    """Another receiver runs on this spool."""


def lock_spool(incoming: Path) -> int:
    """Take the spool for this receiver (an exclusive `flock` on its folder, freed
    when the process dies); raise `SpoolInUse` if another receiver has it.

    Two receivers on one spool would write into the same journal segments, each
    rewinding the other's, and adopt each other's open series.
    """
    fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolInUse(
            f"another receiver is running on the spool {incoming}: one receiver "
            "per spool (COURIER_SPOOL_DIR)"
        ) from None
    return fd


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
        bookkeeper: Bookkeeper | None = None,
        max_pdu: int = DEFAULT_MAX_PDU,
        max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
        limits: Limits | None = None,
        tick_seconds: float = 1.0,
        commitment_peers: dict[str, tuple[str, int]] | None = None,
        journal: bool = True,
    ):
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.incoming = Path(spool_dir) / "incoming"
        self.partial = self.incoming / PARTIAL_DIR
        # Partial file names: this receiver's prefix and a counter (O_EXCL: never
        # another's file).
        self.partial_prefix = f"{self.partial}/{secrets.token_hex(4)}-"
        self.partial_numbers = itertools.count()
        self.accepted = [a.strip() for a in accepted_calling_aets if a.strip()]
        self.min_free_bytes = min_free_bytes
        self.quiet_seconds = quiet_seconds
        self.bookkeeper = bookkeeper or Bookkeeper()
        self.max_pdu = max_pdu
        self.max_instance_bytes = max_instance_bytes
        self.limits = limits or Limits()
        self.tick_seconds = tick_seconds
        self.reports = commitment.ReportSender(commitment_peers or {}, ae_title)
        # One flush per small instance instead of two (`journal.py`); off: every
        # instance fdatasynced, renamed, its folder fsynced.
        self.journal = Journal(self.incoming) if journal else None
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str, str], OpenSeries] = {}
        self._refusals: list[str] = []
        self._free: tuple[float, int] = (-1.0, 0)
        self._server: StoreSCP | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._spool_lock = -1
        # Series whose row could not be written, logged once each.
        self._unsaved: set[tuple[str, str, str]] = set()
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
        return [
            *contexts,
            build_context(Verification),
            build_context(protocol.STORAGE_COMMITMENT, list(protocol.SYNTAXES)),
        ]

    def start(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._spool_lock = lock_spool(self.incoming)
        try:
            self._start()
        except BaseException:
            self._release_spool()
            raise

    def _start(self) -> None:
        self.partial.mkdir(exist_ok=True)
        self._remove_stale_partials()
        if self.journal is not None:
            self._recover(self.journal.open())
        for series in self.bookkeeper.restore(self.incoming):
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
            limits=self.limits,
            on_commit=self.handle_commit,
            on_undelivered=self.reports.deliver,
            on_report=self.handle_report,
        )
        self.port = self._server.server_address[1]
        self._server.start()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run_bookkeeping, name="receiver-bookkeeping", daemon=True
        )
        self._thread.start()
        limits = self.limits
        log.info(
            "event=receiver_started %s",
            log_fields(
                ae_title=self.ae_title,
                port=self.port,
                spool=self.incoming,
                accepted_calling=",".join(self.accepted) or "any",
                max_associations=limits.max_associations,
                max_per_peer=limits.max_per_peer,
                max_instance_bytes=self.max_instance_bytes,
            ),
        )

    def _recover(self, records: list[Record]) -> None:
        """Write again every journaled instance a crash may have lost or torn (the
        records after the last checkpoint: acknowledged, their files not yet
        synced), byte for byte, durably; then empty the journal."""
        restored = 0
        for record in records:
            parts = Path(record.path).parts
            # As the receiver names them: a series folder and a file in it, neither
            # hidden (not `.journal` or `.partial`), nothing absolute.
            if (
                len(parts) != 2
                or Path(record.path).is_absolute()
                or any(not p or p.startswith(".") or "\x00" in p for p in parts)
            ):
                log.error("event=journal_record_ignored %s",
                          log_fields(path=record.path, reason="not a spool path"))  # fmt: skip
                continue
            folder = self.incoming / parts[0]
            if not folder.is_dir():
                # Made durable before the instance was acknowledged: gone only if
                # someone removed it since; not made again.
                log.warning("event=journal_record_ignored %s",
                            log_fields(path=record.path, reason="series folder gone"))  # fmt: skip
                continue
            target = folder / parts[1]
            try:
                with open(target, "rb") as f:
                    if f.read(len(record.data) + 1) == record.data:
                        continue
            except FileNotFoundError:
                pass
            write_durably(target, record.data)
            restored += 1
        assert self.journal is not None
        if records:
            fd = os.open(self.incoming, os.O_RDONLY | os.O_DIRECTORY)
            try:
                syncfs(fd)
            finally:
                os.close(fd)
        self.journal.recovered()
        if records:
            log.info("event=journal_replayed %s",
                     log_fields(records=len(records), rewritten=restored))  # fmt: skip

    def _remove_stale_partials(self) -> None:
        """Partial files of a receiver that died mid-instance (never acknowledged)."""
        cutoff = time.time() - STALE_PARTIAL_SECONDS
        for part in self.partial.glob("*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.reports.stop()
        self.tick(final=True)
        if self.journal is not None:
            self.journal.close()
        self._release_spool()

    def _release_spool(self) -> None:
        if self._spool_lock >= 0:
            os.close(self._spool_lock)
            self._spool_lock = -1

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
            "event=association_rejected %s",
            log_fields(
                calling_aet=rejection.calling_aet,
                peer=rejection.address,
                reason=rejection.reason,
            ),
        )

    def handle_store(self, request: StoreRequest) -> IncomingInstance:
        return IncomingInstance(self, request)

    def handle_commit(self, request: protocol.Request) -> protocol.Report:
        """A modality's Storage Commitment request, decided from the spool."""
        with self._lock:
            open_instances = {
                uid: s.folder for s in self._open.values() for uid in s.sop_uids
            }
        report = commitment.evaluate(request, self.incoming, open_instances)
        log.info(
            "event=commitment_requested %s",
            log_fields(
                calling_aet=request.calling_aet,
                peer=request.address,
                transaction=request.transaction_uid,
                committed=len(report.committed),
                failed=len(report.failed),
            ),
        )
        return report

    def handle_report(self, report: protocol.Report, calling: str, address: str) -> int:
        """A peer's answer to Courier's own commitment request: kept by the
        bookkeeper; 0x0110 (the peer may send it again) if it cannot be; 0x0115 if
        it answers no transaction Courier asked that peer for (dropped)."""
        try:
            kept = self.bookkeeper.commitment_report(report, calling, address)
        except Exception:
            log.exception(
                "event=commitment_report_not_kept %s",
                log_fields(calling_aet=calling, transaction=report.transaction_uid),
            )
            return PROCESSING_FAILURE
        if not kept:
            # The bookkeeper logged the drop. PS3.4 J.3.3.1.3: the SCU answers
            # "the status applicable to the request"; of PS3.7 10.1.1.1.8's, a
            # Transaction UID that is not an active transaction of this AE title
            # (never asked for, no longer active after its report, J.3.3.1.2, or
            # another AE's) is "Invalid argument value" (0x0115): the event
            # information is inappropriate. Not 0x0110 (a passing failure: the
            # peer would send it again), and no "Refused: not authorized" exists
            # for N-EVENT-REPORT. The same status for an unknown UID and another
            # AE's: the answer does not tell a prober which UIDs exist.
            return protocol.INVALID_ARGUMENT_VALUE
        log.info(
            "event=commitment_report_received %s",
            log_fields(
                calling_aet=calling,
                peer=address,
                transaction=report.transaction_uid,
                committed=len(report.committed),
                failed=len(report.failed),
            ),
        )
        return SUCCESS

    def _stored(self, series: OpenSeries, sop_uid: str, size: int) -> None:
        now = datetime.now(UTC)
        with self._lock:
            replaced = sop_uid in series.sop_uids
            series.sop_uids.add(sop_uid)
            series.last_received = now
            series.last_instance_at = time.monotonic()
            series.bytes += size
            series.dirty = True
            self.stats["replaced" if replaced else "stored"] += 1

    def _space_short(self, incoming: int) -> int | None:
        """Free bytes on the spool disk if `incoming` more would leave less than
        `min_free_bytes`, else None. The disk is asked at most every half second;
        in between, what was written since is subtracted, so a burst cannot overrun
        the threshold by more than half a second of writes."""
        now = time.monotonic()
        with self._lock:
            checked_at, free = self._free
            fresh = now - checked_at < 0.5
            if fresh:
                free -= incoming
                self._free = (checked_at, free)
        if not fresh:
            try:
                free = shutil.disk_usage(self.incoming).free - incoming
            except OSError:
                free = 0
            with self._lock:
                self._free = (now, free)
        return free if free < self.min_free_bytes else None

    def _refuse_corrupt(self, request: StoreRequest, status: int, reason: str) -> int:
        with self._lock:
            self.stats["corrupt"] += 1
        log.warning(
            "event=instance_refused status=0x%04X %s",
            status,
            log_fields(
                calling_aet=request.calling_aet,
                peer=f"{request.address}:{request.port}",
                sop_instance=request.sop_instance,
                reason=reason,
            ),
        )
        return status

    def _refuse_full(self, request: StoreRequest, detail: str) -> int:
        return self._refuse(
            request,
            f"spool disk nearly full ({detail}, keeping {self.min_free_bytes} bytes "
            f"free): instances refused with 'out of resources'",
        )

    def _refuse_write(self, request: StoreRequest, exc: OSError) -> int:
        """Answer 'out of resources' for a failed write, recorded like a full disk."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return self._refuse_full(request, exc.strerror or str(exc))
        return self._refuse(
            request,
            f"cannot write to the spool ({exc}): instances refused with "
            f"'out of resources'",
        )

    def _refuse(self, request: StoreRequest, reason: str) -> int:
        log.error(
            "event=instance_refused status=0x%04X %s",
            OUT_OF_RESOURCES,
            log_fields(
                calling_aet=request.calling_aet,
                peer=f"{request.address}:{request.port}",
                sop_instance=request.sop_instance,
                reason=reason,
            ),
        )
        with self._lock:
            self.stats["refused"] += 1
            self._refusals.append(reason)
        return OUT_OF_RESOURCES

    def _series_for(self, uids: dict[str, str], request: StoreRequest) -> OpenSeries:
        calling, called = request.calling_aet, request.called_aet
        series_uid, study_uid = uids["SeriesInstanceUID"], uids["StudyInstanceUID"]
        key = series_key(series_uid, study_uid, calling, called)
        with self._lock:
            series = self._open.get(key)
            if series is not None:
                # Counted under the lock: the series is not closed while an
                # instance is being written into its folder.
                series.inflight += 1
                return series
            # Without a Series Instance UID: "no-series-uid.<study>.<calling>..."
            first = (
                safe_path_part(series_uid)
                if series_uid
                else f"{NO_SERIES_UID}.{safe_path_part(study_uid, 'no-study')}"
            )
            name = f"{first}.{safe_path_part(calling, 'none')}.{secrets.token_hex(4)}"
            series = OpenSeries(
                series_uid=series_uid,
                study_uid=study_uid,
                calling_aet=calling,
                called_aet=called,
                peer_address=f"{request.address}:{request.port}",
                folder=self.incoming / name,
            )
            # Made under the lock: a second association of the same series waits
            # for the folder and its description instead of racing to create them.
            try:
                series.folder.mkdir(parents=True)
                write_durably(
                    self.incoming / f"{name}{DESCRIPTION_SUFFIX}",
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
            if not series_uid:
                log.warning(
                    "event=series_without_uid %s",
                    log_fields(
                        calling_aet=calling,
                        study_uid=study_uid,
                        sop_instance=request.sop_instance,
                        reason="the instance has no Series Instance UID: kept with "
                        "the other instances of its study from this sender that "
                        "have none, as one series",
                        folder=series.folder,
                    ),
                )
            log.info(
                "event=series_started %s",
                log_fields(
                    series_uid=series.series_uid,
                    calling_aet=calling,
                    called_aet=called,
                    peer=series.peer_address,
                    folder=series.folder,
                ),
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
                    self.bookkeeper.heartbeat(self.info())
            except Exception:  # keep receiving even if the database is away
                log.exception("event=receiver_bookkeeping_failed")

    def info(self) -> dict:
        with self._lock:
            open_count = len(self._open)
            stats = dict(self.stats)
        server = self._server
        return {
            "ae_title": self.ae_title,
            "port": self.port,
            "open_series": open_count,
            **(server.counts() if server is not None else {}),
            **stats,
        }

    def tick(self, *, final: bool = False) -> list[OpenSeries]:
        """Save changed series, close the quiet ones; return the closed ones.

        One series that cannot be saved or closed (a value the database refuses)
        never holds up the others: it is logged and tried again on later ticks
        (saving) or left to the routing sweep (closing).
        """
        if self.journal is not None:
            # First: a series closed below is routed, and may be delivered and
            # removed; none of its instances may then come back from the journal.
            self.journal.checkpoint()
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
            unsaved = (self.bookkeeper.save(dirty) or []) if dirty else []
        except Exception:
            with self._lock:
                for s in dirty:
                    s.dirty = True
                for s in quiet:  # closed on a later tick, once saving works again
                    self._open.setdefault(s.key, s)
            raise
        self._note_unsaved(unsaved)
        if refusals:
            self.bookkeeper.refused(refusals[-1], len(refusals))
        closed = []
        for s in quiet:
            self._unsaved.discard(s.key)
            try:
                self.bookkeeper.close(s)
            except Exception:
                log.exception(
                    "event=series_close_failed %s",
                    log_fields(series_uid=s.series_uid, folder=s.folder),
                )
                continue
            closed.append(s)
            log.info(
                "event=series_complete %s",
                log_fields(
                    series_uid=s.series_uid,
                    calling_aet=s.calling_aet,
                    instances=s.instance_count,
                    folder=s.folder,
                ),
            )
        return closed

    def _note_unsaved(self, unsaved: list[OpenSeries]) -> None:
        with self._lock:
            for s in unsaved:
                s.dirty = True
                if s.key not in self._unsaved:
                    self._unsaved.add(s.key)
                    log.error(
                        "event=series_save_failed %s",
                        log_fields(series_uid=s.series_uid, folder=s.folder),
                    )

    def open_series(self) -> list[OpenSeries]:
        with self._lock:
            return list(self._open.values())
