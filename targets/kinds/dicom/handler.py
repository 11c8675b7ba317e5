"""DICOM targets: C-STORE a series over one or more associations; C-ECHO for Test.

Shaped like pynetdicom's `storescu`: propose only the presentation contexts the series
needs, check every status, always release or abort. The association itself is
`targets.dicomnet.scu.Association` (pynetdicom's PDUs on a plain blocking socket,
file bytes sent as they are on disk), which is about four times faster than
pynetdicom's threaded `Association` (see that module and the README's Performance).

DICOM+TLS is this handler plus an SSL context: override `ssl_context()`.
"""

# Why this module is long: one kind's whole handler read top down: the send loop
# (associations sharing one queue, resumes after a stall), conversion, Test with its
# checks, and the Storage Commitment request after a send.

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

from django.conf import settings
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from targets.dicomnet.commitment import Reference, Report
from targets.dicomnet.scu import (
    VERIFICATION,
    Association,
    Context,
    LinkError,
    UnreadableFile,
    connect,
    error_comment,
    propose,
    status_of,
)
from targets.dicomnet.sockets import enable_tcp_nodelay
from targets.kinds.base import (
    FAILED,
    SENT,
    WARNING,
    CheckReport,
    Handler,
    Outcome,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    instance_outcome,
)
from targets.kinds.dicom import commitment

if TYPE_CHECKING:
    from targets.series import Instance, Series

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
MAX_CONTEXTS = 128


def uid_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def plan_contexts(instances: Sequence[Instance]) -> list[list[tuple[str, list[str]]]]:
    """Group the presentation contexts a series needs into associations of <= 128.

    Per SOP class: one context per transfer syntax the files have (so the file bytes
    can go as they are), plus one with the uncompressed syntaxes the files lack, so a
    peer that refuses the files' own syntax can still get a converted copy.
    """
    syntaxes: dict[str, list[str]] = {}
    for inst in instances:
        own = syntaxes.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax not in own:
            own.append(inst.transfer_syntax)
    groups: list[list[tuple[str, list[str]]]] = [[]]
    for sop_class, own in syntaxes.items():
        contexts = [(sop_class, [ts]) for ts in own]
        fallback = [ts for ts in UNCOMPRESSED[:2] if ts not in own]
        if fallback:
            contexts.append((sop_class, fallback))
        if len(groups[-1]) + len(contexts) > MAX_CONTEXTS:
            groups.append([])
        groups[-1].extend(contexts)
    return [g for g in groups if g]


def store_status(status: int, rsp: dict[int, bytes]) -> tuple[str, str]:
    """Map a C-STORE status to an outcome status and a message in words."""
    category = code_to_category(status)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[1] or (
        "unknown status"
    )
    comment = error_comment(rsp)
    detail = f" ({comment})" if comment else ""
    if status == 0x0000:
        return SENT, ""
    if category == "Warning" or (status & 0xF000) == 0xB000:
        return WARNING, f"warning {status:#06x}: {meaning}{detail}"
    return FAILED, f"failed with status {status:#06x}: {meaning}{detail}"


def _to_target_error(exc: LinkError) -> TargetError:
    return TargetError(exc.message, permanent=exc.permanent)


@contextmanager
def link_errors() -> Iterator[None]:
    """Turn link and socket errors into `TargetError`s (for `CheckReport.check`)."""
    try:
        yield
    except LinkError as exc:
        raise _to_target_error(exc) from exc
    except OSError as exc:
        raise TargetError(str(exc.strerror or exc)) from exc


class DicomHandler(Handler):
    # How many times one send replaces a stalled or broken association by a new one
    # before giving up (PEERS.md: Orthanc 1.10 sometimes never answers a C-STORE).
    MAX_RESUMES = 3

    # -- hooks for DICOM+TLS ------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    def server_hostname(self) -> str | None:
        return self.target.host

    # -- common -------------------------------------------------------------------------
    def aets(self, context: SendContext | None = None) -> tuple[str, str]:
        """Return (calling, called) AE titles, honouring the pass-incoming switches."""
        t = self.target
        calling = t.calling_aet or settings.COURIER_AE_TITLE
        called = t.called_aet
        if context and t.pass_calling_aet and context.calling_aet:
            calling = context.calling_aet
        if context and t.pass_called_aet and context.called_aet:
            called = context.called_aet
        return calling, called

    def open(
        self,
        contexts: list[tuple[str, list[str]]],
        calling: str,
        called: str,
    ) -> Association:
        """Open an association proposing `contexts`; raise `LinkError`."""
        enable_tcp_nodelay()  # for any pynetdicom socket used beside ours
        t = self.target
        return Association.open(
            t.host,
            int(t.port),
            calling_aet=calling,
            called_aet=called,
            contexts=propose(contexts),
            connect_timeout=t.connect_timeout,
            acse_timeout=t.acse_timeout,
            dimse_timeout=t.dimse_timeout,
            max_pdu=t.max_pdu,
            ssl_context=self.ssl_context(),
            server_hostname=self.server_hostname(),
        )

    # -- sending ------------------------------------------------------------------------
    def send(
        self,
        series: Series,
        *,
        progress: ProgressCallback | None = None,
        context: SendContext | None = None,
        connections: int | None = None,
    ) -> SendResult:
        result, report = self.start(progress)
        if not series.instances:
            return result
        calling, called = self.aets(context)
        order = {str(inst.path): i for i, inst in enumerate(series.instances)}
        try:
            for contexts in plan_contexts(series.instances):
                classes = {c for c, _ in contexts}
                part = [i for i in series.instances if i.sop_class_uid in classes]
                self._send_parallel(
                    part, contexts, calling, called, report, result.notes, connections
                )
        finally:
            result.outcomes.sort(key=lambda o: order.get(o.path, 0))
        return result

    def _send_parallel(
        self,
        instances: list[Instance],
        contexts: list[tuple[str, list[str]]],
        calling: str,
        called: str,
        report: Callable[[Outcome], None],
        notes: list[str],
        connections: int | None = None,
    ) -> None:
        """Send over `connections` associations sharing one queue of instances.

        A shared queue rather than fixed shares: a fast association takes more, and
        when one cannot be opened (e.g. the peer allows fewer associations) the
        others send its share. Fails only if instances are left that none could send.
        """
        work = _WorkQueue(instances)
        n = self.connection_count(connections, len(instances))
        if n == 1:
            self._send_one(work, contexts, calling, called, report, notes)
            return
        # The others open only once the first association is up (or failed): a peer
        # that counts associations racily may refuse a burst of them all at once.
        first_up = threading.Event()
        with ThreadPoolExecutor(n, thread_name_prefix="dicom-send") as pool:
            futures = [
                pool.submit(
                    self._send_one,
                    work,
                    contexts,
                    calling,
                    called,
                    report,
                    notes,
                    opened=first_up if i == 0 else None,
                    wait_for=None if i == 0 else first_up,
                )
                for i in range(n)
            ]
        errors = [f.exception() for f in futures if f.exception()]
        if not errors:
            return
        if not work.left and all(isinstance(e, TargetError) for e in errors):
            notes.extend(
                f"one of {n} associations failed ({e}); the others sent its share"
                for e in errors
            )
            return
        first = errors[0]
        if isinstance(first, TargetError) and len(errors) > 1:
            raise TargetError(
                f"{first.message} ({len(errors)} of {n} associations failed)",
                permanent=all(getattr(e, "permanent", False) for e in errors),
            ) from first
        raise first

    def _send_one(
        self,
        work: _WorkQueue,
        contexts: list[tuple[str, list[str]]],
        calling: str,
        called: str,
        report: Callable[[Outcome], None],
        notes: list[str],
        *,
        opened: threading.Event | None = None,
        wait_for: threading.Event | None = None,
    ) -> None:
        """Send from `work` over one association; after a stall, resume on a new one.

        `opened` is set after the first attempt to open; `wait_for` is waited for
        before it.
        """
        resumes = 0
        if wait_for is not None:
            wait_for.wait()
        inst = work.take()
        while inst is not None:
            try:
                assoc = self.open(contexts, calling, called)
            except LinkError as exc:
                work.put_back(inst)
                raise _to_target_error(exc) from exc
            finally:
                if opened is not None:
                    opened.set()
            try:
                while inst is not None:
                    outcome = self._store(assoc, inst)
                    report(outcome)
                    work.mark_done()
                    inst = work.take()
            except LinkError as exc:
                assoc.abort()
                where = (
                    f"at instance {inst.sop_instance_uid} "
                    f"({work.done} of {work.total} done)"
                )
                if resumes >= self.MAX_RESUMES:
                    work.put_back(inst)
                    raise TargetError(
                        f"{exc.message} {where}; gave up after {resumes} new "
                        "associations"
                    ) from exc
                resumes += 1
                notes.append(
                    f"{exc.message} {where}: aborted, resumed on a new association"
                )
                continue
            except BaseException:
                assoc.abort()
                raise
            assoc.release()

    def _store(self, assoc: Association, inst: Instance) -> Outcome:
        cx = assoc.context_for(inst.sop_class_uid, inst.transfer_syntax)
        if cx is not None:
            try:
                rsp = assoc.c_store_file(
                    cx, inst.sop_class_uid, inst.sop_instance_uid, inst.path
                )
            except UnreadableFile as exc:
                return instance_outcome(inst, FAILED, str(exc))
        else:
            offered = assoc.contexts_for(inst.sop_class_uid)
            if not offered:
                return instance_outcome(
                    inst,
                    FAILED,
                    f"the target refused SOP class {uid_name(inst.sop_class_uid)} "
                    "(no presentation context accepted)",
                )
            try:
                cx, data = convert(inst, offered)
            except ValueError as exc:
                return instance_outcome(inst, FAILED, str(exc))
            rsp = assoc.c_store_bytes(
                cx, inst.sop_class_uid, inst.sop_instance_uid, data
            )
        status, message = store_status(status_of(rsp), rsp)
        return instance_outcome(inst, status, message)

    # -- storage commitment -------------------------------------------------------------
    def request_commitment(
        self,
        transaction_uid: str,
        references: Sequence[Reference],
        *,
        wait: float,
        poll: Callable[[], Report | None],
        context: SendContext | None = None,
    ) -> Report:
        # Courier's own Source AET even when the incoming one is passed on: the
        # target sends its report to the AE title that asked.
        aets = (
            self.target.calling_aet or settings.COURIER_AE_TITLE,
            self.aets(context)[1],
        )
        with link_errors():
            assoc = self.open([commitment.CONTEXT], *aets)
        return commitment.request(assoc, transaction_uid, references, wait, poll, *aets)

    # -- testing ------------------------------------------------------------------------
    def test(self) -> CheckReport:
        result = CheckReport()
        t = self.target
        host, port = t.host, int(t.port or 0)
        with result.check("Name resolution") as c, link_errors():
            c.message = resolve(host, port)
        if result.stopped:
            return result
        with result.check("Ping", informational=True) as c:
            c.ok, c.message = ping(host, t.connect_timeout)
        with result.check("TCP connect") as c, link_errors():
            connect(host, port, t.connect_timeout).close()
            c.message = f"connected to {host}:{port}"
        if result.stopped:
            return result
        calling, called = self.aets()
        assoc = None
        with result.check("Association") as c, link_errors():
            assoc = self.open(
                [
                    (VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]),
                    commitment.CONTEXT,
                ],
                calling,
                called,
            )
            limit = assoc.announced_max_pdu
            c.message = f"accepted: {calling} → {called}, " + (
                f"max PDU {limit:,} bytes" if limit else "no PDU size limit"
            )
        if assoc is None:
            return result
        try:
            with result.check("C-ECHO") as c, link_errors():
                start = time.perf_counter()
                status = assoc.c_echo()
                ms = (time.perf_counter() - start) * 1000
                if status != 0:
                    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", "unknown"))
                    raise TargetError(f"status {status:#06x}: {meaning[1]}")
                c.message = f"success, round trip {ms:.1f} ms"
                c.details = {"round_trip_ms": round(ms, 2)}
            commitment.check(result, assoc, bool(t.request_commitment))
        finally:
            if result.stopped:
                assoc.abort()
            else:
                assoc.release()
        return result


class _WorkQueue:
    """The instances still to send, shared by the associations of one send."""

    def __init__(self, instances: list[Instance]):
        self._pending = deque(instances)
        self._lock = threading.Lock()
        self.total = len(instances)
        self.done = 0

    def take(self) -> Instance | None:
        with self._lock:
            return self._pending.popleft() if self._pending else None

    def mark_done(self) -> None:
        with self._lock:
            self.done += 1

    def put_back(self, inst: Instance) -> None:
        with self._lock:
            self._pending.appendleft(inst)

    @property
    def left(self) -> int:
        return len(self._pending)


def convert(inst: Instance, offered: list[Context]) -> tuple[Context, bytes]:
    """Re-encode a file for an accepted uncompressed context; `ValueError` if not."""
    import pydicom
    from pynetdicom.dsutils import encode

    wanted = [cx for cx in offered if cx.transfer_syntax in UNCOMPRESSED]
    if not wanted:
        names = ", ".join(uid_name(cx.transfer_syntax) for cx in offered)
        raise ValueError(
            f"the target accepts this SOP class only as {names}; Courier does not "
            f"convert {uid_name(inst.transfer_syntax)} into it"
        )
    cx = wanted[0]
    ts = UID(cx.transfer_syntax)
    try:
        ds = pydicom.dcmread(inst.path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
        raise ValueError(
            f"cannot convert {uid_name(inst.transfer_syntax)} to {uid_name(ts)} "
            f"for the target: {exc}"
        ) from exc
    if data is None:
        raise ValueError(f"cannot encode the dataset as {uid_name(ts)}")
    return cx, data


def resolve(host: str, port: int) -> str:
    if not host:
        raise TargetError("no host configured")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TargetError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    return f"{host} is {', '.join(addresses)}"


_PING_TIME = re.compile(r"time[=<]([\d.]+)\s*ms")


def ping(host: str, timeout: float) -> tuple[bool, str]:
    """One ICMP echo via the system's `ping`; informational (ICMP is often blocked)."""
    binary = shutil.which("ping")
    if not binary:
        return False, "ping is not installed here (informational only)"
    wait = max(1, round(min(timeout, 5)))
    try:
        proc = subprocess.run(
            [binary, "-c", "1", "-n", "-W", str(wait), host],
            capture_output=True,
            text=True,
            timeout=wait + 2,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False, "no reply (many networks block ICMP; informational only)"
    found = _PING_TIME.search(proc.stdout)
    if proc.returncode == 0 and found:
        return True, f"reply in {float(found.group(1)):.2f} ms"
    if proc.returncode == 0:
        return True, "reply received"
    return False, "no reply (many networks block ICMP; informational only)"
