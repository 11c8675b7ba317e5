"""Storage Commitment Push Model (PS3.4 Annex J): its datasets, and the association
that delivers a report to a requester that is no longer connected.

The receiver (`scp`) answers a modality's N-ACTION and sends the N-EVENT-REPORT on
the same association while it is open; `send_report` opens a new one to the
requester when it is not (PS3.4 J.3.3: the report may come on either). It proposes
the Storage Commitment Push Model with the SCP role (role selection, PS3.7 D.3.3.4),
as the SCP side of the SOP class is what sends N-EVENT-REPORTs, and it ends with
A-RELEASE, answering a release collision as PS3.8 9.2.7 says (the requester's side
of the collision: A-RELEASE-RP first, then wait for the peer's).

The datasets are small (a few hundred bytes per referenced instance) and are read
and written with pydicom. Protocol code: no models, no settings.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO

from targets.dicomnet import load_pydicom
from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.dicomnet.scu import (
    ABORT,
    APPLICATION_CONTEXT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    COMMAND,
    LAST,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ,
    AssociationRejected,
    LinkError,
    LinkTimeout,
    _command,
    _element,
    _read_pdu,
    _us,
    connect,
    parse_command,
)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
# The one (well-known) SOP instance of the push model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE)

# DIMSE command fields (PS3.7 E.1)
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
NO_DATASET = 0x0101

# Event types of the report (PS3.4 J.3.3.1): all committed; some failed.
ALL_COMMITTED, SOME_FAILED = 1, 2
# Failure reasons of a reference (PS3.4 J.3.3.1.1.2).
PROCESSING_FAILURE = 0x0110
INVALID_ARGUMENT_VALUE = 0x0115
NO_SUCH_OBJECT = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
# A report or request dataset larger than this is refused (about 100,000 references).
MAX_DATASET = 16 * 1024 * 1024

_TRANSACTION_UID = 0x00081195
_REFERENCED_SOP_SEQUENCE = 0x00081199
_FAILED_SOP_SEQUENCE = 0x00081198


class CommitmentError(ValueError):
    """A Storage Commitment dataset that cannot be understood."""

    # The N-ACTION's answer (PS3.7 10.1.4.1.10): processing failure unless a
    # subclass says which argument is wrong.
    status = PROCESSING_FAILURE


class InvalidRequest(CommitmentError):
    """A request that reads but lacks what it must hold: "invalid argument value"
    (0x0115; Missing Attribute, 0x0120, is not an N-ACTION status)."""

    status = INVALID_ARGUMENT_VALUE


@dataclass(frozen=True)
class Reference:
    """One referenced instance; `failure` is its failure reason (None: committed)."""

    sop_class: str
    sop_instance: str
    failure: int | None = None


@dataclass
class Report:
    """The result of one commitment transaction (an N-EVENT-REPORT's content)."""

    transaction_uid: str
    committed: list[Reference] = field(default_factory=list)
    failed: list[Reference] = field(default_factory=list)

    @property
    def event_type(self) -> int:
        return SOME_FAILED if self.failed else ALL_COMMITTED


@dataclass
class Request:
    """An N-ACTION asking for commitment, and who asked."""

    transaction_uid: str
    references: list[Reference]
    calling_aet: str
    called_aet: str
    address: str


# -- datasets ----------------------------------------------------------------------


def _read(data: bytes, transfer_syntax: str):
    load_pydicom()  # the receiver's association threads and the sender's
    from pydicom.filereader import read_dataset

    if len(data) > MAX_DATASET:
        raise CommitmentError(f"dataset larger than {MAX_DATASET} bytes")
    try:
        return read_dataset(
            BytesIO(data), transfer_syntax == IMPLICIT_LE, True, len(data)
        )
    except Exception as exc:  # pydicom raises assorted errors on bad bytes
        raise CommitmentError(f"unreadable dataset: {exc}") from None


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value if value is not None else "").strip("\x00 ")


def _references(ds, keyword: str) -> list[Reference]:
    out = []
    for item in ds.get(keyword) or []:
        reason = item.get("FailureReason")
        out.append(
            Reference(
                _text(item, "ReferencedSOPClassUID"),
                _text(item, "ReferencedSOPInstanceUID"),
                int(reason) if reason is not None else None,
            )
        )
    return out


def parse_action(data: bytes, transfer_syntax: str) -> tuple[str, list[Reference]]:
    """An N-ACTION's Action Information: (transaction UID, referenced instances)."""
    ds = _read(data, transfer_syntax)
    try:
        uid, refs = (
            _text(ds, "TransactionUID"),
            _references(ds, "ReferencedSOPSequence"),
        )
    except Exception as exc:
        raise CommitmentError(f"unreadable request: {exc}") from None
    if not uid:
        raise InvalidRequest("the request has no Transaction UID")
    if not refs:
        # Nothing to commit: "all committed" for nothing would mislead the modality.
        raise InvalidRequest("the request names no instance (Referenced SOP Sequence)")
    return uid, refs


def parse_report(data: bytes, transfer_syntax: str) -> Report:
    """An N-EVENT-REPORT's Event Information."""
    ds = _read(data, transfer_syntax)
    try:
        report = Report(
            _text(ds, "TransactionUID"),
            _references(ds, "ReferencedSOPSequence"),
            [
                ref
                if ref.failure is not None
                else Reference(ref.sop_class, ref.sop_instance, PROCESSING_FAILURE)
                for ref in _references(ds, "FailedSOPSequence")
            ],
        )
    except Exception as exc:
        raise CommitmentError(f"unreadable report: {exc}") from None
    if not report.transaction_uid:
        raise CommitmentError("the report has no Transaction UID")
    return report


def encode_report(report: Report, transfer_syntax: str) -> bytes:
    """The N-EVENT-REPORT's Event Information for `report`."""
    load_pydicom()
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.sequence import Sequence as DicomSequence

    def item(ref: Reference) -> Dataset:
        d = Dataset()
        d.ReferencedSOPClassUID = ref.sop_class
        d.ReferencedSOPInstanceUID = ref.sop_instance
        if ref.failure is not None:
            d.FailureReason = ref.failure
        return d

    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.failed:
        ds.FailedSOPSequence = DicomSequence([item(r) for r in report.failed])
    if report.committed:
        ds.ReferencedSOPSequence = DicomSequence([item(r) for r in report.committed])
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, transfer_syntax == IMPLICIT_LE
    write_dataset(buf, ds)
    return buf.getvalue()


# -- DIMSE command sets ------------------------------------------------------------


def event_report_rq(msg_id: int, event_type: int) -> bytes:
    return _command(
        _element(0x0002, STORAGE_COMMITMENT.encode()),
        _element(0x0100, _us(N_EVENT_REPORT_RQ)),
        _element(0x0110, _us(msg_id)),
        _element(0x0800, _us(0x0000)),  # a dataset follows
        _element(0x1000, STORAGE_COMMITMENT_INSTANCE.encode()),
        _element(0x1002, _us(event_type)),
    )


def pdata(context_id: int, control: int, data: bytes, max_pdu: int) -> list[bytes]:
    """`data` as P-DATA-TF PDUs of at most `max_pdu` bytes each (0: no limit)."""
    chunk = (max_pdu or 1 << 20) - 6
    out, pos = [], 0
    while True:
        piece = data[pos : pos + chunk]
        pos += len(piece)
        last = pos >= len(data)
        out.append(
            struct.pack(
                ">BBIIBB",
                P_DATA_TF,
                0,
                len(piece) + 6,
                len(piece) + 2,
                context_id,
                control & COMMAND | (LAST if last else 0),
            )  # fmt: skip
            + piece
        )
        if last:
            return out


# -- delivering a report on a new association --------------------------------------


def send_report(
    host: str,
    port: int,
    *,
    calling_aet: str,
    called_aet: str,
    report: Report,
    timeout: float = 30.0,
    max_pdu: int = 256 * 1024,
) -> None:
    """Open an association to the requester and deliver `report` as N-EVENT-REPORT.

    Return when the requester answered success; raise `LinkError` in words
    otherwise (refused, rejected, timed out, a failure status).
    """
    where = f"{host}:{port}"
    sock = connect(host, port, timeout)
    buffer = bytearray()
    try:
        sock.settimeout(timeout)
        sock.sendall(_associate_rq(calling_aet, called_aet, max_pdu))
        context_id, syntax, peer_max = _accepted(sock, buffer, where)
        command = event_report_rq(1, report.event_type)
        data = encode_report(report, syntax)
        pdus = pdata(context_id, COMMAND | LAST, command, peer_max)
        pdus += pdata(context_id, 0, data, peer_max)
        sock.sendall(b"".join(pdus))
        status = _response_status(sock, buffer, where)
        if status != 0x0000:
            raise LinkError(
                f"{where} answered the storage commitment report with status "
                f"0x{status:04X}"
            )
        release(sock, buffer)
    except TimeoutError as exc:
        _abort(sock)
        raise LinkTimeout(f"no answer from {where} within {timeout:g} s") from exc
    except OSError as exc:
        _abort(sock)
        raise LinkError(f"connection to {where} lost: {exc}") from exc
    except BaseException:
        _abort(sock)
        raise
    finally:
        sock.close()


def _associate_rq(calling_aet: str, called_aet: str, max_pdu: int) -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
        SCP_SCU_RoleSelectionNegotiation,
    )
    from pynetdicom.presentation import PresentationContext

    rq = A_ASSOCIATE()
    rq.application_context_name = APPLICATION_CONTEXT
    rq.calling_ae_title = calling_aet
    rq.called_ae_title = called_aet
    cx = PresentationContext()
    cx.context_id = 1
    cx.abstract_syntax = STORAGE_COMMITMENT
    cx.transfer_syntax = list(SYNTAXES)
    rq.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_version = ImplementationVersionNameNotification()
    impl_version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    # The association's requester sends the N-EVENT-REPORT: the SCP role.
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = STORAGE_COMMITMENT
    role.scu_role, role.scp_role = False, True
    rq.user_information = [max_length, impl_uid, impl_version, role]
    return A_ASSOCIATE_RQ(rq).encode()


def _accepted(sock: socket.socket, buffer: bytearray, where: str):
    """(context id, transfer syntax, peer's max PDU) of the accepted context."""
    from pynetdicom.pdu import A_ASSOCIATE_AC

    pdu_type, pdu = _read_pdu(sock, buffer)
    if pdu_type == ASSOCIATE_RJ and len(pdu) >= 10:
        raise AssociationRejected(pdu[7], pdu[8], pdu[9])
    if pdu_type != ASSOCIATE_AC:
        raise LinkError(f"{where} answered the association request with PDU "
                        f"type 0x{pdu_type:02X}")  # fmt: skip
    ac = A_ASSOCIATE_AC()
    try:
        ac.decode(pdu)
        answer = ac.to_primitive()
    except Exception as exc:  # pynetdicom raises assorted errors on bad bytes
        raise LinkError(f"{where} sent a malformed association answer") from exc
    for cx in answer.presentation_context_definition_results_list:
        if cx.context_id == 1 and cx.result == 0 and cx.transfer_syntax:
            syntax = str(cx.transfer_syntax[0])
            if syntax in SYNTAXES:
                return 1, syntax, answer.maximum_length_received or 0
    _abort(sock)
    raise LinkError(f"{where} did not accept the Storage Commitment Push Model")


def _response_status(sock: socket.socket, buffer: bytearray, where: str) -> int:
    command = bytearray()
    while True:
        pdu_type, pdu = _read_pdu(sock, buffer)
        if pdu_type == ABORT:
            raise LinkError(f"{where} aborted the association")
        if pdu_type != P_DATA_TF:
            raise LinkError(f"{where} sent PDU type 0x{pdu_type:02X} instead of "
                            "a response")  # fmt: skip
        pos = 6
        while pos + 6 <= len(pdu):
            (item_length,) = struct.unpack_from(">I", pdu, pos)
            if pdu[pos + 5] & COMMAND:
                command += pdu[pos + 6 : pos + 4 + item_length]
                if pdu[pos + 5] & LAST:
                    rsp = parse_command(bytes(command))
                    field_ = rsp.get(0x0100, b"")
                    status = rsp.get(0x0900, b"")
                    if field_[:2] != _us(N_EVENT_REPORT_RSP) or len(status) < 2:
                        raise LinkError(f"{where} answered with another message")
                    return struct.unpack("<H", status[:2])[0]
            pos += 4 + item_length


def release(sock: socket.socket, buffer: bytearray) -> None:
    """A-RELEASE as the association's requester, collisions included (PS3.8 9.2.7).

    If the peer asks for release too while Courier waits for its A-RELEASE-RP (a
    release collision, state Sta9), the requester answers first with A-RELEASE-RP
    (Sta11) and then waits for the peer's A-RELEASE-RP. P-DATA still arriving in
    the meantime is dropped; an A-ABORT ends it.
    """
    sock.sendall(struct.pack(">BBIxxxx", RELEASE_RQ, 0, 4))
    while True:
        pdu_type, _pdu = _read_pdu(sock, buffer)
        if pdu_type == RELEASE_RP or pdu_type == ABORT:
            return
        if pdu_type == RELEASE_RQ:
            sock.sendall(struct.pack(">BBIxxxx", RELEASE_RP, 0, 4))
            # Sta11: only the peer's A-RELEASE-RP (or an abort) is left to come.


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, 0, 0))


def references_text(refs: Sequence[Reference]) -> str:
    """A short summary for log lines: the count and the first UID."""
    if not refs:
        return "0"
    return f"{len(refs)} (first {refs[0].sop_instance})"
