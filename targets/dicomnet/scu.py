"""One DICOM association as a plain blocking socket: associate, C-ECHO, C-STORE, release.

Why not pynetdicom's `Association` for sending: it runs a reader thread and a reactor
thread that hand every PDU over through queues, polling with 1 ms sleeps, and it
re-encodes each dataset with pydicom. That caps one association at about a quarter of
dcmtk storescu's rate. This module encodes the few PDUs an SCU sends (A-ASSOCIATE-RQ,
P-DATA-TF, A-RELEASE, A-ABORT) and decodes the A-ASSOCIATE-AC itself, without
importing pynetdicom (whose package import pulls in pydicom and numpy, most of a
one-instance `send_series`'s start-up; `tests/targets/test_scu_pdus.py` holds the
bytes equal to pynetdicom's), and does the data transfer
synchronously in the calling thread: each C-STORE is the command set plus the
file's dataset bytes, read straight from disk, written with one `sendmsg` per PDU, then
one read for the response. No threads, so a timeout is just a socket timeout.

Only what an SCU that sends needs is here: no asynchronous operations window, no
role selection, no extended negotiation but User Identity (DICOM PS3.7 and PS3.8).
Courier introduces itself with its own Implementation Class UID and Version Name
(`targets.dicomnet.identity`). Every P-DATA fragment has an even length, none longer
than the peer's maximum, and an odd-length dataset is refused before a byte of it is
sent (`targets.dicomnet.outgoing` checks and repairs files before they get here).
"""

# Why this module is long: one SCU association (A-ASSOCIATE, P-DATA framing,
# C-STORE and C-ECHO, release and abort) with its errors in words, read top down.

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from targets.dicomnet import load_pydicom
from targets.dicomnet.check import CorruptDataset, walk_encoded
from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.dicomnet.outgoing import Outgoing, RefusedFile
from targets.dicomnet.sockets import _nodelay

if TYPE_CHECKING:
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# A peer announcing 0 ("no limit"), or more than this, still gets PDUs no larger
# than this, so memory per fragment stays bounded (a fragment is read whole from
# the file; dcmtk sends at most 128 KiB).
UNLIMITED_PDU = 4 * 1024 * 1024

# Larger PDUs than this from a peer are taken as garbage, not buffered.
MAX_PDU_READ = 64 * 1024 * 1024

# A response's command set is a few hundred bytes; more than this is not one.
MAX_COMMAND = 64 * 1024

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


class LinkTimeout(LinkError):
    """The peer did not answer within the timeout."""


class AssociationRejected(LinkError):
    def __init__(
        self, result: int, source: int, reason: int, *, identity: bool = False
    ):
        self.result, self.source, self.reason = result, source, reason
        words = REJECT_REASONS.get(
            (source, reason), f"source {source}, reason {reason}"
        )
        kind = "" if result == 1 else " (transient: try again later)"
        if identity and reason == 1 and source in (1, 2):
            # What a peer refusing the User Identity answers (PS3.7 D.3.3.7 names
            # no reason for it; pynetdicom rejects as transient, source 2).
            kind = ""
            words = (
                "no reason given; Courier sent a username and password (User "
                "Identity): check them in the target's settings"
            )
        super().__init__(f"association rejected{kind}: {words}", permanent=result == 1)


@dataclass(frozen=True)
class UserIdentity:
    """Username and password for User Identity negotiation (PS3.7 D.3.3.7)."""

    username: str
    password: str = ""

    def item(self) -> bytes:
        """The User Identity sub-item of an A-ASSOCIATE-RQ (PS3.8 D.3.3.7.1)."""
        primary = self.username.encode("utf-8")
        secondary = self.password.encode("utf-8")
        body = (
            struct.pack(">BBH", 2 if self.password else 1, 0, len(primary))
            + primary
            + struct.pack(">H", len(secondary))
            + secondary
        )
        return _item(0x58, body)

    def primitive(self) -> UserIdentityNegotiation:
        """The same for pynetdicom's `AE.associate` (the query tool)."""
        from pynetdicom.pdu_primitives import UserIdentityNegotiation

        item = UserIdentityNegotiation()
        # 2: username and passcode; 1: username only.
        item.user_identity_type = 2 if self.password else 1
        item.positive_response_requested = False
        item.primary_field = self.username.encode("utf-8")
        if self.password:
            item.secondary_field = self.password.encode("utf-8")
        return item

    def __repr__(self) -> str:  # never the password, in logs or tracebacks
        return f"UserIdentity(username={self.username!r})"


@dataclass(frozen=True)
class Context:
    """An accepted presentation context."""

    id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass
class PresentationContext:
    """A proposed presentation context (the attributes of pynetdicom's)."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: list[str] = field(default_factory=list)


def propose(
    contexts: Sequence[tuple[str, Sequence[str]]],
) -> list[PresentationContext]:
    """Number (abstract syntax, transfer syntaxes) pairs as presentation contexts."""
    if len(contexts) > 128:
        raise ValueError("at most 128 presentation contexts fit in one association")
    return [
        PresentationContext(2 * i + 1, abstract, list(syntaxes))
        for i, (abstract, syntaxes) in enumerate(contexts)
    ]


# -- A-ASSOCIATE PDUs (PS3.8 9.3.2-9.3.3) ----------------------------------------------
def _item(item_type: int, value: bytes) -> bytes:
    """A PDU item or sub-item: type, reserved byte, 2-byte length, value."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def _ae(title: str, what: str) -> bytes:
    """An AE title field (PS3.8 9.3.2): 1-16 characters of the Default Character
    Repertoire without backslash or control characters, not all spaces."""
    if (
        not title.strip()
        or len(title) > 16
        or any(c == "\\" or not " " <= c <= "~" for c in title)
    ):
        raise ValueError(f"the {what} AE title {title!r} is not a valid AE title")
    return title.encode("ascii").ljust(16)


def associate_rq(
    *,
    calling_aet: str,
    called_aet: str,
    contexts: Sequence[PresentationContext],
    max_pdu: int,
    identity: UserIdentity | None = None,
    roles: Sequence[tuple[str, bool, bool]] = (),
) -> bytes:
    """An A-ASSOCIATE-RQ PDU: Courier's identity, the maximum PDU length Courier
    takes, the proposed contexts, SCP/SCU role selection per (SOP class, SCU role,
    SCP role), and User Identity."""
    items = [_item(0x10, _uid(APPLICATION_CONTEXT))]
    for cx in contexts:
        sub = _item(0x30, _uid(cx.abstract_syntax)) + b"".join(
            _item(0x40, _uid(ts)) for ts in cx.transfer_syntax
        )
        items.append(_item(0x20, struct.pack(">BBBB", cx.context_id, 0, 0, 0) + sub))
    user = [
        _item(0x51, struct.pack(">I", max_pdu)),
        _item(0x52, _uid(IMPLEMENTATION_CLASS_UID)),
        _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    ]
    for sop_class, scu_role, scp_role in roles:
        uid = _uid(sop_class)
        user.append(
            _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([scu_role, scp_role]))
        )
    if identity is not None:
        user.append(identity.item())
    items.append(_item(0x50, b"".join(user)))
    body = (
        struct.pack(">HH", 1, 0)
        + _ae(called_aet, "called")
        + _ae(calling_aet, "calling")
        + bytes(32)
        + b"".join(items)
    )
    return struct.pack(">BBI", ASSOCIATE_RQ, 0, len(body)) + body


@dataclass
class Acceptance:
    """What an A-ASSOCIATE-AC says: per context id its result and transfer
    syntax, and the peer's maximum PDU length (0: none given or no limit)."""

    results: dict[int, tuple[int, str]]
    max_pdu: int


def parse_associate_ac(pdu: bytes) -> Acceptance:
    """Decode an A-ASSOCIATE-AC (header included); raise ValueError if malformed."""
    if len(pdu) < 74:
        raise ValueError("too short")
    results: dict[int, tuple[int, str]] = {}
    max_pdu = 0
    for item_type, value in _items(pdu, 74, len(pdu)):
        if item_type == 0x21:  # presentation context (AC)
            if len(value) < 4:
                raise ValueError("short presentation context item")
            syntax = ""
            for sub_type, sub in _items(value, 4, len(value)):
                if sub_type == 0x40:
                    syntax = sub.rstrip(b"\x00 ").decode("ascii")
            results[value[0]] = (value[2], syntax)
        elif item_type == 0x50:  # user information
            for sub_type, sub in _items(value, 0, len(value)):
                if sub_type == 0x51:
                    if len(sub) != 4:
                        raise ValueError("bad maximum length sub-item")
                    (max_pdu,) = struct.unpack(">I", sub)
    return Acceptance(results, max_pdu)


def _items(data: bytes, pos: int, end: int):
    """(type, value) of each item in data[pos:end]; ValueError if one overruns."""
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated item header")
        item_type, _, length = struct.unpack_from(">BBH", data, pos)
        if pos + 4 + length > end:
            raise ValueError(f"item {item_type:#04x} overruns the PDU")
        yield item_type, bytes(data[pos + 4 : pos + 4 + length])
        pos += 4 + length


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8)."""
    return struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, source, reason)


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
    # A file without a group length (rare): its meta read by pydicom, as
    # pynetdicom's `split_dataset` does.
    load_pydicom()
    from pydicom.filereader import read_dataset, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        read_dataset(
            f,
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=lambda tag, vr, length: tag.group != 2,
        )
        return f.tell()


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
        self.peer_max_pdu = min(peer_max_pdu or UNLIMITED_PDU, UNLIMITED_PDU)
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
        identity: UserIdentity | None = None,
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
                identity=identity,
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
        identity: UserIdentity | None = None,
    ) -> Association:
        try:
            rq = associate_rq(
                calling_aet=calling_aet,
                called_aet=called_aet,
                contexts=contexts,
                max_pdu=max_pdu,
                identity=identity,
            )
        except UnicodeEncodeError as exc:
            raise LinkError(
                f"a UID is not ASCII: {exc.object!r}", permanent=True
            ) from exc
        except ValueError as exc:  # an AE title no peer could take
            raise LinkError(str(exc), permanent=True) from exc
        sock.settimeout(acse_timeout)
        # What arrives with the answer (an A-ABORT right behind the A-ASSOCIATE-AC)
        # is the association's next PDU, not to be dropped.
        buffer = bytearray()
        try:
            sock.sendall(rq)
            pdu_type, pdu = _read_pdu(sock, buffer)
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
            raise AssociationRejected(
                result, source, reason, identity=identity is not None
            )
        if pdu_type == ABORT:
            raise LinkError(f"{where} aborted the association request")
        if pdu_type != ASSOCIATE_AC:
            raise LinkError(
                f"{where} answered the association request with PDU "
                f"type {pdu_type:#04x}; is this a DICOM port?"
            )
        try:
            answer = parse_associate_ac(pdu)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LinkError(f"{where} sent a malformed association answer") from exc
        by_id = {cx.context_id: cx for cx in contexts}
        accepted, rejected = [], []
        for context_id, (result, syntax) in answer.results.items():
            proposed = by_id.get(context_id)
            if proposed is None:
                continue
            if result == 0 and syntax:
                accepted.append(Context(context_id, proposed.abstract_syntax, syntax))
            else:
                rejected.append(proposed)
        association = cls(
            sock, accepted, rejected, answer.max_pdu, dimse_timeout, acse_timeout
        )
        association._buffer = buffer
        return association

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
        self._send(self._command_pdus(cx[0].id, cmd))
        return self._status(self._response(msg_id))

    def c_store_file(
        self,
        cx: Context,
        sop_class: str,
        sop_instance: str,
        path: Path,
        outgoing: Outgoing | None = None,
    ) -> dict[int, bytes]:
        """Send one file's dataset bytes as they are on disk; return the response.

        `outgoing` is what `targets.dicomnet.outgoing.prepare` made of the file (the
        dataset's place, or repaired bytes); without it the dataset is sent from
        where the file meta says it starts. The file's transfer syntax must be
        `cx.transfer_syntax`. Raise `RefusedFile` (before anything is sent) if the
        file cannot be read or its dataset has an odd length.
        """
        if outgoing is not None and outgoing.data is not None:
            return self.c_store_bytes(cx, sop_class, sop_instance, outgoing.data)
        f = None
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed below)
            if outgoing is None:
                head = f.read(65536)
                offset = dataset_offset(path, head)
                length = f.seek(0, 2) - offset
            else:
                offset, length = outgoing.offset, outgoing.length
            f.seek(offset)
        except Exception as exc:  # OSError, or pydicom's errors for a broken meta
            if f is not None:
                f.close()
            raise RefusedFile(f"cannot read {path.name}: {exc}") from exc
        with f:
            return self._c_store(cx, sop_class, sop_instance, f, length)

    def c_store_bytes(
        self, cx: Context, sop_class: str, sop_instance: str, data: bytes
    ) -> dict[int, bytes]:
        """Send an encoded dataset (converted or repaired) after one walk of it;
        raise `RefusedFile` (nothing sent) if it does not walk to its end."""
        import io

        try:
            walk_encoded(data, cx.transfer_syntax)
        except CorruptDataset as exc:
            raise RefusedFile(
                f"malformed DICOM after encoding, not sent: {exc}"
            ) from exc
        return self._c_store(cx, sop_class, sop_instance, io.BytesIO(data), len(data))

    def _c_store(self, cx, sop_class, sop_instance, stream, length) -> dict[int, bytes]:
        if length % 2:
            # PS3.5 7.1.1: every DICOM value, so every dataset, has an even length.
            raise RefusedFile(
                f"the dataset has an odd length ({length} bytes): malformed DICOM, "
                "not sent"
            )
        msg_id = self.next_message_id()
        cmd = _command(
            _element(0x0002, sop_class.encode()),
            _element(0x0100, _us(0x0001)),
            _element(0x0110, _us(msg_id)),
            _element(0x0700, _us(0x0000)),  # medium priority
            _element(0x0800, _us(0x0000)),  # a dataset follows
            _element(0x1000, sop_instance.encode()),
        )
        chunk = self.fragment_size()
        parts = self._command_pdus(cx.id, cmd)
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

    def fragment_size(self) -> int:
        """The largest PDV data that fits the peer's maximum PDU length, even.

        Each P-DATA-TF's variable part is at most the peer's maximum length: 4 bytes
        item length + 2 bytes context id and control header + data. Even, so that
        every fragment of an even dataset is even whatever the peer announced.
        """
        return max(2, (self.peer_max_pdu - 6) & ~1)

    def _command_pdus(self, context_id: int, cmd: bytes) -> list[bytes]:
        """A command set as PDUs, split only for a peer with a tiny maximum."""
        chunk = self.fragment_size()
        parts: list[bytes] = []
        for start in range(0, len(cmd), chunk):
            last = start + chunk >= len(cmd)
            control = COMMAND | (LAST if last else 0)
            parts += self._pdata(context_id, control, cmd[start : start + chunk])
        return parts

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
        """Read P-DATA until a whole command set arrives; return its elements.

        The DIMSE timeout bounds the whole response, not each read: a peer that
        trickles fragments without ever ending the command cannot hold the
        association (and the job) forever.
        """
        deadline = time.monotonic() + self.dimse_timeout
        command = bytearray()
        while True:
            try:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
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
            if len(command) > MAX_COMMAND:
                raise LinkError(
                    f"the target's response is over {MAX_COMMAND} bytes without "
                    "ending: not a DIMSE response"
                )
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
        """Release politely; abort if the peer does not answer in time.

        A release collision (the peer's A-RELEASE-RQ crossing ours) is answered as
        the requestor does in PS3.8 9.2.6 / table 9-10 (AR-8, AR-9): send
        A-RELEASE-RP, then wait for the peer's. The ACSE timeout bounds the whole
        wait (a peer sending other PDUs instead cannot prolong it).
        """
        if self._closed:
            return
        deadline = time.monotonic() + self.acse_timeout
        try:
            self.sock.settimeout(self.acse_timeout)
            self.sock.sendall(struct.pack(">BBIxxxx", RELEASE_RQ, 0, 4))
            while True:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                pdu_type, _ = _read_pdu(self.sock, self._buffer)
                if pdu_type == RELEASE_RQ:
                    self.sock.sendall(struct.pack(">BBIxxxx", RELEASE_RP, 0, 4))
                elif pdu_type in (RELEASE_RP, ABORT):
                    break
        except (OSError, LinkError):
            self.abort()
            return
        self.close()

    def abort(self) -> None:
        if not self._closed:
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(abort_pdu())
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
    # An ASCII name or address as bytes: a str goes through the idna codec, whose
    # import is a few ms of a one-file send_series; other names still do.
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    try:
        sock = socket.create_connection((name, port), timeout=timeout)
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
