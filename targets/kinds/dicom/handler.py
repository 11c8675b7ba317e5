"""DICOM targets: C-STORE a series over one or more associations; C-ECHO for Test.

Shaped like pynetdicom's `storescu`: propose only the presentation contexts the series
needs, check every status, always release or abort. Which contexts, and converting a
file whose syntax the peer refuses, are `targets.dicomnet.transcode`. The association
itself is `targets.dicomnet.scu.Association` (its own PDUs on a plain blocking
socket, file bytes sent as they are on disk), which is about four times faster than
pynetdicom's threaded `Association` (see that module and the README's Performance).

DICOM+TLS is this handler plus an SSL context: override `ssl_context()`.
"""

# Why this module is long: one kind's whole handler read top down: the send loop
# (parallel associations sharing one queue, per-instance failure after a hang or an
# abort), Test with its checks, and the Storage Commitment request after a send.
# Conversion lives in targets.dicomnet.transcode, commitment in ./commitment.py.

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

from targets.dicomnet import load_pydicom
from targets.dicomnet.commitment import Reference, Report
from targets.dicomnet.outgoing import RefusedFile, prepare
from targets.dicomnet.scu import (
    VERIFICATION,
    Association,
    LinkError,
    UserIdentity,
    connect,
    error_comment,
    propose,
    status_of,
)
from targets.dicomnet.status import WARNING as WARNING_STATUS
from targets.dicomnet.status import category, in_words
from targets.dicomnet.transcode import (
    CannotConvert,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    convert,
    plan_contexts,
)
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
    from targets.models import Target
    from targets.series import Instance, Series


def uid_name(uid: str) -> str:
    load_pydicom()  # only for a message: the send path imports no pydicom up front
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def store_status(status: int, rsp: dict[int, bytes]) -> tuple[str, str]:
    """Map a C-STORE status to an outcome status and a message in words."""
    if status == 0x0000:
        return SENT, ""
    words = in_words(status, "store", error_comment(rsp))
    if category(status) == WARNING_STATUS:
        return WARNING, f"warning: {words}"
    return FAILED, f"failed: {words}"


def user_identity(target: Target) -> UserIdentity | None:
    """The target's User Identity login, or None when it has no username."""
    if not target.username:
        return None
    return UserIdentity(target.username, str(target.password or ""))


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
    # An instance during which the peer hangs or aborts this many times is failed by
    # name, and the others go on over a new association (PEERS.md: Orthanc 1.10
    # sometimes never answers a C-STORE; some archives abort on one bad instance).
    STRIKES_PER_INSTANCE = 2
    # So many instances failed in a row that way (nothing stored in between) may
    # mean the target, not the instances, is broken: an instance the target stored
    # earlier in this send is stored again on a new association. If the target
    # takes it, the instances were at fault and the send goes on with the others;
    # if not (or nothing was stored yet), the send stops with an error: the rest
    # waits for the job's next attempt, and on its last each is failed by name
    # with that error (`dispatch.jobs.outcomes.finish`).
    MAX_FAILED_IN_A_ROW = 3

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
            identity=user_identity(t),
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
        """Send from `work` over one association; after a hang or an abort, go on
        over a new one.

        The instance being sent when the peer hung or aborted is tried again first;
        the second time it is failed by name and the others go on. `opened` is set
        after the first attempt to open; `wait_for` is waited for before it.
        """
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
                    work.mark_done(inst if outcome.status != FAILED else None)
                    inst = work.take()
            except LinkError as exc:
                assoc.abort()
                inst = self._after_link_error(
                    work, inst, exc, report, notes, (contexts, calling, called)
                )
                continue
            except BaseException:
                assoc.abort()
                raise
            assoc.release()

    def _after_link_error(
        self,
        work: _WorkQueue,
        inst: Instance,
        exc: LinkError,
        report: Callable[[Outcome], None],
        notes: list[str],
        how: tuple[list[tuple[str, list[str]]], str, str],
    ) -> Instance | None:
        """Account for a hang or an abort at `inst`; return what to send next.

        `how`: the contexts and AE titles, for an association to probe the target.
        """
        where = f"at instance {inst.sop_instance_uid}"
        strikes = work.strike(inst)
        if strikes < self.STRIKES_PER_INSTANCE:
            notes.append(
                f"{exc.message} {where} ({work.done} of {work.total} done): "
                "aborted, resumed on a new association"
            )
            return inst
        report(
            instance_outcome(
                inst,
                FAILED,
                f"{exc.message}, {strikes} times while this instance was being "
                "sent: failed, the others were sent on new associations",
            )
        )
        failed_in_a_row = work.mark_done(None, failed=True)
        if failed_in_a_row < self.MAX_FAILED_IN_A_ROW:
            return work.take()
        probe = work.stored
        if probe is not None and self._still_stores(probe, *how):
            notes.append(
                f"{failed_in_a_row} instances in a row failed with a hang or an "
                f"abort; the target stored {probe.sop_instance_uid} again on a new "
                "association: the instances, not the target, were at fault; the "
                "others were sent"
            )
            work.mark_done(probe, count=False)
            return work.take()
        raise TargetError(
            f"{exc.message} {where}; {failed_in_a_row} instances in a row failed "
            f"this way ({work.done} of {work.total} done)"
            + (
                ""
                if probe is None
                else f" and instance {probe.sop_instance_uid}, stored before, "
                "could not be stored again"
            )
            + ": the target, not the instances, seems broken; the rest was not sent"
        ) from exc

    def _still_stores(
        self,
        inst: Instance,
        contexts: list[tuple[str, list[str]]],
        calling: str,
        called: str,
    ) -> bool:
        """Whether the target stores `inst` (which it stored before) again, on a
        new association."""
        try:
            assoc = self.open(contexts, calling, called)
        except LinkError:
            return False
        try:
            outcome = self._store(assoc, inst)
        except LinkError:
            assoc.abort()
            return False
        except BaseException:
            assoc.abort()
            raise
        assoc.release()
        return outcome.status != FAILED

    def _store(self, assoc: Association, inst: Instance) -> Outcome:
        # One walk of the file before any of it is sent: a malformed file fails
        # here, by name, and the association goes on (targets.dicomnet.outgoing).
        try:
            outgoing = prepare(inst.path)
        except RefusedFile as exc:
            return instance_outcome(inst, FAILED, str(exc))
        cx = assoc.context_for(inst.sop_class_uid, inst.transfer_syntax)
        converted = None
        if cx is not None:
            try:
                rsp = assoc.c_store_file(
                    cx, inst.sop_class_uid, inst.sop_instance_uid, inst.path, outgoing
                )
            except RefusedFile as exc:
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
                converted = convert(inst.path, inst.transfer_syntax, offered)
            except CannotConvert as exc:
                return instance_outcome(inst, FAILED, f"cannot convert: {exc}")
            try:
                rsp = assoc.c_store_bytes(
                    converted.context,
                    inst.sop_class_uid,
                    inst.sop_instance_uid,
                    converted.data,
                )
            except RefusedFile as exc:
                return instance_outcome(inst, FAILED, str(exc))
        status, message = store_status(status_of(rsp), rsp)
        if converted is not None:
            # Lossy pixels sent decompressed are stored with a warning: the job
            # says so (as `dcmsend +dly` does it, silently).
            if converted.lossy and status == SENT:
                status = WARNING
            message = f"{converted.note}; {message}" if message else converted.note
        elif outgoing.note and status != FAILED:
            message = "; ".join(m for m in (outgoing.note, message) if m)
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
                    raise TargetError(f"C-ECHO failed: {in_words(status, 'echo')}")
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
        self._strikes: dict[str, int] = {}
        self._failed_in_a_row = 0
        self.total = len(instances)
        self.done = 0
        # The last instance the target stored in this send (a probe, see
        # `DicomHandler.MAX_FAILED_IN_A_ROW`).
        self.stored: Instance | None = None

    def take(self) -> Instance | None:
        with self._lock:
            return self._pending.popleft() if self._pending else None

    def mark_done(
        self, stored: Instance | None, *, failed: bool = False, count: bool = True
    ) -> int:
        """Count one instance as dealt with (`stored` if the target stored it);
        return how many in a row (this one included) failed because the peer hung
        or aborted. `count=False`: a probe, not one more instance."""
        with self._lock:
            self.done += count
            if stored is not None:
                self.stored = stored
            self._failed_in_a_row = self._failed_in_a_row + 1 if failed else 0
            return self._failed_in_a_row

    def strike(self, inst: Instance) -> int:
        """Count a hang or abort at `inst`; return how many it has had."""
        with self._lock:
            key = str(inst.path)
            self._strikes[key] = self._strikes.get(key, 0) + 1
            return self._strikes[key]

    def put_back(self, inst: Instance) -> None:
        with self._lock:
            self._pending.appendleft(inst)

    @property
    def left(self) -> int:
        return len(self._pending)


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
