"""The DICOM send path on the wire, seen from the peer's side.

In the style of pynetdicom's own application tests: a real pynetdicom SCP (or a peer
on a raw socket, for what no library does on purpose) records what Courier's
association carried: the A-ASSOCIATE-RQ (Courier's Implementation Class UID and
Version Name, its maximum PDU length, the contexts), every P-DATA PDU (even
fragments, none longer than the peer's maximum), how it ended (A-RELEASE, not
A-ABORT), a release collision, User Identity. Then what a misbehaving peer or a
malformed file does to a send: that instance fails by name, the rest is sent.
"""

from __future__ import annotations

import io
import shutil
import socket
import struct
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    CTImageStorage,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from targets.dicomnet import status
from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.dicomnet.outgoing import RefusedFile
from targets.dicomnet.scu import Association, dataset_offset, propose
from targets.dicomnet.sockets import enable_tcp_nodelay
from targets.dicomnet.vr import ALL_VRS, LONG_VRS
from targets.kinds.base import FAILED, SENT, TargetError
from targets.models import DicomTarget
from targets.query import Criteria, SourceError
from targets.series import Series, read_instance, scan_folder
from tests.dicomgen import make_series
from tests.peers import free_port

CT_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def target(port: int, called_aet: str = "WIRE", **kwargs) -> DicomTarget:
    values = {
        "name": "wire",
        "host": "127.0.0.1",
        "port": port,
        "called_aet": called_aet,
        "calling_aet": "COURIER",
        "connect_timeout": 5.0,
        "acse_timeout": 5.0,
        "dimse_timeout": 10.0,
        "max_pdu": 65536,
    }
    values.update(kwargs)
    return DicomTarget(**values)


class WireSCP:
    """A pynetdicom storage SCP recording the association as its events see it."""

    def __init__(self, *, max_pdu: int = 16384, login: tuple[str, str] | None = None):
        enable_tcp_nodelay()
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # one per A-ASSOCIATE-RQ
        self.pdata: list[P_DATA_TF] = []
        self.ends: list[str] = []  # "released" or "aborted", per association
        self.stored: list[str] = []
        self.datasets: dict[str, pydicom.Dataset] = {}
        self.abort_on: dict[str, int] = {}  # SOP Instance UID -> aborts left
        self.logins: list[tuple[str, str]] = []
        self.login = login
        ae = AE(ae_title="WIRE")
        ae.maximum_pdu_size = max_pdu
        for sop_class in (CTImageStorage, Verification):
            ae.add_supported_context(sop_class, DEFAULT_TRANSFER_SYNTAXES)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 30
        self.port = free_port()
        handlers = [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_PDU_RECV, self.on_pdu),
            (evt.EVT_RELEASED, lambda e: self.ended("released")),
            (evt.EVT_ABORTED, lambda e: self.ended("aborted")),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
        ]
        if login is not None:
            handlers.append((evt.EVT_USER_ID, self.on_user_id))
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )

    def on_requested(self, event) -> None:
        rq = event.assoc.requestor
        with self.lock:
            self.requests.append(
                {
                    "uid": str(rq.implementation_class_uid),
                    "version": rq.implementation_version_name,
                    "max_pdu": rq.maximum_length,
                    "contexts": [
                        (str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
                        for cx in rq.requested_contexts
                    ],
                }
            )

    def on_pdu(self, event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            with self.lock:
                self.pdata.append(event.pdu)

    def ended(self, how: str) -> None:
        with self.lock:
            self.ends.append(how)

    def on_user_id(self, event) -> tuple[bool, bytes | None]:
        given = (event.primary_field.decode(), (event.secondary_field or b"").decode())
        with self.lock:
            self.logins.append(given)
        return given == self.login, None

    def on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            left = self.abort_on.get(uid, 0)
            if left:
                self.abort_on[uid] = left - 1
        if left:
            event.assoc.abort()
            return 0xA700
        with self.lock:
            self.stored.append(uid)
            self.datasets[uid] = event.dataset
        return 0x0000

    def on_find(self, event):
        yield 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp():
    peer = WireSCP()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    return make_series(tmp_path_factory.mktemp("ct"), 6)


# -- what the association carried --------------------------------------------------------


def test_the_request_carries_courier_s_identity_max_pdu_and_only_needed_contexts(
    scp, ct_series
):
    result = target(scp.port, max_pdu=32768).handler.send(scan_folder(ct_series.folder))

    assert result.sent == 6
    (request,) = scp.requests
    assert request["uid"] == IMPLEMENTATION_CLASS_UID
    assert request["uid"].startswith("2.25.")
    assert request["version"] == IMPLEMENTATION_VERSION_NAME
    assert request["version"].startswith("COURIER_")
    assert request["max_pdu"] == 32768
    # The files' own syntax, then the uncompressed ones they lack (for a peer
    # that refuses theirs), for their one SOP class: nothing else.
    assert request["contexts"] == [
        (CTImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ImplicitVRLittleEndian]),
    ]


def test_a_send_and_a_test_end_in_a_release_not_an_abort(scp, ct_series):
    handler = target(scp.port).handler

    handler.send(scan_folder(ct_series.folder))
    report = handler.test()

    assert report.ok, [(c.name, c.message) for c in report.checks]
    assert len(scp.requests) == 2
    # Test asks for Verification and whether Storage Commitment is accepted.
    assert scp.requests[1]["contexts"] == [
        (Verification, CT_SYNTAXES[::-1]),
        (StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]
    assert scp.ends == ["released", "released"]


def test_fragments_are_even_and_fit_an_odd_maximum_pdu_length(tmp_path):
    # An odd maximum (legal: PS3.8 D.1 only bounds it) must not make odd fragments.
    peer = WireSCP(max_pdu=16385)
    try:
        big = make_series(tmp_path / "big", 2, size=512)  # ~530 KB each
        result = target(peer.port).handler.send(scan_folder(big.folder))
    finally:
        peer.stop()

    assert result.sent == 2
    sizes = [len(pdu.encode()) - 6 for pdu in peer.pdata]
    fragments = [
        len(item.presentation_data_value) - 1  # minus the message control header
        for pdu in peer.pdata
        for item in pdu.presentation_data_value_items
    ]
    assert len(fragments) > 60  # two datasets of ~530 KB in ~16 KB fragments
    assert max(sizes) <= 16385
    assert [f for f in fragments if f % 2] == []
    assert {uid: ds.SOPInstanceUID for uid, ds in peer.datasets.items()} == {
        uid: uid for uid in big.sop_uids
    }


class CollidingPeer:
    """A raw-socket SCP that answers Courier's A-RELEASE-RQ with its own (a release
    collision, PS3.8 9.2.6) and records what Courier then sends."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.after_collision: list[int] = []  # PDU types Courier sent after it
        self.done = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def read_pdu(self, conn: socket.socket) -> tuple[int, bytes]:
        head = self.exactly(conn, 6)
        kind, _, length = struct.unpack(">BBI", head)
        return kind, self.exactly(conn, length)

    @staticmethod
    def exactly(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    @staticmethod
    def accept_pdu(rq: bytes) -> bytes:
        """An A-ASSOCIATE-AC accepting every proposed context's first syntax."""

        def item(kind: int, body: bytes) -> bytes:
            return struct.pack(">BBH", kind, 0, len(body)) + body

        items, pos = [item(0x10, b"1.2.840.10008.3.1.1.1")], 68
        while pos < len(rq):
            kind, _, length = struct.unpack_from(">BBH", rq, pos)
            body = rq[pos + 4 : pos + 4 + length]
            if kind == 0x20:
                sub, first = 4, None
                while sub < len(body):
                    skind, _, slen = struct.unpack_from(">BBH", body, sub)
                    if skind == 0x40 and first is None:
                        first = body[sub + 4 : sub + 4 + slen]
                    sub += 4 + slen
                items.append(item(0x21, bytes([body[0], 0, 0, 0]) + item(0x40, first)))
            pos += 4 + length
        items.append(item(0x50, item(0x51, struct.pack(">I", 16384))))
        body = rq[:68] + b"".join(items)
        return struct.pack(">BBI", 0x02, 0, len(body)) + body

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(20)
        try:
            _, rq = self.read_pdu(conn)
            conn.sendall(self.accept_pdu(rq))
            kind, _ = self.read_pdu(conn)
            assert kind == 0x05  # Courier's A-RELEASE-RQ
            conn.sendall(struct.pack(">BBIxxxx", 0x05, 0, 4))  # ours crosses it
            kind, _ = self.read_pdu(conn)
            self.after_collision.append(kind)
            # PS3.8 table 9-10: the acceptor answers only after the requestor's RP.
            conn.sendall(struct.pack(">BBIxxxx", 0x06, 0, 4))
            try:
                kind, _ = self.read_pdu(conn)
                self.after_collision.append(kind)
            except (ConnectionError, OSError):
                pass  # closed: what the requestor does after our RP
        finally:
            conn.close()
            self.listener.close()
            self.done.set()


def test_a_release_collision_is_answered_as_the_requestor_does_per_ps3_8():
    peer = CollidingPeer()
    assoc = Association.open(
        "127.0.0.1",
        peer.port,
        calling_aet="COURIER",
        called_aet="RAW",
        contexts=propose([(Verification, [ImplicitVRLittleEndian])]),
        connect_timeout=5,
        acse_timeout=10,
        dimse_timeout=10,
        max_pdu=16384,
    )
    assoc.release()
    assert peer.done.wait(20)

    # A-RELEASE-RP (0x06) to the peer's request, then the connection closed after
    # the peer's A-RELEASE-RP: no A-ABORT (0x07), no wait for a timeout.
    assert peer.after_collision == [0x06]


# -- a peer that aborts, a file that is malformed ----------------------------------------


def test_an_instance_the_peer_aborts_on_twice_is_failed_by_name_and_the_rest_sent(
    scp, ct_series
):
    bad = ct_series.sop_uids[2]
    scp.abort_on = {bad: 99}

    result = target(scp.port).handler.send(scan_folder(ct_series.folder))

    by_uid = {o.sop_instance_uid: o for o in result.outcomes}
    assert by_uid[bad].status == FAILED
    assert by_uid[bad].message == (
        "the target aborted the association, 2 times while this instance was being "
        "sent: failed, the others were sent on new associations"
    )
    assert sorted(scp.stored) == sorted(u for u in ct_series.sop_uids if u != bad)
    assert result.sent == 5 and result.failed == 1
    # The first association, one after the first abort, one after the second.
    assert len(scp.requests) == 3
    assert scp.ends == ["aborted", "aborted", "released"]


def test_an_instance_the_peer_aborts_on_once_is_sent_again_and_stored(scp, ct_series):
    flaky = ct_series.sop_uids[4]
    scp.abort_on = {flaky: 1}

    result = target(scp.port).handler.send(scan_folder(ct_series.folder))

    assert result.sent == 6 and result.failed == 0
    assert Counter(scp.stored) == Counter(ct_series.sop_uids)
    assert [n for n in result.notes if flaky in n] == [
        f"the target aborted the association at instance {flaky} (4 of 6 done): "
        "aborted, resumed on a new association"
    ]


def _overrunning(source: Path, dest: Path) -> None:
    """A CT file whose Patient Comments claims more bytes than the file has left."""
    ds = pydicom.dcmread(source)
    ds.PatientComments = "x" * 10
    ds.save_as(dest)
    raw = bytearray(dest.read_bytes())
    at = raw.index(b"\x10\x00\x00\x40LT")
    raw[at + 6 : at + 8] = struct.pack("<H", 0xFFF0)
    dest.write_bytes(bytes(raw[: at + 8 + 10]))


def _odd_length_value(source: Path, dest: Path) -> bytes:
    """A CT file with a 3-byte Patient Comments (PS3.5 7.1.1 wants even lengths)."""
    raw = source.read_bytes()
    ds = pydicom.dcmread(source)
    ds.PatientComments = "oddx"  # placeholder of 4 bytes, made 3 below
    ds.save_as(dest)
    raw = bytearray(dest.read_bytes())
    at = raw.index(b"\x10\x00\x00\x40LT\x04\x00oddx")
    raw[at : at + 12] = b"\x10\x00\x00\x40LT\x03\x00odd"
    dest.write_bytes(bytes(raw))
    return bytes(raw)


def test_malformed_files_fail_by_name_and_the_rest_reaches_orthanc(orthanc, tmp_path):
    generated = make_series(tmp_path / "s", 4)
    files = sorted(generated.folder.glob("*.dcm"))
    series = scan_folder(generated.folder)
    # Files that went bad after the folder was read (or reached the send another
    # way): pydicom's truncated RT Plan, an overrunning value, an odd-length value.
    truncated = tmp_path / "s" / "rtplan_truncated.dcm"
    shutil.copy(get_testdata_file("rtplan_truncated.dcm"), truncated)
    overrun = files[1]
    _overrunning(files[1], overrun)
    odd = files[2]
    _odd_length_value(files[2], odd)
    series = Series(
        root=series.root,
        instances=[read_instance(truncated)]
        + [i for i in series.instances if i.path != overrun]
        + [read_instance(overrun)],
    )
    handler = target(orthanc.dicom_port, orthanc.aet).handler

    result = handler.send(series)

    by_path = {Path(o.path).name: o for o in result.outcomes}
    assert by_path["rtplan_truncated.dcm"].status == FAILED
    assert by_path["rtplan_truncated.dcm"].message == (
        "malformed DICOM, not sent: element (300A,00B0) runs past the end of the "
        "file (976 bytes at byte 1418 of 2129)"
    )
    assert by_path[overrun.name].status == FAILED
    assert by_path[overrun.name].message.startswith(
        "malformed DICOM, not sent: element (0010,4000) runs past the end of the file"
    )
    assert by_path[odd.name].status == SENT
    assert by_path[odd.name].message == (
        "re-encoded before sending (element (0010,4000) has an odd length), values "
        "unchanged"
    )
    assert result.sent == 3 and result.failed == 2
    stored = orthanc.rest("/tools/lookup", "POST", generated.study_uid.encode())
    study = next(item["ID"] for item in stored if item["Type"] == "Study")
    uids = {
        i["MainDicomTags"]["SOPInstanceUID"]: i["ID"]
        for i in orthanc.rest(f"/studies/{study}/instances")
    }
    wanted = {pydicom.dcmread(f).SOPInstanceUID for f in (files[0], files[2], files[3])}
    assert set(uids) == wanted
    odd_uid = pydicom.dcmread(odd).SOPInstanceUID
    tags = orthanc.rest(f"/instances/{uids[odd_uid]}/simplified-tags")
    assert tags["PatientComments"].rstrip() == "odd"


def test_encoded_data_that_does_not_walk_or_is_odd_is_refused_before_a_byte_is_sent(
    scp, ct_series
):
    data = Path(ct_series.files[0]).read_bytes()
    ds = pydicom.dcmread(ct_series.files[0])
    dataset = data[dataset_offset(Path("-"), data) :]
    assoc = Association.open(
        "127.0.0.1",
        scp.port,
        calling_aet="COURIER",
        called_aet="WIRE",
        contexts=propose([(CTImageStorage, [ExplicitVRLittleEndian]),
                          (Verification, [ImplicitVRLittleEndian])]),
        connect_timeout=5,
        acse_timeout=10,
        dimse_timeout=10,
        max_pdu=16384,
    )  # fmt: skip
    cx = assoc.context_for(CTImageStorage, ExplicitVRLittleEndian)
    uid = str(ds.SOPInstanceUID)
    with pytest.raises(RefusedFile, match="runs past the end of the data"):
        assoc.c_store_bytes(cx, CTImageStorage, uid, dataset[:-1001])
    with pytest.raises(RefusedFile, match="odd length"):
        assoc._c_store(
            cx, CTImageStorage, uid, io.BytesIO(dataset + b"x"), 1 + len(dataset)
        )
    # Nothing of either reached the peer; the association is as good as before.
    assert assoc.c_echo() == 0
    assoc.release()
    # The one P-DATA the peer got is the C-ECHO request.
    assert len(scp.pdata) == 1
    assert scp.stored == [] and scp.ends == ["released"]


# -- User Identity -------------------------------------------------------------------------


@pytest.fixture
def locked_scp():
    peer = WireSCP(login=("courier", "s3cret-Pw"))
    yield peer
    peer.stop()


def test_user_identity_lets_a_send_a_test_and_a_query_in_with_the_right_password(
    locked_scp, ct_series
):
    t = target(locked_scp.port, username="courier", password="s3cret-Pw")

    result = t.handler.send(scan_folder(ct_series.folder))
    report = t.handler.test()
    found = t.query_source().find_studies(Criteria(), limit=10)

    assert result.sent == 6
    assert report.ok, [(c.name, c.message) for c in report.checks]
    assert found.studies == []
    assert locked_scp.logins == [("courier", "s3cret-Pw")] * 3
    # The query source's pynetdicom association introduces Courier too.
    assert [(r["uid"], r["version"]) for r in locked_scp.requests] == [
        (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    ] * 3


def test_a_wrong_user_identity_password_is_rejected_in_words_that_hide_it(
    locked_scp, ct_series
):
    t = target(locked_scp.port, username="courier", password="wrong-Pw-123")

    with pytest.raises(TargetError) as raised:
        t.handler.send(scan_folder(ct_series.folder))
    report = t.handler.test()
    with pytest.raises(SourceError) as refused:
        t.query_source().find_studies(Criteria(), limit=10)

    expected = (
        "association rejected: no reason given; Courier sent a username and "
        "password (User Identity): check them in the target's settings"
    )
    assert raised.value.message == expected
    check = next(c for c in report.checks if c.name == "Association")
    assert not check.ok and check.message == expected
    assert "User Identity" in str(refused.value)
    for text in (raised.value.message, check.message, str(refused.value)):
        assert "wrong-Pw-123" not in text
    assert not locked_scp.stored


def test_without_a_username_no_user_identity_is_sent(scp, ct_series):
    target(scp.port).handler.send(scan_folder(ct_series.folder))
    assert scp.logins == [] and len(scp.requests) == 1


# -- tables ------------------------------------------------------------------------------


def test_status_words_follow_the_service_per_ps3_4():
    assert status.in_words(0xB000, "store") == "coercion of data elements (0xB000)"
    assert status.in_words(0xB000, "move") == (
        "sub-operations complete with one or more failures or warnings (0xB000)"
    )
    assert status.in_words(0xA7FF, "store") == "refused: out of resources (0xA7FF)"
    assert status.in_words(0xA801, "get").startswith("refused: move destination")
    assert status.in_words(0xC123, "find", "bad key") == (
        "unable to process (0xC123): bad key"
    )
    assert status.in_words(0x0122, "stow") == "SOP class not supported (0x0122)"
    assert status.in_words(0x0124, "echo") == "refused: not authorised (0x0124)"
    assert [status.category(c) for c in (0, 0xFF01, 0xFE00, 0xB007, 0xA900)] == [
        "success",
        "pending",
        "cancel",
        "warning",
        "failure",
    ]


def test_the_vr_table_matches_pydicom_s():
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

    assert {v.encode() for v in VR if v.value.isalpha() and len(v.value) == 2} == set(
        ALL_VRS
    )
    assert {v.encode() for v in EXPLICIT_VR_LENGTH_32} == set(LONG_VRS)
