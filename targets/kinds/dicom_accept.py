"""Accepting DICOM associations on plain blocking sockets: C-STORE and C-ECHO SCP.

The receiving twin of `dicom_link`, for the same reason: pynetdicom's acceptor hands
every PDU from a reader thread to a reactor thread through polled queues, and that
machinery, not the work, was most of the receiver's time per instance. Here each
association is one thread reading its socket: A-ASSOCIATE-RQ answered with AC or RJ
(pynetdicom's PDU classes and its presentation context negotiation), P-DATA
reassembled into command and dataset bytes, one callback per C-STORE whose status
goes back at once, C-ECHO answered, A-RELEASE and A-ABORT honoured.

Only what a storage SCP needs: no asynchronous operations window, no role selection,
no extended negotiation, no other DIMSE services (a peer sending one is aborted).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from targets.dicomnet import _nodelay
from targets.kinds.dicom_link import (
    ABORT,
    ASSOCIATE_RQ,
    COMMAND,
    LAST,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ,
    VERIFICATION,
    LinkError,
    _command,
    _element,
    _read_pdu,
    _us,
    parse_command,
)

log = logging.getLogger("courier.receiver")

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101

PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (result, source, reason) (PS3.8 9.3.4)
RJ_CALLING_AET = (0x01, 0x01, 0x03)
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_TOO_MANY = (0x02, 0x03, 0x02)


@dataclass
class StoreRequest:
    """One received C-STORE: who sent it, and the dataset's encoded bytes."""

    calling_aet: str
    called_aet: str
    address: str
    port: int
    transfer_syntax: str
    sop_class: str
    sop_instance: str
    dataset: bytes


@dataclass
class Rejection:
    calling_aet: str
    address: str
    reason: str


class StoreSCP:
    """Listen on `(host, port)`; one thread per association. `start()`, `shutdown()`.

    `on_store(request) -> status` is called in the association's thread and its
    status answered; an exception in it answers 0x0110 (processing failure).
    `on_rejected(rejection)` is told of every refused association.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        contexts: Sequence[PresentationContext],
        on_store: Callable[[StoreRequest], int],
        on_rejected: Callable[[Rejection], None] = lambda r: None,
        accepted_calling_aets: Sequence[str] = (),
        max_pdu: int = 0,
        max_associations: int = 64,
        acse_timeout: float = 30,
        dimse_timeout: float = 60,
        network_timeout: float = 120,
    ):
        self.contexts = list(contexts)
        self.on_store = on_store
        self.on_rejected = on_rejected
        self.accepted = list(accepted_calling_aets)
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self._active: set[socket.socket] = set()
        self._lock = threading.Lock()
        scp = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                scp._serve(self.request, self.client_address)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            block_on_close = False

        self._server = Server(address, Handler)
        self.server_address = self._server.server_address
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dicom-accept", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        """Stop listening and abort the associations still open."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            active = list(self._active)
        for sock in active:
            _send_abort(sock)
            # Wakes the association's thread from its read; it then closes.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- one association ---------------------------------------------------------------

    def _serve(self, sock: socket.socket, client: tuple[str, int]) -> None:
        _nodelay(sock)
        with self._lock:
            self._active.add(sock)
            too_many = len(self._active) > self.max_associations
        try:
            _Association(self, sock, client).run(too_many)
        except (TimeoutError, LinkError) as exc:
            # A silent peer, or bytes that are not DICOM: abort, as PS3.8 9.1.6 asks.
            log.warning(
                "event=association_aborted peer=%s:%s reason=%r", *client, str(exc)
            )
            _send_abort(sock)
        except OSError as exc:
            log.info("event=association_lost peer=%s:%s error=%r", *client, str(exc))
        except Exception:
            log.exception("event=association_failed peer=%s:%s", *client)
            _send_abort(sock)
        finally:
            with self._lock:
                self._active.discard(sock)
            try:
                sock.close()
            except OSError:
                pass


class _Association:
    def __init__(self, scp: StoreSCP, sock: socket.socket, client: tuple[str, int]):
        self.scp = scp
        self.sock = sock
        self.address, self.port = client[0], client[1]
        self.buffer = bytearray()
        self.calling = self.called = ""
        self.contexts: dict[int, str] = {}  # accepted context id -> transfer syntax
        self.peer_max = 0

    def run(self, too_many: bool) -> None:
        scp = self.scp
        self.sock.settimeout(scp.acse_timeout)
        pdu_type, pdu = _read_pdu(self.sock, self.buffer)
        if pdu_type != ASSOCIATE_RQ:
            self.abort()
            return
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(pdu)
            primitive = rq.to_primitive()
        except Exception:  # pynetdicom raises assorted errors on bad bytes
            self.reject(RJ_NO_REASON, "malformed association request")
            return
        self.calling = str(primitive.calling_ae_title).strip()
        self.called = str(primitive.called_ae_title).strip()
        if scp.accepted and self.calling not in scp.accepted:
            self.reject(RJ_CALLING_AET, "calling AE title not in the accepted list")
            return
        if too_many:
            self.reject(RJ_TOO_MANY, "too many simultaneous associations")
            return
        self.peer_max = primitive.maximum_length_received or 0
        results, _roles = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, scp.contexts
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
        self.sock.sendall(A_ASSOCIATE_AC(self._accept(primitive, results)).encode())
        self.messages()

    def _accept(self, rq: A_ASSOCIATE, results: list) -> A_ASSOCIATE:
        ac = A_ASSOCIATE()
        ac.application_context_name = rq.application_context_name
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.scp.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        ac.user_information = [max_length, impl_uid, impl_version]
        return ac

    def reject(self, why: tuple[int, int, int], reason: str) -> None:
        rj = A_ASSOCIATE_RJ()
        rj.result, rj.source, rj.reason_diagnostic = why
        self.sock.sendall(rj.encode())
        self.scp.on_rejected(Rejection(self.calling, self.address, reason))

    def abort(self) -> None:
        _send_abort(self.sock)

    def messages(self) -> None:
        """Serve DIMSE messages until the peer releases or aborts."""
        command = bytearray()
        data: list[bytes] = []
        cmd: dict[int, bytes] | None = None  # a command waiting for its dataset
        context_id = 0
        while True:
            # Between messages the peer may think; inside one it must keep sending.
            self.sock.settimeout(
                self.scp.dimse_timeout
                if (command or cmd is not None)
                else self.scp.network_timeout
            )
            pdu_type, pdu = _read_pdu(self.sock, self.buffer)
            if pdu_type == RELEASE_RQ:
                self.sock.sendall(struct.pack(">BBIxxxx", RELEASE_RP, 0, 4))
                return
            if pdu_type == ABORT:
                return
            if pdu_type != P_DATA_TF:
                self.abort()
                return
            pos, size = 6, len(pdu)
            while pos + 6 <= size:
                (item_length,) = struct.unpack_from(">I", pdu, pos)
                context_id, control = pdu[pos + 4], pdu[pos + 5]
                value = pdu[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if context_id not in self.contexts:
                    self.abort()
                    return
                if control & COMMAND:
                    command += value
                    if not control & LAST:
                        continue
                    cmd = parse_command(bytes(command))
                    command.clear()
                    data.clear()
                    if _u16(cmd.get(0x0800)) == NO_DATASET:
                        if not self.answer(cmd, context_id, b""):
                            return
                        cmd = None
                    continue
                if cmd is None:  # a dataset without its command
                    self.abort()
                    return
                data.append(value)
                if control & LAST:
                    if not self.answer(cmd, context_id, b"".join(data)):
                        return
                    cmd = None
                    data.clear()

    def answer(self, cmd: dict[int, bytes], context_id: int, dataset: bytes) -> bool:
        """Act on one whole message; False if the association was aborted."""
        field, msg_id = _u16(cmd.get(0x0100)), cmd.get(0x0110, b"\x00\x00")
        sop_class = _uid(cmd.get(0x0002))
        if field == C_ECHO_RQ:
            status = 0x0000
            rsp_field, instance = C_ECHO_RSP, None
        elif field == C_STORE_RQ:
            instance = _uid(cmd.get(0x1000))
            rsp_field = C_STORE_RSP
            request = StoreRequest(
                calling_aet=self.calling,
                called_aet=self.called,
                address=self.address,
                port=self.port,
                transfer_syntax=self.contexts[context_id],
                sop_class=sop_class or self.abstract.get(context_id, ""),
                sop_instance=instance,
                dataset=dataset,
            )
            try:
                status = self.scp.on_store(request)
            except Exception:
                log.exception("event=store_handler_failed sop_instance=%s", instance)
                status = PROCESSING_FAILURE
        else:
            self.abort()
            return False
        elements = [
            _element(0x0002, (sop_class or VERIFICATION).encode()),
            _element(0x0100, _us(rsp_field)),
            _element(0x0120, msg_id),
            _element(0x0800, _us(NO_DATASET)),
            _element(0x0900, _us(status)),
        ]
        if instance is not None:
            elements.append(_element(0x1000, instance.encode()))
        body = _command(*elements)
        header = struct.pack(
            ">BBIIBB", P_DATA_TF, 0, len(body) + 6, len(body) + 2, context_id, 3
        )
        self.sock.settimeout(self.scp.dimse_timeout)
        self.sock.sendall(header + body)
        return True


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
