"""One DICOM association as a plain blocking socket: associate, C-ECHO, C-STORE, release.

Why not pynetdicom's `Association` for sending: it runs a reader thread and a reactor
thread that hand every PDU over through queues, polling with 1 ms sleeps, and it
re-encodes each dataset with pydicom. That caps one association at about a quarter of
dcmtk storescu's rate. This module keeps pynetdicom for what it does well (the
A-ASSOCIATE PDUs, presentation contexts, rejection reasons) and does the data transfer
itself, synchronously in the calling thread: each C-STORE is the command set plus the
file's dataset bytes, read straight from disk, written with one `sendmsg` per PDU, then
one read for the response. No threads, so a timeout is just a socket timeout.

Only what an SCU that sends needs is here: no asynchronous operations window, no
role selection, no extended negotiation (DICOM PS3.7 and PS3.8).
"""

# Why this module is long: one SCU association (A-ASSOCIATE, P-DATA framing,
# C-STORE and C-ECHO, release and abort) with its errors in words, read top down.

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from targets.dicomnet.sockets import _nodelay

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# A peer announcing 0 ("no limit") still gets PDUs no larger than this, so memory
# per fragment stays bounded.
UNLIMITED_PDU = 4 * 1024 * 1024

# Larger PDUs than this from a peer are taken as garbage, not buffered.
MAX_PDU_READ = 64 * 1024 * 1024

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ = 0x01
ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF = 0x02, 0x03, 0x04
RELEASE_RQ, RELEASE_RP, ABORT = 0x05, 0x06, 0x07

# Message control header bits of a PDV (PS3.8 E.2)
COMMAND, LAST = 0x01, 0x02

# Rejection reasons in words, by (source, reason) (PS3.8 9.3.4).
REJECT_REASONS = {
    (1, 1): "no reason given by the target",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised — check the Source AET (the target may "
    "need Courier's AE title registered)",
    (1, 7): "called AE title not recognised — check the Target AET",
    (2, 1): "no reason given by the target's network layer",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion at the target",
    (3, 2): "the target's limit of simultaneous associations is reached",
}


class LinkError(Exception):
    """The association failed: refused, timed out, aborted, or a protocol error."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class UnreadableFile(Exception):
    """A file to send could not be read; the association is unharmed."""


class LinkTimeout(LinkError):
    """The peer did not answer within the timeout."""


class AssociationRejected(LinkError):
    def __init__(self, result: int, source: int, reason: int):
        self.result, self.source, self.reason = result, source, reason
        words = REJECT_REASONS.get(
            (source, reason), f"source {source}, reason {reason}"
        )
        kind = "" if result == 1 else " (transient: try again later)"
        super().__init__(f"association rejected{kind}: {words}", permanent=result == 1)


@dataclass(frozen=True)
class Context:
    """An accepted presentation context."""

    id: int
    abstract_syntax: str
    transfer_syntax: str


def propose(
    contexts: Sequence[tuple[str, Sequence[str]]],
) -> list[PresentationContext]:
    """Number (abstract syntax, transfer syntaxes) pairs as presentation contexts."""
    if len(contexts) > 128:
        raise ValueError("at most 128 presentation contexts fit in one association")
    proposed = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(syntaxes)
        proposed.append(cx)
    return proposed


def _element(tag: int, value: bytes) -> bytes:
    """One command element, implicit VR little endian (PS3.7 E.1)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """Split an implicit VR little endian command set into {element number: value}."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        _group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def dataset_offset(path: Path, head: bytes) -> int:
    """Return where the dataset starts in a DICOM file (after preamble and meta).

    Reads the File Meta Information Group Length (PS3.10 7.1); falls back to parsing
    the meta elements for files that lack it.
    """
    if head[128:132] == b"DICM" and head[132:136] == b"\x02\x00\x00\x00":
        if head[136:138] == b"UL":
            (group_length,) = struct.unpack_from("<I", head, 140)
            return 144 + group_length
    from pynetdicom.dsutils import split_dataset

    return split_dataset(path)[1]


class Association:
    """An established association on a blocking socket (one user thread)."""

    def __init__(
        self,
        sock: socket.socket,
        contexts: list[Context],
        rejected: list[PresentationContext],
        peer_max_pdu: int,
        dimse_timeout: float,
        acse_timeout: float,
    ):
        self.sock = sock
        self.contexts = contexts
        self.rejected = rejected
        # What the peer announced (0: no limit) and what Courier then uses.
        self.announced_max_pdu = peer_max_pdu
        self.peer_max_pdu = peer_max_pdu or UNLIMITED_PDU
        self.dimse_timeout = dimse_timeout
        self.acse_timeout = acse_timeout
        self._msg_id = 0
        self._closed = False
        self._buffer = bytearray()
        # sendmsg (scatter-gather, no copies) is only for plain sockets.
        self._gather = not isinstance(sock, ssl.SSLSocket)

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        calling_aet: str,
        called_aet: str,
        contexts: list[PresentationContext],
        connect_timeout: float,
        acse_timeout: float,
        dimse_timeout: float,
        max_pdu: int,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Association:
        """Connect and negotiate; raise `LinkError` (or `AssociationRejected`)."""
        sock = connect(host, port, connect_timeout)
        try:
            if ssl_context is not None:
                try:
                    sock = ssl_context.wrap_socket(
                        sock, server_hostname=server_hostname or host
                    )
                except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
                    raise LinkError(
                        f"TLS handshake with {host}:{port} failed: {exc}",
                        permanent=isinstance(exc, ssl.SSLCertVerificationError),
                    ) from exc
            return cls._negotiate(
                sock,
                calling_aet=calling_aet,
                called_aet=called_aet,
                contexts=contexts,
                acse_timeout=acse_timeout,
                dimse_timeout=dimse_timeout,
                max_pdu=max_pdu,
                where=f"{host}:{port}",
            )
        except BaseException:
            sock.close()
            raise

    @classmethod
    def _negotiate(
        cls,
        sock,
        *,
        calling_aet,
        called_aet,
        contexts,
        acse_timeout,
        dimse_timeout,
        max_pdu,
        where,
    ) -> Association:
        rq = A_ASSOCIATE()
        rq.application_context_name = APPLICATION_CONTEXT
        rq.calling_ae_title = calling_aet
        rq.called_ae_title = called_aet
        rq.presentation_context_definition_list = contexts
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        impl_version = ImplementationVersionNameNotification()
        impl_version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        rq.user_information = [max_length, impl_uid, impl_version]
        sock.settimeout(acse_timeout)
        try:
            sock.sendall(A_ASSOCIATE_RQ(rq).encode())
            pdu_type, pdu = _read_pdu(sock, bytearray())
        except TimeoutError as exc:
            raise LinkTimeout(
                f"no answer to the association request from {where} within "
                f"{acse_timeout:g} s (association timeout)"
            ) from exc
        except OSError as exc:
            raise LinkError(
                f"connection to {where} lost while associating: {exc}"
            ) from exc
        if pdu_type == ASSOCIATE_RJ and len(pdu) >= 10:
            result, source, reason = pdu[7], pdu[8], pdu[9]
            raise AssociationRejected(result, source, reason)
        if pdu_type == ABORT:
            raise LinkError(f"{where} aborted the association request")
        if pdu_type != ASSOCIATE_AC:
            raise LinkError(
                f"{where} answered the association request with PDU "
                f"type {pdu_type:#04x}; is this a DICOM port?"
            )
        try:
            ac = A_ASSOCIATE_AC()
            ac.decode(pdu)
            answer = ac.to_primitive()
        except Exception as exc:  # pynetdicom raises assorted errors on bad bytes
            raise LinkError(f"{where} sent a malformed association answer") from exc
        by_id = {cx.context_id: cx for cx in contexts}
        accepted, rejected = [], []
        for result in answer.presentation_context_definition_results_list:
            proposed = by_id.get(result.context_id)
            if proposed is None:
                continue
            if result.result == 0 and result.transfer_syntax:
                accepted.append(
                    Context(
                        result.context_id,
                        proposed.abstract_syntax,
                        str(result.transfer_syntax[0]),
                    )
                )
            else:
                rejected.append(proposed)
        peer_max = answer.maximum_length_received or 0
        return cls(sock, accepted, rejected, peer_max, dimse_timeout, acse_timeout)

    # -- DIMSE -----------------------------------------------------------------------
    def next_message_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    def context_for(self, abstract_syntax: str, transfer_syntax: str) -> Context | None:
        for cx in self.contexts:
            if cx.abstract_syntax == abstract_syntax and (
                cx.transfer_syntax == transfer_syntax
            ):
                return cx
        return None

    def contexts_for(self, abstract_syntax: str) -> list[Context]:
        return [cx for cx in self.contexts if cx.abstract_syntax == abstract_syntax]

    def c_echo(self) -> int:
        cx = self.contexts_for(VERIFICATION)
        if not cx:
            raise LinkError("the target did not accept the Verification SOP class")
        msg_id = self.next_message_id()
        cmd = _command(
            _element(0x0002, VERIFICATION.encode()),
            _element(0x0100, _us(0x0030)),
            _element(0x0110, _us(msg_id)),
            _element(0x0800, _us(0x0101)),
        )
        self._send(self._pdata(cx[0].id, COMMAND | LAST, cmd))
        return self._status(self._response(msg_id))

    def c_store_file(
        self, cx: Context, sop_class: str, sop_instance: str, path: Path
    ) -> dict[int, bytes]:
        """Send one file's dataset bytes as they are on disk; return the response.

        The file's transfer syntax must be `cx.transfer_syntax`. Raise
        `UnreadableFile` (before anything is sent) if the file cannot be read.
        """
        f = None
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
            head = f.read(65536)
            offset = dataset_offset(path, head)
            size = f.seek(0, 2)
            f.seek(offset)
        except Exception as exc:  # OSError, or pydicom's errors for a broken meta
            if f is not None:
                f.close()
            raise UnreadableFile(f"cannot read {path.name}: {exc}") from exc
        with f:
            return self._c_store(cx, sop_class, sop_instance, f, size - offset)

    def c_store_bytes(
        self, cx: Context, sop_class: str, sop_instance: str, data: bytes
    ) -> dict[int, bytes]:
        import io

        return self._c_store(cx, sop_class, sop_instance, io.BytesIO(data), len(data))

    def _c_store(self, cx, sop_class, sop_instance, stream, length) -> dict[int, bytes]:
        msg_id = self.next_message_id()
        cmd = _command(
            _element(0x0002, sop_class.encode()),
            _element(0x0100, _us(0x0001)),
            _element(0x0110, _us(msg_id)),
            _element(0x0700, _us(0x0000)),  # medium priority
            _element(0x0800, _us(0x0000)),  # a dataset follows
            _element(0x1000, sop_instance.encode()),
        )
        # Each P-DATA-TF's variable part is at most the peer's maximum length:
        # 4 bytes item length + 2 bytes context id and control header + data.
        chunk = self.peer_max_pdu - 6
        parts = self._pdata(cx.id, COMMAND | LAST, cmd)
        left = length
        while True:
            n = min(chunk, left)
            try:
                data = stream.read(n)
            except OSError as exc:  # half a message is out: only an abort fixes it
                raise LinkError(
                    f"reading {sop_instance} failed mid-send: {exc}"
                ) from exc
            if len(data) != n:
                raise LinkError(f"file shrank while being sent ({sop_instance})")
            left -= n
            parts += self._pdata(cx.id, LAST if not left else 0, data)
            self._send(parts)
            parts = []
            if not left:
                break
        rsp = self._response(msg_id)
        return rsp

    @staticmethod
    def _pdata(context_id: int, control: int, data: bytes) -> list[bytes]:
        header = struct.pack(
            ">BBIIBB", P_DATA_TF, 0, len(data) + 6, len(data) + 2, context_id, control
        )
        return [header, data]

    def _send(self, parts: list[bytes]) -> None:
        self.sock.settimeout(self.dimse_timeout)
        try:
            if not self._gather:
                self.sock.sendall(b"".join(parts))
                return
            views = [memoryview(p) for p in parts]
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except TimeoutError as exc:
            raise LinkTimeout(
                f"the target stopped reading for {self.dimse_timeout:g} s "
                "(DIMSE timeout)"
            ) from exc
        except OSError as exc:
            raise LinkError(f"connection lost while sending: {exc}") from exc

    def _response(self, msg_id: int) -> dict[int, bytes]:
        """Read P-DATA until a whole command set arrives; return its elements."""
        self.sock.settimeout(self.dimse_timeout)
        command = bytearray()
        while True:
            try:
                pdu_type, pdu = _read_pdu(self.sock, self._buffer)
            except TimeoutError as exc:
                raise LinkTimeout(
                    f"no response from the target within {self.dimse_timeout:g} s "
                    "(DIMSE timeout)"
                ) from exc
            except OSError as exc:
                raise LinkError(
                    f"connection lost while waiting for a response: {exc}"
                ) from exc
            if pdu_type == ABORT:
                self._closed = True
                raise LinkError("the target aborted the association")
            if pdu_type == RELEASE_RQ:
                raise LinkError("the target asked to release the association mid-send")
            if pdu_type != P_DATA_TF:
                raise LinkError(f"unexpected PDU type {pdu_type:#04x} from the target")
            pos, done = 6, False
            while pos + 6 <= len(pdu):
                (item_length,) = struct.unpack_from(">I", pdu, pos)
                control = pdu[pos + 5]
                if control & COMMAND:
                    command += pdu[pos + 6 : pos + 4 + item_length]
                    done = done or bool(control & LAST)
                pos += 4 + item_length
            if done:
                rsp = parse_command(bytes(command))
                answered = rsp.get(0x0120)
                if answered is not None and struct.unpack("<H", answered)[0] != msg_id:
                    raise LinkError("the target answered a different message")
                # A response carrying a dataset (not expected for C-STORE/C-ECHO)
                # has it follow in further PDUs; none of ours do.
                return rsp

    @staticmethod
    def _status(rsp: dict[int, bytes]) -> int:
        return status_of(rsp)

    # -- ending ----------------------------------------------------------------------
    def release(self) -> None:
        """Release politely; abort if the peer does not answer in time."""
        if self._closed:
            return
        try:
            self.sock.settimeout(self.acse_timeout)
            self.sock.sendall(struct.pack(">BBIxxxx", RELEASE_RQ, 0, 4))
            while True:
                pdu_type, _ = _read_pdu(self.sock, self._buffer)
                if pdu_type in (RELEASE_RP, ABORT):
                    break
        except OSError:
            self.abort()
            return
        self.close()

    def abort(self) -> None:
        if not self._closed:
            try:
                self.sock.settimeout(1.0)
                pdu = A_ABORT_RQ()
                pdu.source = 0x00
                pdu.reason_diagnostic = 0x00
                self.sock.sendall(pdu.encode())
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Association:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()


def status_of(rsp: dict[int, bytes]) -> int:
    value = rsp.get(0x0900)
    if value is None or len(value) < 2:
        raise LinkError("the target's response has no status")
    return struct.unpack("<H", value[:2])[0]


def error_comment(rsp: dict[int, bytes]) -> str:
    return rsp.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """Open a TCP connection with TCP_NODELAY; raise `LinkError` in words."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise LinkError(f"cannot resolve host {host!r}: {exc.strerror}") from exc
    except ConnectionRefusedError as exc:
        raise LinkError(
            f"connection refused by {where}: is the DICOM service running, and the "
            "port right?"
        ) from exc
    except TimeoutError as exc:
        raise LinkTimeout(
            f"no answer from {where} within {timeout:g} s (connection timeout): "
            "check the host, port and firewalls"
        ) from exc
    except OSError as exc:
        raise LinkError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    # Nagle plus the peer's delayed ACK costs ~40 ms per exchange (targets.dicomnet.sockets).
    _nodelay(sock)
    return sock


def _read_exact(sock: socket.socket, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        data = sock.recv(max(65536, n - len(buffer)))
        if not data:
            raise ConnectionResetError("the target closed the connection")
        buffer += data
    out = bytes(buffer[:n])
    del buffer[:n]
    return out


def _read_pdu(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """Read one PDU; return its type and all its bytes (header included)."""
    header = _read_exact(sock, buffer, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if not ASSOCIATE_RQ <= pdu_type <= ABORT or length > MAX_PDU_READ:
        raise LinkError(
            f"the target sent something that is not DICOM (starting {header[:4]!r}): "
            "is this a DICOM port?"
        )
    return pdu_type, header + _read_exact(sock, buffer, length)
