"""Storage Commitment as the requester (PS3.4 J.3): N-ACTION, then wait for the report.

After a series is stored, Courier asks the target to commit it: an N-ACTION-RQ
(Action Type 1, "Request Storage Commitment") whose dataset holds a Transaction UID
and the Referenced SOP Sequence. The target answers with an N-ACTION-RSP at once and
sends the result later as an N-EVENT-REPORT-RQ, either on this association while it is
open or on a new association it opens to Courier's receiver (Orthanc always does the
latter). `request` keeps the association open, answers a report that comes on it, and
asks `poll()` every tick for one that came the other way; whichever comes first wins.

Protocol code: no models, no settings.
"""

from __future__ import annotations

import select
import ssl
import struct
import time
from collections.abc import Callable, Sequence

from targets.dicomnet.commitment import (
    MAX_DATASET,
    N_ACTION_RQ,
    N_ACTION_RSP,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    NO_DATASET,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentError,
    Reference,
    Report,
    encode_report,
    parse_report,
    pdata,
)
from targets.dicomnet.scu import (
    ABORT,
    COMMAND,
    LAST,
    P_DATA_TF,
    RELEASE_RP,
    RELEASE_RQ,
    Association,
    LinkError,
    LinkTimeout,
    _command,
    _element,
    _us,
    check_command_size,
    parse_command,
    read_pdu_by,
)

REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2)
PROCESSING_FAILURE = 0x0110

# Failure reasons of a reference in words (PS3.4 J.3.3.1.1.2, C.4.2.1.4 for the rest).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
# N-ACTION statuses that say the target cannot commit at all (PS3.7 C.4.2.1.4):
# asking again changes nothing until someone changes its configuration.
_REFUSED_FOR_GOOD = {0x0112, 0x0118, 0x0122, 0x0123, 0x0124, 0x0211}


def failure_text(reason: int | None) -> str:
    """A failure reason in words, with its code: "no such object instance (0x0112)"."""
    code = PROCESSING_FAILURE if reason is None else reason
    return f"{FAILURE_REASONS.get(code, 'failure')} (0x{code:04X})"


class Closed(Exception):
    """The peer released or aborted the association (it may still report elsewhere)."""


def action_rq(msg_id: int) -> bytes:
    return _command(
        _element(0x0003, STORAGE_COMMITMENT.encode()),
        _element(0x0100, _us(N_ACTION_RQ)),
        _element(0x0110, _us(msg_id)),
        _element(0x0800, _us(0x0000)),  # a dataset follows
        _element(0x1001, STORAGE_COMMITMENT_INSTANCE.encode()),
        _element(0x1008, _us(REQUEST_STORAGE_COMMITMENT)),
    )


def event_report_rsp(msg_id: int, event_type: int, status: int) -> bytes:
    return _command(
        _element(0x0002, STORAGE_COMMITMENT.encode()),
        _element(0x0100, _us(N_EVENT_REPORT_RSP)),
        _element(0x0120, _us(msg_id)),
        _element(0x0800, _us(NO_DATASET)),
        _element(0x0900, _us(status)),
        _element(0x1000, STORAGE_COMMITMENT_INSTANCE.encode()),
        _element(0x1002, _us(event_type)),
    )


def request(
    assoc: Association,
    transaction_uid: str,
    references: Sequence[Reference],
    *,
    wait: float,
    poll: Callable[[], Report | None],
    tick: float = 1.0,
) -> Report | None:
    """Ask for commitment of `references`; return the report, or None after `wait` s.

    `assoc` must have an accepted Storage Commitment Push Model context. `poll()`
    is called about every `tick` seconds and returns the report if it arrived
    another way (it may raise to stop waiting). Raise `LinkError` in words if the
    target refuses the request or does not answer it within the DIMSE timeout.
    The association is left as the peer left it (see `assoc._closed`).
    """
    contexts = assoc.contexts_for(STORAGE_COMMITMENT)
    if not contexts:
        raise LinkError(
            "the target did not accept the Storage Commitment Push Model SOP class "
            f"({STORAGE_COMMITMENT}): enable storage commitment on it for Courier, "
            "or turn off 'Request storage commitment'",
            permanent=True,
        )
    cx = contexts[0]
    msg_id = assoc.next_message_id()
    # The request's dataset has the layout of an all-committed report: the
    # Transaction UID and the Referenced SOP Sequence (PS3.4 J.3.2.1.1).
    data = encode_report(
        Report(transaction_uid, committed=list(references)), cx.transfer_syntax
    )
    pdus = pdata(cx.id, COMMAND | LAST, action_rq(msg_id), assoc.peer_max_pdu)
    pdus += pdata(cx.id, 0, data, assoc.peer_max_pdu)
    assoc._send(pdus)
    start = time.monotonic()
    deadline = start + wait
    answered = False
    while True:
        report = poll()
        if report is not None:
            return report
        now = time.monotonic()
        if not answered and now - start > assoc.dimse_timeout:
            raise LinkTimeout(
                "no answer to the storage commitment request (N-ACTION) within "
                f"{assoc.dimse_timeout:g} s (DIMSE timeout)"
            )
        if now >= deadline:
            return None
        step = min(tick, deadline - now)
        if assoc._closed:
            time.sleep(step)
            continue
        try:
            message = _next_message(assoc, step)
        except Closed as exc:
            if not answered:
                raise LinkError(
                    f"the target {exc} before answering the storage commitment request"
                ) from None
            continue
        if message is None:
            continue
        context_id, cmd, dataset = message
        field = _us_value(cmd.get(0x0100))
        if field == N_ACTION_RSP:
            if _us_value(cmd.get(0x0120)) != msg_id:
                raise LinkError("the target answered a different message")
            status = _us_value(cmd.get(0x0900))
            if status is None or status != 0x0000:
                comment = (
                    cmd.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")
                )
                raise LinkError(
                    "the target refused the storage commitment request with status "
                    + (f"0x{status:04X}" if status is not None else "(none)")
                    + (f" ({comment})" if comment else ""),
                    permanent=status in _REFUSED_FOR_GOOD,
                )
            answered = True
        elif field == N_EVENT_REPORT_RQ:
            report = _answer_report(assoc, context_id, cmd, dataset, cx)
            if report is not None and report.transaction_uid == transaction_uid:
                return report
        # Anything else (a response to nothing of ours) is ignored.


def _answer_report(assoc, context_id, cmd, dataset, cx) -> Report | None:
    """Answer an N-EVENT-REPORT-RQ on this association; return its report if valid."""
    report = None
    status = 0x0000
    try:
        if dataset is None:
            raise CommitmentError("the report has no dataset")
        report = parse_report(dataset, cx.transfer_syntax)
    except CommitmentError:
        status = PROCESSING_FAILURE
    rsp = event_report_rsp(
        _us_value(cmd.get(0x0110)) or 0, _us_value(cmd.get(0x1002)) or 0, status
    )
    assoc._send(pdata(context_id, COMMAND | LAST, rsp, assoc.peer_max_pdu))
    return report


def _us_value(value: bytes | None) -> int | None:
    if value is None or len(value) < 2:
        return None
    return struct.unpack("<H", value[:2])[0]


def _readable(assoc: Association, timeout: float) -> bool:
    if assoc._buffer:
        return True
    sock = assoc.sock
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
    return bool(ready)


def _next_message(
    assoc: Association, timeout: float
) -> tuple[int, dict[int, bytes], bytes | None] | None:
    """The next whole DIMSE message: (context id, command, dataset or None).

    None if nothing arrives within `timeout`; once a message starts, all of it must
    come within the DIMSE timeout, its command set within `MAX_COMMAND` bytes. Raise `Closed` if the peer releases (it is
    answered) or aborts, or the connection ends.
    """
    if not _readable(assoc, timeout):
        return None
    sock = assoc.sock
    # The whole message, not each read: a peer trickling fragments cannot hold on.
    deadline = time.monotonic() + assoc.dimse_timeout
    command = bytearray()
    data = bytearray()
    cmd: dict[int, bytes] | None = None
    while True:
        try:
            pdu_type, pdu = read_pdu_by(sock, assoc._buffer, deadline)
        except TimeoutError as exc:
            raise LinkTimeout(
                "the target did not complete a message within "
                f"{assoc.dimse_timeout:g} s (DIMSE timeout)"
            ) from exc
        except OSError:
            assoc.close()
            raise Closed("closed the connection") from None
        if pdu_type == ABORT:
            assoc.close()
            raise Closed("aborted the association")
        if pdu_type == RELEASE_RQ:
            try:
                sock.sendall(struct.pack(">BBIxxxx", RELEASE_RP, 0, 4))
            except OSError:
                pass
            assoc.close()
            raise Closed("released the association")
        if pdu_type != P_DATA_TF:
            raise LinkError(f"unexpected PDU type {pdu_type:#04x} from the target")
        pos = 6
        while pos + 6 <= len(pdu):
            (item_length,) = struct.unpack_from(">I", pdu, pos)
            context_id, control = pdu[pos + 4], pdu[pos + 5]
            value = pdu[pos + 6 : pos + 4 + item_length]
            pos += 4 + item_length
            if control & COMMAND:
                command += value
                check_command_size(command)
                if control & LAST:
                    cmd = parse_command(bytes(command))
                    if _us_value(cmd.get(0x0800)) == NO_DATASET:
                        return context_id, cmd, None
            else:
                data += value
                if len(data) > MAX_DATASET:
                    raise LinkError("the target sent a dataset too large for a report")
                if control & LAST and cmd is not None:
                    return context_id, cmd, bytes(data)
