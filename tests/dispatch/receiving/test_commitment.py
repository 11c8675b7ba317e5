"""Storage Commitment on the receiver (PS3.4 Annex J), with pynetdicom as the other
side: a modality asking Courier to commit what it sent (the report on the same
association, or on a new one when the modality does not take it there), and a peer
reporting on a commitment Courier asked for (kept in `StorageCommitment`)."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from dispatch.jobs.commitment import record_report
from dispatch.jobs.models import StorageCommitment
from dispatch.receiving.bookkeeping import DatabaseBookkeeper
from dispatch.receiving.commitment import parse_peers
from targets.dicomnet.commitment import (
    NO_SUCH_OBJECT,
    STORAGE_COMMITMENT_INSTANCE,
    Reference,
    Report,
    send_report,
)
from targets.dicomnet.identity import IMPLEMENTATION_CLASS_UID
from tests.dicomgen import make_series
from tests.fixtures.receive_peers import responses_to_the_caller, storescu
from tests.peers import free_port
from tests.rawdicom import COMMAND, EXPLICIT_LE, LAST, command_set, p_data

RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def commit_request(refs: list[tuple[str, str]]) -> tuple[str, Dataset]:
    uid = generate_uid()
    ds = Dataset()
    ds.TransactionUID = uid
    ds.ReferencedSOPSequence = DicomSequence()
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return uid, ds


def refs_of(ds: Dataset, keyword: str) -> dict[str, int | None]:
    return {
        str(item.ReferencedSOPInstanceUID): item.get("FailureReason")
        for item in ds.get(keyword, [])
    }


class Reports:
    """N-EVENT-REPORTs a pynetdicom requester takes, with who sent them."""

    def __init__(self):
        self.got: list[tuple[int, Dataset, str, str]] = []
        self.arrived = threading.Event()

    def handle(self, event):
        ds = event.event_information
        self.got.append(
            (
                int(event.event_type),
                ds,
                event.assoc.requestor.ae_title,
                str(event.assoc.requestor.implementation_class_uid),
            )
        )
        self.arrived.set()
        return 0x0000, None


def sent_series(rx, tmp_path, count: int = 2):
    series = make_series(tmp_path / "series", count)
    assert storescu(rx.port, series.files).returncode == 0
    return [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            for f in series.files]  # fmt: skip


def test_a_modality_gets_its_report_on_the_association_it_asked_on(receiver, tmp_path):
    rx = receiver()
    stored = sent_series(rx, tmp_path)
    never_sent = generate_uid()
    uid, request = commit_request(
        [(CT_IMAGE, stored[0]), (CT_IMAGE, stored[1]), (CT_IMAGE, never_sent)]
    )
    reports = Reports()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1", rx.port, ae_title="COURIER",
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)],
    )  # fmt: skip
    assert assoc.is_established
    # Courier introduces itself as Courier, not as the library it is built on.
    assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert assoc.acceptor.implementation_version_name.startswith("COURIER_")
    try:
        status, _ = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        assert status.Status == 0x0000
        assert reports.arrived.wait(30), "no N-EVENT-REPORT on the association"
    finally:
        assoc.release()

    ((event_type, ds, _, _),) = reports.got
    assert event_type == 2  # some failed
    assert ds.TransactionUID == uid
    assert refs_of(ds, "ReferencedSOPSequence") == {
        stored[0]: None,
        stored[1]: None,
    }
    assert refs_of(ds, "FailedSOPSequence") == {never_sent: NO_SUCH_OBJECT}


def test_all_committed_is_event_type_1_and_a_wrong_sop_class_fails(receiver, tmp_path):
    rx = receiver()
    stored = sent_series(rx, tmp_path, 1)
    reports = Reports()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handle)]
    for refs, expected in (
        ([(CT_IMAGE, stored[0])], 1),
        ([("1.2.840.10008.5.1.4.1.1.4", stored[0])], 2),  # MR class, CT stored
    ):
        reports.arrived.clear()
        _, request = commit_request(refs)
        assoc = ae.associate("127.0.0.1", rx.port, ae_title="COURIER",
                             evt_handlers=handlers)  # fmt: skip
        assert assoc.is_established
        status, _ = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        assert status.Status == 0x0000
        assert reports.arrived.wait(30)
        assoc.release()
        assert reports.got[-1][0] == expected
    assert refs_of(reports.got[-1][1], "FailedSOPSequence") == {stored[0]: 0x0119}


@pytest.mark.parametrize("modality_does", ["release", "refuse"])
def test_the_report_goes_on_a_new_association_when_the_modality_does_not_take_it(
    receiver, tmp_path, modality_does
):
    """The modality asks, then releases without taking the report, or answers it
    with a failure (as many do: they expect it on an association of their own):
    Courier opens one to the address configured for the modality's AE title, and
    calls itself by the AE title the modality called."""
    reports = Reports()
    modality = AE(ae_title="MODALITY")
    modality.add_supported_context(
        StorageCommitmentPushModel, scu_role=True, scp_role=True
    )
    port = free_port()
    server = modality.start_server(
        ("127.0.0.1", port), block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)],
    )  # fmt: skip
    try:
        rx = receiver(commitment_peers=parse_peers([f"MODALITY=127.0.0.1:{port}"]))
        stored = sent_series(rx, tmp_path, 1)
        uid, request = commit_request([(CT_IMAGE, stored[0])])
        requester = AE(ae_title="MODALITY")
        requester.add_requested_context(StorageCommitmentPushModel)
        refused = threading.Event()

        def refuse(event):
            refused.set()
            return 0x0110, None

        handlers = [(evt.EVT_N_EVENT_REPORT, refuse)]
        assoc = requester.associate(
            "127.0.0.1", rx.port, ae_title="COURIER",
            evt_handlers=handlers if modality_does == "refuse" else [],
        )  # fmt: skip
        assert assoc.is_established
        status, _ = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        assert status.Status == 0x0000
        if modality_does == "refuse":
            # Still open while the report comes on a new association.
            assert refused.wait(30)
            assert reports.arrived.wait(30), "no report on a new association"
        assoc.release()
        assert reports.arrived.wait(30), "no report on a new association"
    finally:
        server.shutdown()

    ((event_type, ds, calling, impl_uid),) = reports.got
    assert (event_type, ds.TransactionUID) == (1, uid)
    assert refs_of(ds, "ReferencedSOPSequence") == {stored[0]: None}
    assert calling == "COURIER"
    assert impl_uid == IMPLEMENTATION_CLASS_UID


def test_a_report_for_an_unknown_modality_is_logged_not_sent(
    receiver, tmp_path, caplog
):
    rx = receiver()  # no COURIER_RECEIVER_COMMITMENT_PEERS
    stored = sent_series(rx, tmp_path, 1)
    _, request = commit_request([(CT_IMAGE, stored[0])])
    requester = AE(ae_title="LONELY_CT")
    requester.add_requested_context(StorageCommitmentPushModel)
    assoc = requester.associate("127.0.0.1", rx.port, ae_title="COURIER")
    status, _ = assoc.send_n_action(
        request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
    )
    assert status.Status == 0x0000
    assoc.release()
    # The association's thread logs it after the release it answered: poll for it
    # (asserting at once raced that thread on a loaded machine).
    deadline = time.monotonic() + 30
    while "commitment_report_undeliverable" not in caplog.text:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    rx.stop()
    assert "event=commitment_report_undeliverable" in caplog.text
    assert "COURIER_RECEIVER_COMMITMENT_PEERS" in caplog.text


@pytest.mark.parametrize(
    "entry",
    ["CT1", "CT1=host", "CT1=host:port", "=host:104", "CT1=host:0",
     "A_TITLE_LONGER_THAN_16=host:104"],
)  # fmt: skip
def test_a_bad_peer_entry_is_refused_in_words(entry):
    with pytest.raises(ValueError) as err:
        parse_peers([entry])
    assert str(err.value)


def test_peer_entries_are_parsed():
    assert parse_peers(["CT1=10.0.0.5:104", " MR2 = mr2.example.org:11112 ", ""]) == {
        "CT1": ("10.0.0.5", 104),
        "MR2": ("mr2.example.org", 11112),
    }


# -- the hook: reports on commitments Courier asked for ---------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_report_sent_to_the_receiver_is_recorded_by_transaction_uid(receiver):
    """What Orthanc does after Courier's N-ACTION: a new association to Courier's
    receiver, Courier in the SCU role, the N-EVENT-REPORT on it."""
    rx = receiver(bookkeeper=DatabaseBookkeeper("test"))
    uid = generate_uid()
    StorageCommitment.objects.create(transaction_uid=uid)
    committed, failed = generate_uid(), generate_uid()
    report = Dataset()
    report.TransactionUID = uid
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID, ok.ReferencedSOPInstanceUID = CT_IMAGE, committed
    bad.ReferencedSOPClassUID, bad.ReferencedSOPInstanceUID = CT_IMAGE, failed
    bad.FailureReason = NO_SUCH_OBJECT
    report.ReferencedSOPSequence = DicomSequence([ok])
    report.FailedSOPSequence = DicomSequence([bad])

    archive = AE(ae_title="ARCHIVE")
    archive.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    assoc = archive.associate("127.0.0.1", rx.port, ae_title="COURIER",
                              ext_neg=[role])  # fmt: skip
    assert assoc.is_established
    status, _ = assoc.send_n_event_report(
        report, 2, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
    )
    assoc.release()

    assert status.Status == 0x0000
    row = StorageCommitment.objects.get(transaction_uid=uid)
    assert row.outcome == StorageCommitment.Outcome.FAILED
    assert row.committed == [[CT_IMAGE, committed]]
    assert row.failed == [[CT_IMAGE, failed, NO_SUCH_OBJECT]]
    assert row.reported_by == "ARCHIVE"
    assert row.reported_from.startswith("127.0.0.1")


@pytest.mark.django_db(transaction=True)
def test_a_report_courier_drops_is_answered_invalid_argument_and_logged_once(
    receiver, caplog
):
    """A report Courier drops is refused on the wire, not acknowledged: on a
    transaction Courier never asked for, or from an AE title other than the
    target's, the N-EVENT-REPORT-RSP carries 0x0115 (invalid argument value, PS3.7
    10.1.1.1.8), the same for both, and the log has one line for the drop, its
    values quoted (on main: 0x0000, and "received" logged before the drop). The
    target's own report is still answered 0x0000 and kept."""
    rx = receiver(bookkeeper=DatabaseBookkeeper("test"))
    asked = generate_uid()
    StorageCommitment.objects.create(transaction_uid=asked, reported_by="PACS")
    forged = "1.2.3\nevent=commitment_report_received " + "9" * 100

    def report(uid: str) -> Dataset:
        ds = Dataset()
        ds.TransactionUID = uid
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE
        item.ReferencedSOPInstanceUID = generate_uid()
        ds.ReferencedSOPSequence = DicomSequence([item])
        return ds

    def statuses(aet: str, uids: list[str]) -> list[int]:
        peer = AE(ae_title=aet)
        peer.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        assoc = peer.associate("127.0.0.1", rx.port, ae_title="COURIER",
                               ext_neg=[role])  # fmt: skip
        assert assoc.is_established
        responses_to_the_caller(assoc)
        out = []
        for uid in uids:
            status, _ = assoc.send_n_event_report(
                report(uid), 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )
            out.append(status.Status)
        assoc.release()
        return out

    with pytest.warns(UserWarning):  # pydicom: the forged value is no valid UID
        intruder = statuses("INTRUDER", [asked, generate_uid(), forged])
    assert intruder == [0x0115, 0x0115, 0x0115]
    assert statuses("PACS", [generate_uid(), asked]) == [0x0115, 0x0000]

    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("courier") and "commitment_report" in r.getMessage()
    ]
    assert [line.split()[0] for line in lines] == [
        "event=commitment_report_wrong_peer",
        "event=commitment_report_unsolicited",
        "event=commitment_report_unsolicited",
        "event=commitment_report_unsolicited",
        "event=commitment_report_received",
    ]
    assert "calling_aet=PACS" in lines[-1] and f"transaction={asked}" in lines[-1]
    # The forged UID: one quoted field of at most 64 characters, not a new line.
    assert "\n" not in lines[2]
    assert 'transaction="1.2.3\\nevent=commitment_report_received 9999' in lines[2]
    assert "9" * 60 not in lines[2]
    row = StorageCommitment.objects.get(transaction_uid=asked)
    assert (row.outcome, row.reported_by) == (
        StorageCommitment.Outcome.COMMITTED,
        "PACS",
    )
    assert StorageCommitment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_report_arriving_twice_keeps_the_latest():
    uid = generate_uid()
    StorageCommitment.objects.create(transaction_uid=uid)  # Courier asked
    first = record_report(uid, [], [(CT_IMAGE, "1.2.3", NO_SUCH_OBJECT)])
    assert first.outcome == StorageCommitment.Outcome.FAILED
    again = record_report(uid, [(CT_IMAGE, "1.2.3")], [], reported_by="PACS")
    assert again.pk == first.pk
    row = StorageCommitment.objects.get(transaction_uid=uid)
    assert row.outcome == StorageCommitment.Outcome.COMMITTED
    assert (row.committed, row.failed, row.reported_by) == (
        [[CT_IMAGE, "1.2.3"]],
        [],
        "PACS",
    )


# -- Courier's own association for a report: release collision (PS3.8 9.2.7) -------------


def _raw_requester_peer(server: socket.socket, seen: list[bytes]) -> None:
    """A modality's listener, byte by byte: accepts Courier's association, takes the
    report, and asks to release just as Courier does (a collision): A-RELEASE-RQ,
    then, as the acceptor, waits for Courier's A-RELEASE-RP before sending its own."""
    conn, _ = server.accept()
    conn.settimeout(30)
    buffer = b""

    def pdu() -> tuple[int, bytes]:
        nonlocal buffer
        while len(buffer) < 6 or len(buffer) < 6 + struct.unpack(">I", buffer[2:6])[0]:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buffer += data
        length = struct.unpack(">I", buffer[2:6])[0]
        out, buffer = (buffer[0], buffer[6 : 6 + length]), buffer[6 + length :]
        seen.append(bytes([out[0]]))
        return out

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    try:
        kind, rq = pdu()
        assert kind == 0x01
        body = (
            struct.pack(">HH", 1, 0) + rq[4:36] + b"\0" * 32
            + item(0x10, b"1.2.840.10008.3.1.1.1")
            + item(0x21, bytes([1, 0, 0, 0]) + item(0x40, EXPLICIT_LE.encode()))
            + item(0x50, item(0x51, struct.pack(">I", 16384)))
        )  # fmt: skip
        conn.sendall(struct.pack(">BBI", 0x02, 0, len(body)) + body)
        dataset_done = False
        while not dataset_done:  # the command, then the dataset's last fragment
            kind, data = pdu()
            assert kind == 0x04
            dataset_done = not data[5] & COMMAND and bool(data[5] & LAST)
        rsp = command_set([
            (0x0002, b"1.2.840.10008.1.20.1\0"),
            (0x0100, struct.pack("<H", 0x8100)),
            (0x0120, struct.pack("<H", 1)),
            (0x0800, struct.pack("<H", 0x0101)),
            (0x0900, struct.pack("<H", 0x0000)),
        ])  # fmt: skip
        conn.sendall(p_data(1, COMMAND | LAST, rsp))
        assert pdu()[0] == 0x05  # Courier's A-RELEASE-RQ ...
        conn.sendall(RELEASE_RQ)  # ... crossed by ours
        assert pdu()[0] == 0x06  # Courier, the requestor, answers first
        conn.sendall(RELEASE_RP)
        conn.settimeout(5)
        seen.append(conn.recv(10) or b"closed")
    finally:
        conn.close()


def test_courier_delivering_a_report_answers_a_release_collision_as_the_requestor():
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    peer = threading.Thread(target=_raw_requester_peer, args=(server, seen))
    peer.start()
    report = Report(generate_uid(), [Reference(CT_IMAGE, generate_uid())])
    try:
        send_report(
            "127.0.0.1", server.getsockname()[1], calling_aet="COURIER",
            called_aet="MODALITY", report=report, timeout=10,
        )  # fmt: skip
    finally:
        peer.join(30)
        server.close()
    # associate, the report (command + dataset), release, collision, end: no abort.
    assert b"\x07" not in seen
    assert seen[-3:] == [b"\x05", b"\x06", b"closed"]


@pytest.mark.parametrize("lacking", ["references", "transaction"])
def test_a_request_without_references_or_transaction_uid_is_invalid(receiver, lacking):
    """An empty Referenced SOP Sequence was answered success and "all committed"
    (event type 1) for nothing; a missing Transaction UID 0x0110. Both are an
    invalid argument value (0x0115, PS3.7 10.1.4.1.10), and no report follows."""
    rx = receiver()
    _, request = commit_request(
        [] if lacking == "references" else [(CT_IMAGE, "1.2.3")]
    )
    if lacking == "transaction":
        del request.TransactionUID
    reports = Reports()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="COURIER",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handle)])  # fmt: skip
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(
            request, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        assert status.Status == 0x0115
        assert not reports.arrived.wait(1)
    finally:
        assoc.release()
