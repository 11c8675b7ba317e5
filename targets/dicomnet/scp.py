"""Accepting DICOM associations on plain blocking sockets: C-STORE and C-ECHO SCP,
and the Storage Commitment Push Model both ways (PS3.4 Annex J).

The receiving twin of `scu`, for the same reason: pynetdicom's acceptor hands
every PDU from a reader thread to a reactor thread through polled queues, and that
machinery, not the work, was most of the receiver's time per instance.

Built to stay open to every modality whatever one host does (issue 11):

- One acceptor thread owns the listening socket and every connection that has not
  yet sent its A-ASSOCIATE-RQ, in a selector: a connection costs no thread until it
  is an association, and must deliver its request within `associate_timeout` of
  connecting, however it trickles. The request is checked cheaply before anything
  decodes it (its size, at most 128 presentation contexts, AE titles without
  control characters, the calling AE title list, the limits) and refused with a
  10-byte A-ASSOCIATE-RJ.
- Only established associations count towards `max_associations`; connections per
  source address (waiting or established) are limited to `max_per_peer`; waiting
  connections to `max_pending`. So the threads are bounded: one per established
  association plus the acceptor.
- In an association each PDU must be complete within `pdu_timeout` of its first
  byte, and the peer may stay silent between PDUs for `idle_timeout` at most.
- A dataset is never held in memory: P-DATA fragments are handed to the store
  handler's `DatasetSink` as they arrive, in pieces of at most `CHUNK` bytes.

- Each presentation context is accepted in the transfer syntax the sender proposed
  first, except that Implicit VR Little Endian and Explicit VR Big Endian come last
  (as storescp prefers explicit VR little endian): a sender offering both gets
  Explicit VR Little Endian, and keeps its files' VRs.
- Storage Commitment: a modality's N-ACTION is answered, then the N-EVENT-REPORT
  (from `on_commit`) goes on the same association; if the association ends before
  the requester answered it, `on_undelivered` is told (to deliver it on a new one).
  An N-EVENT-REPORT a peer sends to Courier (the answer to Courier's own request)
  goes to `on_report`. Role selection is answered for the SOP classes accepted.

Only what a storage SCP needs: no asynchronous operations window, no extended
negotiation, no other DIMSE services (a peer sending one is aborted).
"""

# Why this module is long: the acceptor's state machine (association request
# limits, negotiation, PDU reassembly, C-STORE, C-ECHO and the commitment messages,
# timeouts per phase) is one loop per association; its parts only make sense
# together.

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext

from config.safetext import log_fields
from targets.dicomnet import commitment
from targets.dicomnet.commitment import (
    N_ACTION_RQ,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentError,
)
from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.dicomnet.scu import (
    ABORT,
    ASSOCIATE_RQ,
    COMMAND,
    LAST,
    MAX_PDU_READ,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ,
    VERIFICATION,
    LinkError,
    LinkTimeout,
    _command,
    _element,
    _us,
    parse_command,
)
from targets.dicomnet.sockets import _nodelay

log = logging.getLogger("courier.receiver")

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101

PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_ACTION = 0x0123

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
# Transfer syntaxes taken only when the sender offers nothing better in a context:
# implicit VR loses the VRs, big endian is retired (PS3.5 A.3).
_LAST_RESORT = {EXPLICIT_BE: 1, IMPLICIT_LE: 2}

# A-ASSOCIATE-RJ (result, source, reason) (PS3.8 9.3.4)
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_CALLING_AET = (0x01, 0x01, 0x03)
RJ_CALLED_AET = (0x01, 0x01, 0x07)
RJ_TOO_MANY = (0x02, 0x03, 0x02)

# Pieces in which a dataset reaches its sink: memory per association, whatever the
# instance's or the PDU's size.
CHUNK = 256 * 1024
# What the receiver announces as its maximum PDU length: a PDU this size crosses a
# slow (256 kbit/s) link well within the default per-PDU deadline.
DEFAULT_MAX_PDU = 256 * 1024
# An A-ASSOCIATE-RQ with 128 contexts of every transfer syntax is about 130 KB.
MAX_ASSOCIATE_RQ = 256 * 1024
MAX_CONTEXTS = 128  # context ids are the odd numbers 1-255 (PS3.8 9.3.2.2)
MAX_SYNTAXES_PER_CONTEXT = 64
MAX_COMMAND_SET = 64 * 1024
# Refused connections are summed up in one log line per peer and reason this often.
REFUSAL_LOG_SECONDS = 10.0


@dataclass(frozen=True)
class Limits:
    """How much of the intake one peer, or everyone together, may hold.

    `max_associations`: established associations at once (waiting connections do
    not count). `max_per_peer`: connections from one source address, waiting or
    established. `max_pending`: connections still waiting for their
    A-ASSOCIATE-RQ. `associate_timeout`: seconds from connecting to a complete
    A-ASSOCIATE-RQ. `pdu_timeout`: seconds from a PDU's first byte to its last.
    `idle_timeout`: seconds an association may send nothing. `backlog`: the listen
    queue of connections the kernel has accepted and Courier not yet taken.
    """

    max_associations: int = 64
    max_per_peer: int = 16
    max_pending: int = 256
    associate_timeout: float = 10.0
    pdu_timeout: float = 30.0
    idle_timeout: float = 60.0
    backlog: int = 256


@dataclass
class StoreRequest:
    """One C-STORE as its command announced it; the dataset follows into a sink."""

    calling_aet: str
    called_aet: str
    address: str
    port: int
    transfer_syntax: str
    sop_class: str
    sop_instance: str


class DatasetSink(Protocol):
    """Where one C-STORE's dataset goes, fragment by fragment."""

    def write(self, data: bytes | memoryview) -> None:
        """Take the next piece (only valid during the call)."""

    def finish(self) -> int:
        """The dataset is complete: return the C-STORE status to answer."""

    def discard(self) -> None:
        """The association ended before the dataset did: drop what was taken."""


@dataclass
class Rejection:
    calling_aet: str
    address: str
    reason: str


class StoreSCP:
    """Listen on `(host, port)`; one thread per association. `start()`, `shutdown()`.

    `on_store(request) -> DatasetSink` is called in the association's thread when
    a C-STORE command has arrived; the sink gets the dataset and decides the
    status. An exception in it answers 0x0110 (processing failure).
    `on_rejected(rejection)` is told of every refused association request.

    Storage Commitment (only with a context for it in `contexts`):
    `on_commit(request) -> Report` decides a modality's request;
    `on_undelivered(request, report)` gets a report the requester did not take on
    the association it asked on; `on_report(report, calling_aet, address) ->
    status` takes an N-EVENT-REPORT sent to Courier. All run in the association's
    thread; an exception answers 0x0110.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        contexts: Sequence[PresentationContext],
        on_store: Callable[[StoreRequest], DatasetSink],
        on_rejected: Callable[[Rejection], None] = lambda r: None,
        accepted_calling_aets: Sequence[str] = (),
        max_pdu: int = DEFAULT_MAX_PDU,
        limits: Limits | None = None,
        on_commit: Callable[[commitment.Request], commitment.Report] | None = None,
        on_undelivered: Callable[[commitment.Request, commitment.Report], None]
        | None = None,
        on_report: Callable[[commitment.Report, str, str], int] | None = None,
    ):
        self.contexts = list(contexts)
        self.supported = {
            str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax}
            for cx in contexts
        }
        self.on_store = on_store
        self.on_commit = on_commit
        self.on_undelivered = on_undelivered or (lambda request, report: None)
        self.on_report = on_report
        self.on_rejected = on_rejected
        self.accepted = list(accepted_calling_aets)
        self.max_pdu = max_pdu
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()  # established associations
        self._per_peer: Counter[str] = Counter()  # waiting + established
        self._refused: Counter[tuple[str, str]] = Counter()
        self._stopping = threading.Event()
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server(
            (host, port), family=family, backlog=self.limits.backlog
        )
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._accept_loop, name="dicom-accept", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        """Stop listening and abort the associations still open."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(10)
        else:
            self._listener.close()
        with self._lock:
            active = list(self._active)
        for sock in active:
            _send_abort(sock)
            # Wakes the association's thread from its read; it then closes.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._wake_r.close()
        self._wake_w.close()

    def counts(self) -> dict[str, int]:
        """Established associations and connections per peer (for status and tests)."""
        with self._lock:
            return {"associations": len(self._active), "peers": len(self._per_peer)}

    # -- the acceptor: connections until their A-ASSOCIATE-RQ is complete -----------

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        pending: dict[socket.socket, _Waiting] = {}
        next_report = time.monotonic() + REFUSAL_LOG_SECONDS
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                soonest = min((w.deadline for w in pending.values()), default=None)
                timeout = REFUSAL_LOG_SECONDS if soonest is None else soonest - now
                events = sel.select(max(0.0, min(timeout, next_report - now)))
                for key, _ in events:
                    try:
                        if key.fileobj is self._listener:
                            self._accept_new(sel, pending)
                        elif key.fileobj in pending:  # not dropped earlier in the batch
                            self._read_request(sel, pending, key.fileobj)
                    except Exception:  # one connection never stops the acceptor
                        log.exception("event=acceptor_error")
                        if key.fileobj in pending:
                            self._drop(sel, pending, key.fileobj)
                            key.fileobj.close()
                now = time.monotonic()
                for sock, waiting in list(pending.items()):
                    if waiting.deadline <= now:
                        self._drop(sel, pending, sock)
                        self._count_refusal(
                            waiting.address,
                            "no complete association request within "
                            f"{self.limits.associate_timeout:g} s of connecting",
                        )
                        _send_abort(sock)
                        sock.close()
                if now >= next_report:
                    self._report_refusals()
                    next_report = now + REFUSAL_LOG_SECONDS
        except Exception:
            log.exception("event=acceptor_failed")
        finally:
            for sock in list(pending):
                self._drop(sel, pending, sock)
                sock.close()
            sel.close()
            self._listener.close()
            self._report_refusals()

    def _accept_new(self, sel, pending: dict[socket.socket, _Waiting]) -> None:
        limits = self.limits
        for _ in range(64):  # take a burst, then look at the others again
            try:
                sock, client = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS):
                    # Out of file descriptors: leave the rest in the backlog a moment.
                    self._count_refusal("-", f"cannot accept: {exc.strerror}")
                    time.sleep(0.05)
                return
            address = client[0]
            with self._lock:
                peer_count = self._per_peer[address]
                if peer_count < limits.max_per_peer:
                    self._per_peer[address] += 1
            if peer_count >= limits.max_per_peer:
                self._count_refusal(
                    address, f"more than {limits.max_per_peer} connections from it"
                )
                sock.close()
                continue
            if len(pending) >= limits.max_pending:
                # Take every request that has arrived meanwhile, then make room by
                # dropping the connection that has waited longest: a real peer
                # sends its request within milliseconds of connecting, so the
                # oldest waiting ones are the slow ones.
                self._read_arrived(sel, pending)
            if len(pending) >= limits.max_pending:
                oldest = next(iter(pending))
                evicted = pending[oldest]
                self._drop(sel, pending, oldest)
                self._count_refusal(
                    evicted.address,
                    f"dropped to make room ({limits.max_pending} connections waiting "
                    "for their association request)",
                )
                oldest.close()
            sock.setblocking(False)
            _nodelay(sock)
            pending[sock] = _Waiting(
                sock, client, time.monotonic() + limits.associate_timeout
            )
            sel.register(sock, selectors.EVENT_READ)

    def _read_arrived(self, sel, pending: dict[socket.socket, _Waiting]) -> None:
        for key, _ in sel.select(0):
            if key.fileobj in pending:
                self._read_request(sel, pending, key.fileobj)

    def _drop(self, sel, pending: dict, sock: socket.socket) -> None:
        waiting = pending.pop(sock)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(sock)
        self._release_peer(waiting.address)

    def _release_peer(self, address: str) -> None:
        with self._lock:
            self._per_peer[address] -= 1
            if self._per_peer[address] <= 0:
                del self._per_peer[address]

    def _read_request(self, sel, pending: dict, sock: socket.socket) -> None:
        waiting = pending[sock]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sel, pending, sock)
            sock.close()
            return
        waiting.buffer += data
        if len(waiting.buffer) < 6:
            return
        pdu_type, _, length = struct.unpack_from(">BBI", waiting.buffer)
        if pdu_type != ASSOCIATE_RQ or length > MAX_ASSOCIATE_RQ:
            self._drop(sel, pending, sock)
            self._count_refusal(
                waiting.address,
                "not an association request"
                if pdu_type != ASSOCIATE_RQ
                else f"association request of {length} bytes",
            )
            _send_abort(sock)
            sock.close()
            return
        if len(waiting.buffer) < 6 + length:
            return
        # Complete: from here on the connection leaves the acceptor either way.
        pending.pop(sock)
        sel.unregister(sock)
        request = bytes(waiting.buffer[: 6 + length])
        leftover = bytes(waiting.buffer[6 + length :])
        self._dispatch(sock, waiting.client, request, leftover)

    def _dispatch(
        self, sock: socket.socket, client: tuple, request: bytes, leftover: bytes
    ) -> None:
        """Refuse cheaply, or start the association's thread with a reserved slot."""
        address = client[0]
        try:
            problem = check_associate_rq(request)
            calling, called = _ae_titles(request)
            if problem is None and self.accepted and calling not in self.accepted:
                problem = (RJ_CALLING_AET, "calling AE title not in the accepted list")
            if problem is None:
                with self._lock:
                    if len(self._active) >= self.limits.max_associations:
                        problem = (
                            RJ_TOO_MANY,
                            f"{self.limits.max_associations} associations are open "
                            "(the limit)",
                        )
                    else:
                        self._active.add(sock)
        except Exception:  # never let one request stop the acceptor
            log.exception("event=association_request_failed")
            problem, calling = (RJ_NO_REASON, "internal error"), ""
        if problem is not None:
            why, reason = problem
            _send_reject(sock, why)
            sock.close()
            self._release_peer(address)
            if why == RJ_TOO_MANY:
                self._count_refusal(address, reason)
            else:
                self.on_rejected(Rejection(calling, address, reason))
            return
        thread = threading.Thread(
            target=self._serve,
            args=(sock, client, request, leftover),
            name=f"dicom-assoc-{address}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: refuse, as for too many
            with self._lock:
                self._active.discard(sock)
            _send_reject(sock, RJ_TOO_MANY)
            sock.close()
            self._release_peer(address)
            self._count_refusal(address, "no thread could be started")

    def _count_refusal(self, address: str, reason: str) -> None:
        with self._lock:
            self._refused[(address, reason)] += 1

    def _report_refusals(self) -> None:
        """One line per peer and reason: a flood of connections is not a log flood."""
        with self._lock:
            refused, self._refused = self._refused, Counter()
        for (address, reason), count in refused.items():
            log.warning(
                "event=connections_refused %s",
                log_fields(peer=address, count=count, reason=reason),
            )

    # -- one association, in its own thread ----------------------------------------

    def _serve(
        self, sock: socket.socket, client: tuple, request: bytes, leftover: bytes
    ) -> None:
        peer = f"{client[0]}:{client[1]}"
        try:
            sock.setblocking(True)
            _Association(self, sock, client, leftover).run(request)
        except (TimeoutError, LinkError) as exc:
            # A silent or trickling peer, or bytes that are not DICOM: abort, as
            # PS3.8 9.1.6 asks.
            log.warning(
                "event=association_aborted %s", log_fields(peer=peer, reason=str(exc))
            )
            _send_abort(sock)
        except OSError as exc:
            log.info("event=association_lost %s", log_fields(peer=peer, error=str(exc)))
        except Exception:
            log.exception("event=association_failed %s", log_fields(peer=peer))
            _send_abort(sock)
        finally:
            self._free_slot(sock, client[0])
            with contextlib.suppress(OSError):
                sock.close()

    def _free_slot(self, sock: socket.socket, address: str) -> None:
        """The association no longer counts towards the limits (once)."""
        with self._lock:
            if sock not in self._active:
                return
            self._active.discard(sock)
        self._release_peer(address)


@dataclass
class _Waiting:
    sock: socket.socket
    client: tuple
    deadline: float
    buffer: bytearray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.buffer = bytearray()

    @property
    def address(self) -> str:
        return self.client[0]


def _printable(raw: bytes) -> bool:
    return all(0x20 <= b < 0x7F and b != 0x5C for b in raw)


def _ae_titles(request: bytes) -> tuple[str, str]:
    """(calling, called) AE titles of an A-ASSOCIATE-RQ, or '' where unreadable."""
    if len(request) < 74:
        return "", ""

    def ae(raw: bytes) -> str:
        raw = raw.rstrip(b" \x00").lstrip(b" ")
        return raw.decode("ascii") if _printable(raw) else ""

    return ae(request[26:42]), ae(request[10:26])


def check_associate_rq(request: bytes) -> tuple[tuple[int, int, int], str] | None:
    """Find what makes an A-ASSOCIATE-RQ refusable without decoding it fully.

    Return (A-ASSOCIATE-RJ reason, words) or None. Walks only the item headers,
    so thousands of presentation contexts cost microseconds, not an AC listing
    each of them.
    """
    if len(request) < 74:
        return RJ_NO_REASON, "association request too short"
    for start, why, name in ((26, RJ_CALLING_AET, "calling"), (10, RJ_CALLED_AET,
                                                               "called")):  # fmt: skip
        raw = request[start : start + 16].rstrip(b" \x00").lstrip(b" ")
        if not raw or not _printable(raw):
            return why, f"the {name} AE title is empty or has control characters"
    contexts, pos, end = 0, 74, len(request)
    while pos < end:
        if pos + 4 > end:
            return RJ_NO_REASON, "malformed association request"
        item_type, _, length = struct.unpack_from(">BBH", request, pos)
        body, pos = pos + 4, pos + 4 + length
        if pos > end:
            return RJ_NO_REASON, "malformed association request"
        if item_type == 0x20:
            contexts += 1
            if contexts > MAX_CONTEXTS:
                return RJ_NO_REASON, f"more than {MAX_CONTEXTS} presentation contexts"
            syntaxes, sub = 0, body + 4
            while sub + 4 <= pos:
                sub_type, _, sub_length = struct.unpack_from(">BBH", request, sub)
                syntaxes += sub_type == 0x40
                sub += 4 + sub_length
            if sub != pos:
                return RJ_NO_REASON, "malformed presentation context"
            if syntaxes > MAX_SYNTAXES_PER_CONTEXT:
                return RJ_NO_REASON, (
                    f"more than {MAX_SYNTAXES_PER_CONTEXT} transfer syntaxes in one "
                    "presentation context"
                )
    return None


class _Idle(LinkTimeout):
    """The peer sent nothing for the idle limit, between PDUs."""


class _Reader:
    """An association's socket: the per-PDU deadline and the idle limit, no copies
    of large values (they go from one reusable buffer to the sink)."""

    def __init__(self, sock: socket.socket, leftover: bytes, limits: Limits):
        self.sock = sock
        self.pending = bytearray(leftover)
        self.chunk = bytearray(CHUNK)
        self.view = memoryview(self.chunk)
        self.pdu_timeout = limits.pdu_timeout
        self.idle_timeout = limits.idle_timeout
        self.deadline: float | None = None

    def start_pdu(self) -> None:
        """A new PDU: its clock starts with its first byte (now, if already here)."""
        self.deadline = time.monotonic() + self.pdu_timeout if self.pending else None

    def _receive(self, limit: int) -> int:
        if self.deadline is None:
            self.sock.settimeout(self.idle_timeout)
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._late()
            self.sock.settimeout(left)
        try:
            got = self.sock.recv_into(self.chunk, limit)
        except TimeoutError:
            if self.deadline is None:
                raise _Idle(
                    f"nothing received for {self.idle_timeout:g} s (the idle limit)"
                ) from None
            raise self._late() from None
        if not got:
            raise ConnectionResetError("the peer closed the connection")
        if self.deadline is None:
            self.deadline = time.monotonic() + self.pdu_timeout
        return got

    def _late(self) -> LinkTimeout:
        return LinkTimeout(
            f"a PDU was not complete within {self.pdu_timeout:g} s of its first byte"
        )

    def exact(self, n: int) -> bytes:
        while len(self.pending) < n:
            got = self._receive(CHUNK)
            self.pending += self.view[:got]
        out = bytes(self.pending[:n])
        del self.pending[:n]
        return out

    def stream(self, n: int, write: Callable[[bytes | memoryview], None]) -> None:
        """Pass the next `n` bytes to `write`, at most `CHUNK` at a time."""
        if self.pending:
            take = min(n, len(self.pending))
            write(bytes(self.pending[:take]))
            del self.pending[:take]
            n -= take
        while n:
            got = self._receive(min(n, CHUNK))
            write(self.view[:got])
            n -= got


class _Message:
    """A message whose dataset is arriving: the sink, kept from raising.

    `respond`: whether the message is a request to answer (a response Courier
    receives, e.g. an N-EVENT-REPORT-RSP with a dataset, is not answered).
    """

    def __init__(
        self,
        cmd: dict[int, bytes],
        context_id: int,
        sink: DatasetSink,
        *,
        respond: bool = True,
    ):
        self.cmd = cmd
        self.context_id = context_id
        self.sink = sink
        self.respond = respond
        self.failed = False

    def write(self, data: bytes | memoryview) -> None:
        if self.failed:
            return
        try:
            self.sink.write(data)
        except Exception:
            log.exception("event=store_handler_failed")
            self.failed = True
            self.discard()

    def finish(self) -> int:
        if self.failed:
            return PROCESSING_FAILURE
        try:
            return self.sink.finish()
        except Exception:
            log.exception("event=store_handler_failed")
            self.discard()
            return PROCESSING_FAILURE

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.sink.discard()


class _Refusing:
    """A sink for a message that could not even start: answers `status`."""

    def __init__(self, status: int = PROCESSING_FAILURE):
        self.status = status

    def write(self, data: bytes | memoryview) -> None:
        pass

    def finish(self) -> int:
        return self.status

    def discard(self) -> None:
        pass


class _Collected:
    """A small dataset (a commitment request or report) kept in memory, at most
    `commitment.MAX_DATASET` bytes; `finish()` hands it to `done` for the status."""

    def __init__(self, done: Callable[[bytes], int]):
        self.done = done
        self.data: bytearray | None = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        if self.data is not None:
            self.data += data
            if len(self.data) > commitment.MAX_DATASET:
                self.data = None

    def finish(self) -> int:
        if self.data is None:
            log.warning("event=commitment_dataset_too_large")
            return PROCESSING_FAILURE
        return self.done(bytes(self.data))

    def discard(self) -> None:
        self.data = None


_PDV = struct.Struct(">IBB")


def negotiate(
    proposed: Sequence[PresentationContext],
    supported: dict[str, set[str]],
    roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
) -> tuple[list[PresentationContext], list[SCP_SCU_RoleSelectionNegotiation]]:
    """The acceptor's answer to proposed contexts: one result per context (PS3.8
    9.3.3.2), and the role selection replies (PS3.7 D.3.3.4).

    A context takes the first transfer syntax the requestor listed that Courier
    supports, Implicit VR Little Endian and Explicit VR Big Endian only when it
    listed nothing else (`_LAST_RESORT`). Roles: a requestor may act as SCU of
    every SOP class accepted, and as SCP only of the Storage Commitment Push
    Model (it sends Courier the reports of Courier's own requests).
    """
    results = []
    for rq in proposed:
        cx = PresentationContext()
        cx.context_id = rq.context_id
        cx.abstract_syntax = rq.abstract_syntax
        offered = [str(ts) for ts in rq.transfer_syntax]
        ours = supported.get(str(rq.abstract_syntax))
        if ours is None:
            cx.result, cx.transfer_syntax = 0x03, offered[:1]  # abstract syntax
        else:
            usable = [ts for ts in offered if ts in ours]
            if usable:
                best = min(
                    range(len(usable)),
                    key=lambda i: (_LAST_RESORT.get(usable[i], 0), i),
                )
                cx.result, cx.transfer_syntax = 0x00, [usable[best]]
            else:
                cx.result, cx.transfer_syntax = 0x04, offered[:1]  # syntaxes
        results.append(cx)
    replies = []
    accepted = {str(cx.abstract_syntax) for cx in results if cx.result == 0}
    for item in roles:
        uid = str(item.sop_class_uid)
        if uid not in accepted:
            continue
        reply = SCP_SCU_RoleSelectionNegotiation()
        reply.sop_class_uid = uid
        reply.scu_role = bool(item.scu_role)
        reply.scp_role = bool(item.scp_role) and uid == STORAGE_COMMITMENT
        replies.append(reply)
    return results, replies


class _Association:
    def __init__(
        self, scp: StoreSCP, sock: socket.socket, client: tuple, leftover: bytes
    ):
        self.scp = scp
        self.sock = sock
        self.address, self.port = client[0], client[1]
        self.reader = _Reader(sock, leftover, scp.limits)
        self.calling = self.called = ""
        self.contexts: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.abstract: dict[int, str] = {}
        self.peer_max_pdu = 0
        self._msg_id = 0
        # Commitment reports sent on this association, by message id, until the
        # requester answers; a report to send once the N-ACTION is answered.
        self.reports: dict[int, tuple[commitment.Request, commitment.Report]] = {}
        self.report_due: tuple[commitment.Request, commitment.Report] | None = None

    def run(self, request: bytes) -> None:
        scp = self.scp
        self.sock.settimeout(scp.limits.pdu_timeout)
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(request)
            primitive = rq.to_primitive()
        except Exception:  # pynetdicom raises assorted errors on bad bytes
            self.reject(RJ_NO_REASON, "malformed association request")
            return
        self.calling = str(primitive.calling_ae_title).strip()
        self.called = str(primitive.called_ae_title).strip()
        self.peer_max_pdu = primitive.maximum_length_received or 0
        roles = [
            item
            for item in primitive.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        ]
        results, replies = negotiate(
            primitive.presentation_context_definition_list, scp.supported, roles
        )
        self.contexts = {
            cx.context_id: str(cx.transfer_syntax[0])
            for cx in results
            if cx.result == 0 and cx.transfer_syntax
        }
        self.abstract = {
            cx.context_id: str(cx.abstract_syntax)
            for cx in primitive.presentation_context_definition_list
        }
        ac = A_ASSOCIATE_AC(self._accept(primitive, results, replies))
        self.sock.sendall(ac.encode())
        try:
            self.messages()
        finally:
            undelivered = list(self.reports.values())
            if self.report_due is not None:
                undelivered.append(self.report_due)
            for commit_request, report in undelivered:
                try:
                    scp.on_undelivered(commit_request, report)
                except Exception:
                    log.exception("event=commitment_handler_failed")

    def _accept(self, rq: A_ASSOCIATE, results: list, roles: list) -> A_ASSOCIATE:
        ac = A_ASSOCIATE()
        ac.application_context_name = rq.application_context_name
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.scp.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, impl_uid, impl_version, *roles]
        return ac

    def reject(self, why: tuple[int, int, int], reason: str) -> None:
        _send_reject(self.sock, why)
        self.scp.on_rejected(Rejection(self.calling, self.address, reason))

    def messages(self) -> None:
        """Serve DIMSE messages until the peer releases or aborts."""
        reader = self.reader
        command = bytearray()
        message: _Message | None = None  # a message waiting for its dataset
        try:
            while True:
                reader.start_pdu()
                pdu_type, _, length = struct.unpack(">BBI", reader.exact(6))
                if pdu_type == P_DATA_TF:
                    if length > MAX_PDU_READ:
                        raise LinkError(f"a P-DATA PDU of {length} bytes")
                    message = self._p_data(length, command, message)
                elif pdu_type == RELEASE_RQ and length == 4:
                    reader.exact(4)
                    # Free before answering: the peer may associate again at once.
                    self.scp._free_slot(self.sock, self.address)
                    self._send(struct.pack(">BBIxxxx", RELEASE_RP, 0, 4))
                    return
                elif pdu_type == ABORT and length == 4:
                    return
                else:
                    raise LinkError(
                        f"unexpected PDU type 0x{pdu_type:02X} of {length} bytes"
                    )
        except _Idle as exc:
            if message is not None or command:
                raise  # silent in the middle of a message: aborted
            log.info(
                "event=association_idle %s",
                log_fields(calling_aet=self.calling, peer=self.address, reason=exc),
            )
            self.release()
        finally:
            if message is not None:
                message.discard()

    def release(self) -> None:
        """End an idle association with A-RELEASE, as its acceptor (PS3.8 9.2.7).

        Courier sends A-RELEASE-RQ and waits (a PDU's time at most) for the peer's
        A-RELEASE-RP. Release collision: if the peer's own A-RELEASE-RQ crosses
        Courier's, the acceptor waits for the requestor's A-RELEASE-RP first
        (Sta10) and then answers with its own (Sta12, AR-4), never an abort.
        P-DATA still arriving is read and dropped: the association is ending.
        """
        reader = self.reader
        self.scp._free_slot(self.sock, self.address)
        self._send(struct.pack(">BBIxxxx", RELEASE_RQ, 0, 4))
        reader.idle_timeout = reader.pdu_timeout  # the ARTIM timer
        collided = False
        while True:
            reader.start_pdu()
            pdu_type, _, length = struct.unpack(">BBI", reader.exact(6))
            if pdu_type == P_DATA_TF and length <= MAX_PDU_READ:
                reader.stream(length, _drop)
                continue
            if length != 4 or pdu_type not in (RELEASE_RQ, RELEASE_RP, ABORT):
                raise LinkError(
                    f"unexpected PDU type 0x{pdu_type:02X} of {length} bytes "
                    "while releasing"
                )
            reader.exact(4)
            if pdu_type == RELEASE_RQ:
                collided = True
                continue
            if pdu_type == RELEASE_RP and collided:
                self._send(struct.pack(">BBIxxxx", RELEASE_RP, 0, 4))
            return

    def _p_data(
        self, length: int, command: bytearray, message: _Message | None
    ) -> _Message | None:
        """Read one P-DATA-TF PDU's values; return the message still in progress."""
        reader, remaining = self.reader, length
        while remaining:
            if remaining < 6:
                raise LinkError("a P-DATA PDU with a truncated value item")
            item_length, context_id, control = _PDV.unpack(reader.exact(6))
            size = item_length - 2
            remaining -= 6
            if size < 0 or size > remaining:
                raise LinkError("a P-DATA value item longer than its PDU")
            remaining -= size
            if context_id not in self.contexts:
                raise LinkError(f"presentation context {context_id} not accepted")
            if control & COMMAND:
                if message is not None:
                    raise LinkError("a command before the previous dataset ended")
                if len(command) + size > MAX_COMMAND_SET:
                    raise LinkError("a command set larger than 64 KiB")
                command += reader.exact(size)
                if control & LAST:
                    cmd = parse_command(bytes(command))
                    command.clear()
                    message = self._begin(cmd, context_id)
                continue
            if message is None or context_id != message.context_id:
                raise LinkError("a dataset without its command")
            if size:
                reader.stream(size, message.write)
            if control & LAST:
                done, message = message, None
                self._answer(done)
        return message

    def _answer(self, message: _Message) -> None:
        status = message.finish()
        if message.respond:
            self._respond(message.cmd, message.context_id, status)
        if self.report_due is not None:
            self._send_report()

    def _begin(self, cmd: dict[int, bytes], context_id: int) -> _Message | None:
        """A whole command set: answer it, or return the message awaiting data."""
        field = _u16(cmd.get(0x0100))
        has_dataset = _u16(cmd.get(0x0800)) != NO_DATASET
        if field == C_ECHO_RQ and not has_dataset:
            self._respond(cmd, context_id, 0x0000)
            return None
        if field == C_STORE_RQ:
            sink = self._store_sink(cmd, context_id)
        elif field == N_EVENT_REPORT_RSP:
            self._report_answered(cmd)
            sink = _Refusing()
        elif (
            field in (N_ACTION_RQ, N_EVENT_REPORT_RQ)
            and self.abstract.get(context_id) == STORAGE_COMMITMENT
        ):
            sink = self._commitment_sink(field, cmd, context_id, has_dataset)
        else:
            raise LinkError(f"unsupported DIMSE command 0x{field or 0:04X}")
        message = _Message(cmd, context_id, sink, respond=field != N_EVENT_REPORT_RSP)
        if has_dataset:
            return message
        self._answer(message)
        return None

    def _store_sink(self, cmd: dict[int, bytes], context_id: int) -> DatasetSink:
        request = StoreRequest(
            calling_aet=self.calling,
            called_aet=self.called,
            address=self.address,
            port=self.port,
            transfer_syntax=self.contexts[context_id],
            sop_class=_uid(cmd.get(0x0002)) or self.abstract.get(context_id, ""),
            sop_instance=_uid(cmd.get(0x1000)),
        )
        try:
            return self.scp.on_store(request)
        except Exception:
            log.exception("event=store_handler_failed")
            return _Refusing()

    # -- Storage Commitment ----------------------------------------------------------

    def _commitment_sink(
        self, field: int, cmd: dict[int, bytes], context_id: int, has_dataset: bool
    ) -> DatasetSink:
        syntax = self.contexts[context_id]
        if field == N_EVENT_REPORT_RQ:
            if self.scp.on_report is None:
                return _Refusing()
            return _Collected(lambda data: self._report_received(data, syntax))
        if self.scp.on_commit is None:
            return _Refusing()
        if _uid(cmd.get(0x1001)) != STORAGE_COMMITMENT_INSTANCE:
            return _Refusing(NO_SUCH_SOP_INSTANCE)
        if _u16(cmd.get(0x1008)) != 1:  # "Request Storage Commitment"
            return _Refusing(NO_SUCH_ACTION)
        if not has_dataset:
            return _Refusing(PROCESSING_FAILURE)
        return _Collected(lambda data: self._commit(data, syntax))

    def _commit(self, data: bytes, syntax: str) -> int:
        try:
            uid, refs = commitment.parse_action(data, syntax)
        except CommitmentError as exc:
            log.warning(
                "event=commitment_refused %s",
                log_fields(calling_aet=self.calling, peer=self.address, reason=exc),
            )
            return exc.status
        request = commitment.Request(
            uid, refs, self.calling, self.called, f"{self.address}:{self.port}"
        )
        # Raising here answers 0x0110 (`_Message.finish`): no report is promised.
        self.report_due = (request, self.scp.on_commit(request))
        return 0x0000

    def _send_report(self) -> None:
        """Send the report due on the commitment context it was asked on."""
        assert self.report_due is not None
        request, report = self.report_due
        context_id = next(
            cid for cid, a in self.abstract.items()
            if a == STORAGE_COMMITMENT and cid in self.contexts
        )  # fmt: skip
        syntax = self.contexts[context_id]
        self._msg_id = self._msg_id % 0xFFFF + 1
        cmd = commitment.event_report_rq(self._msg_id, report.event_type)
        data = commitment.encode_report(report, syntax)
        pdus = commitment.pdata(context_id, COMMAND | LAST, cmd, self.peer_max_pdu)
        pdus += commitment.pdata(context_id, 0, data, self.peer_max_pdu)
        self.reports[self._msg_id] = self.report_due
        self.report_due = None
        self._send(b"".join(pdus))

    def _report_answered(self, cmd: dict[int, bytes]) -> None:
        sent = self.reports.pop(_u16(cmd.get(0x0120)) or 0, None)
        if sent is None:
            return
        request, report = sent
        status = _u16(cmd.get(0x0900))
        if status != 0x0000:
            # The requester would not take it here (many expect the report on an
            # association of their own): it goes on a new one.
            self.scp.on_undelivered(request, report)
        log.info(
            "event=commitment_reported %s",
            log_fields(
                calling_aet=self.calling,
                peer=self.address,
                transaction=report.transaction_uid,
                committed=len(report.committed),
                failed=len(report.failed),
                status=f"0x{status or 0:04X}",
                association="same",
            ),
        )

    def _report_received(self, data: bytes, syntax: str) -> int:
        try:
            report = commitment.parse_report(data, syntax)
        except CommitmentError as exc:
            log.warning(
                "event=commitment_report_refused %s",
                log_fields(calling_aet=self.calling, peer=self.address, reason=exc),
            )
            return PROCESSING_FAILURE
        assert self.scp.on_report is not None
        return self.scp.on_report(report, self.calling, self.address)

    # -- responses -------------------------------------------------------------------

    def _respond(self, cmd: dict[int, bytes], context_id: int, status: int) -> None:
        field = _u16(cmd.get(0x0100)) or 0
        if field == C_STORE_RQ or field == C_ECHO_RQ:
            sop_class = _uid(cmd.get(0x0002)) or VERIFICATION
            sop_instance = _uid(cmd.get(0x1000)) if field == C_STORE_RQ else None
        elif field == N_ACTION_RQ:
            sop_class, sop_instance = _uid(cmd.get(0x0003)), _uid(cmd.get(0x1001))
        else:
            sop_class, sop_instance = _uid(cmd.get(0x0002)), _uid(cmd.get(0x1000))
        elements = [
            _element(0x0002, sop_class.encode()),
            _element(0x0100, _us(field | 0x8000)),
            _element(0x0120, cmd.get(0x0110, b"\x00\x00")),
            _element(0x0800, _us(NO_DATASET)),
            _element(0x0900, _us(status)),
        ]
        if sop_instance is not None:
            elements.append(_element(0x1000, sop_instance.encode()))
        if field == N_EVENT_REPORT_RQ and 0x1002 in cmd:
            elements.append(_element(0x1002, cmd[0x1002]))
        if field == N_ACTION_RQ and 0x1008 in cmd:
            elements.append(_element(0x1008, cmd[0x1008]))
        body = _command(*elements)
        header = struct.pack(
            ">BBIIBB", P_DATA_TF, 0, len(body) + 6, len(body) + 2, context_id, 3
        )
        self._send(header + body)

    def _send(self, data: bytes) -> None:
        # A peer that stops reading cannot hold the thread longer than a PDU may take.
        self.sock.settimeout(self.scp.limits.pdu_timeout)
        self.sock.sendall(data)


def _drop(data: bytes | memoryview) -> None:
    pass


def _send_reject(sock: socket.socket, why: tuple[int, int, int]) -> None:
    result, source, reason = why
    pdu = struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(pdu)


def _send_abort(sock: socket.socket) -> None:
    pdu = A_ABORT_RQ()
    pdu.source = 0x02  # service provider
    pdu.reason_diagnostic = 0x00
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(pdu.encode())


def _u16(value: bytes | None) -> int | None:
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def _uid(value: bytes | None) -> str:
    return (value or b"").rstrip(b"\x00 ").decode("ascii", "replace")
