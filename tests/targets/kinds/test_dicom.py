"""DicomHandler against real peers: Orthanc, dcmtk storescp and in-process pynetdicom
SCPs that answer with chosen statuses or never answer."""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from targets.dicomnet.scu import dataset_offset
from targets.dicomnet.sockets import enable_tcp_nodelay
from targets.dicomnet.transcode import MAX_CONTEXTS, plan_contexts
from targets.kinds.base import FAILED, SENT, WARNING, SendContext, TargetError
from targets.kinds.dicom.handler import DicomHandler
from targets.models import DicomTarget
from targets.series import Instance, scan_folder
from tests.dicomgen import make_mixed_study, make_series
from tests.peers import free_port

# A SOP class Orthanc does not know: with UnknownSopClassAccepted false it refuses it.
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.8.498.77.1"
DEFAULT_SYNTAXES = list(DEFAULT_TRANSFER_SYNTAXES)


def target(port: int, called_aet: str, **kwargs) -> DicomTarget:
    values = {
        "name": "t",
        "host": "127.0.0.1",
        "port": port,
        "called_aet": called_aet,
        "calling_aet": "COURIER",
        "connect_timeout": 5.0,
        "acse_timeout": 5.0,
        # Short: PEERS.md reports Orthanc 1.10 sometimes never answering a
        # C-STORE; the handler then resumes on a new association.
        "dimse_timeout": 3.0,
    }
    values.update(kwargs)
    return DicomTarget(**values)


def dataset_bytes(data: bytes) -> bytes:
    """The dataset part of a DICOM file (without preamble and file meta)."""
    return data[dataset_offset(Path("-"), data) :]


def orthanc_uids(orthanc, study_uid: str) -> Counter:
    found = orthanc.rest("/tools/lookup", "POST", study_uid.encode())
    study = next(item["ID"] for item in found if item["Type"] == "Study")
    instances = orthanc.rest(f"/studies/{study}/instances")
    return Counter(i["MainDicomTags"]["SOPInstanceUID"] for i in instances)


# -- in-process pynetdicom SCPs ----------------------------------------------------------


class RecordingSCP:
    """A pynetdicom storage SCP that records every C-STORE and answers as told."""

    def __init__(self, syntaxes: list[str] | None = None, max_associations: int = 10):
        enable_tcp_nodelay()
        self.received: list[str] = []
        self.datasets: dict[str, object] = {}
        self.statuses: dict[str, int] = {}  # SOP Instance UID -> status to answer
        self.stall_once: set[str] = set()  # UIDs whose first C-STORE gets no answer
        self.stall_always = False
        self.stalled: list[str] = []  # UIDs of the C-STOREs left unanswered
        self.abort_on: set[str] = set()  # UIDs whose every C-STORE is aborted
        self.aborted: list[str] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.associations = 0  # accepted since the last reset
        # C-STOREs wait for this many associations (up to 30 s) before they are
        # taken: a test of how many a send opens does not race the send's end.
        self.hold_until_associations = 0
        self.accepted = threading.Condition(self.lock)
        ae = AE(ae_title="RECORDER")
        ae.maximum_pdu_size = 131072
        ae.maximum_associations = max_associations
        for sop_class in (CTImageStorage, MRImageStorage, Verification):
            ae.add_supported_context(sop_class, syntaxes or DEFAULT_SYNTAXES)
        ae.add_supported_context(PRIVATE_SOP_CLASS)
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self.on_store),
                (evt.EVT_ACCEPTED, self.on_accepted),
            ],
        )

    def on_accepted(self, event) -> None:
        with self.lock:
            self.associations += 1
            self.accepted.notify_all()

    def on_store(self, event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        with self.lock:
            self.accepted.wait_for(
                lambda: self.associations >= self.hold_until_associations, 30
            )
        if uid in self.abort_on:
            with self.lock:
                self.aborted.append(uid)
            event.assoc.abort()
            return 0xA700
        with self.lock:
            stall = self.stall_always or uid in self.stall_once
            self.stall_once.discard(uid)
            if stall:
                self.stalled.append(uid)
        if stall:
            self.release.wait(30)
            return 0xA700
        with self.lock:
            self.received.append(uid)
            self.datasets[uid] = event.dataset
        return self.statuses.get(uid, 0x0000)

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.datasets.clear()
            self.statuses.clear()
            self.stall_once.clear()
            self.stall_always = False
            self.stalled.clear()
            self.abort_on = set()
            self.aborted.clear()
            self.associations = 0
            self.hold_until_associations = 0

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def recorder():
    scp = RecordingSCP()
    yield scp
    scp.stop()


@pytest.fixture
def fresh_recorder(recorder):
    recorder.reset()
    yield recorder
    # Let go of C-STOREs a test left hanging (their associations are aborted).
    recorder.release.set()
    recorder.release = threading.Event()


@pytest.fixture(scope="module")
def mixed_study(tmp_path_factory):
    """A CT and an MR series in one study: two SOP classes, 250 instances."""
    folder = tmp_path_factory.mktemp("mixed")
    generated = make_mixed_study(folder, ct=150, mr=100)
    return folder, generated


# -- sending to Orthanc ------------------------------------------------------------------


def test_it_sends_a_mixed_study_to_orthanc_and_every_instance_arrives_intact(
    orthanc, mixed_study
):
    folder, generated = mixed_study
    series = scan_folder(folder)
    assert {i.sop_class_uid for i in series.instances} == {
        CTImageStorage,
        MRImageStorage,
    }
    seen = []
    result = target(orthanc.dicom_port, orthanc.aet).handler.send(
        series, progress=seen.append
    )

    assert result.sent == 250 and result.failed == 0
    assert len(seen) == 250
    assert result.bytes == series.total_bytes
    expected = {uid for g in generated for uid in g.sop_uids}
    assert set(orthanc_uids(orthanc, generated[0].study_uid)) == expected
    # Orthanc stores what it received: its file meta is its own, the dataset ours.
    for g in generated:
        for path, uid in list(zip(g.files, g.sop_uids, strict=True))[::40]:
            stored = orthanc.instance_file(orthanc.find_instance(uid))
            assert dataset_bytes(stored) == dataset_bytes(path.read_bytes())


def test_it_fails_only_the_instances_whose_sop_class_orthanc_refuses(orthanc, tmp_path):
    good = make_series(tmp_path / "ct", 5)
    odd = make_series(tmp_path / "odd", 3, tags={"SOPClassUID": PRIVATE_SOP_CLASS})
    for path in odd.files:  # keep the file meta consistent with the dataset
        ds = dcmread(path)
        ds.file_meta.MediaStorageSOPClassUID = PRIVATE_SOP_CLASS
        ds.save_as(path, enforce_file_format=True)
    series = scan_folder(tmp_path)

    result = target(orthanc.dicom_port, orthanc.aet).handler.send(series)

    by_uid = {o.sop_instance_uid: o for o in result.outcomes}
    assert [by_uid[u].status for u in good.sop_uids] == [SENT] * 5
    for uid in odd.sop_uids:
        assert by_uid[uid].status == FAILED
        assert "refused SOP class" in by_uid[uid].message
        assert PRIVATE_SOP_CLASS in by_uid[uid].message
    assert set(orthanc_uids(orthanc, good.study_uid)) == set(good.sop_uids)


def test_it_passes_the_incoming_aets_when_the_switches_are_on(orthanc, tmp_path):
    incoming = SendContext(calling_aet="MODALITY7", called_aet="INCOMING")
    passed = make_series(tmp_path / "a", 1)
    kept = make_series(tmp_path / "b", 1)

    on = target(
        orthanc.dicom_port, orthanc.aet, pass_calling_aet=True, pass_called_aet=True
    )
    off = target(orthanc.dicom_port, orthanc.aet)
    assert on.handler.send(scan_folder(passed.folder), context=incoming).sent == 1
    assert off.handler.send(scan_folder(kept.folder), context=incoming).sent == 1

    def aets(uid):
        meta = orthanc.rest(f"/instances/{orthanc.find_instance(uid)}/metadata?expand")
        return meta["RemoteAET"], meta["CalledAET"]

    assert aets(passed.sop_uids[0]) == ("MODALITY7", "INCOMING")
    assert aets(kept.sop_uids[0]) == ("COURIER", orthanc.aet)


# -- sending to storescp -------------------------------------------------------------------


def test_it_sends_to_storescp_and_the_files_match(storescp, mixed_study):
    folder, generated = mixed_study
    series = scan_folder(folder)

    result = target(storescp.port, storescp.aet).handler.send(series)

    assert result.sent == 250 and not result.notes
    received = {f.name: f for f in storescp.files()}
    for g in generated:
        for path, uid in zip(g.files, g.sop_uids, strict=True):
            name = next(n for n in received if n.endswith(f".{uid}.dcm"))
            if uid in g.sop_uids[::50]:
                # storescp drops the Data Set Trailing Padding (FFFC,FFFC) that
                # pydicom's CT example carries; everything before it is identical.
                stored = dataset_bytes(received[name].read_bytes())
                source = dataset_bytes(path.read_bytes())
                assert source.startswith(stored)
                assert source[len(stored) :][:4] in (b"", b"\xfc\xff\xfc\xff")


def test_parallel_associations_deliver_every_instance_exactly_once(
    fresh_recorder, storescp, tmp_path
):
    generated = make_series(tmp_path, 60)
    series = scan_folder(tmp_path)
    seen = []

    result = target(fresh_recorder.port, "RECORDER", max_connections=4).handler.send(
        series, progress=seen.append
    )
    assert result.sent == 60 and len(seen) == 60
    assert Counter(fresh_recorder.received) == Counter(generated.sop_uids)
    assert [o.path for o in result.outcomes] == [str(i.path) for i in series.instances]

    result = target(storescp.port, storescp.aet, max_connections=4).handler.send(series)
    assert result.sent == 60
    names = {f.name for f in storescp.files()}
    assert all(
        any(n.endswith(f".{uid}.dcm") for n in names) for uid in generated.sop_uids
    )


@pytest.mark.parametrize(("connections", "opened"), [(2, 2), (None, 4), (9, 9)])
def test_a_send_opens_as_many_associations_as_its_connections(
    fresh_recorder, tmp_path, connections, opened
):
    # The dispatcher passes a job's share of the target's limit as `connections`;
    # without it (a script, a Test) the target's own limit holds. The recorder answers
    # no C-STORE before `opened` associations are up: the extra ones open while the
    # first is still sending, and a quick send cannot end before they do (under load
    # 12 instances once went over 8 associations before the ninth opened).
    generated = make_series(tmp_path, 12)
    fresh_recorder.hold_until_associations = opened
    handler = target(fresh_recorder.port, "RECORDER", max_connections=4).handler

    result = handler.send(scan_folder(tmp_path), connections=connections)

    assert result.sent == 12
    assert Counter(fresh_recorder.received) == Counter(generated.sop_uids)
    assert fresh_recorder.associations == opened


def test_it_converts_to_implicit_vr_for_a_peer_that_accepts_only_that(tmp_path):
    scp = RecordingSCP(syntaxes=[ImplicitVRLittleEndian])
    try:
        generated = make_series(tmp_path, 3)
        series = scan_folder(tmp_path)
        assert {i.transfer_syntax for i in series.instances} == {ExplicitVRLittleEndian}

        result = target(scp.port, "RECORDER").handler.send(series)

        assert result.sent == 3
        for path, uid in zip(generated.files, generated.sop_uids, strict=True):
            source = dcmread(path)
            received = scp.datasets[uid]
            assert received.PixelData == source.PixelData
            assert received.PatientID == source.PatientID
    finally:
        scp.stop()


def test_an_unreadable_file_fails_alone_and_the_rest_is_sent(fresh_recorder, tmp_path):
    generated = make_series(tmp_path, 5)
    series = scan_folder(tmp_path)
    generated.files[2].unlink()  # gone between the scan and the send

    result = target(fresh_recorder.port, "RECORDER").handler.send(series)

    assert [o.status for o in result.outcomes] == [SENT, SENT, FAILED, SENT, SENT]
    assert result.outcomes[2].message.startswith("cannot read CT00003.dcm")
    assert len(fresh_recorder.received) == 4 and not result.notes


def test_when_the_peer_allows_fewer_associations_the_others_send_their_share(
    ct_series,
):
    scp = RecordingSCP(max_associations=1)
    try:
        handler = target(scp.port, "RECORDER", max_connections=4).handler
        result = handler.send(scan_folder(ct_series.folder))
    finally:
        scp.stop()

    assert result.sent == 20
    assert Counter(scp.received) == Counter(ct_series.sop_uids)
    assert result.notes
    assert all("limit of simultaneous associations" in n for n in result.notes)


# -- statuses, stalls --------------------------------------------------------------------


def test_it_records_warning_and_failure_statuses_per_instance_in_words(
    fresh_recorder, ct_series
):
    warned, failed = ct_series.sop_uids[3], ct_series.sop_uids[7]
    fresh_recorder.statuses = {warned: 0xB000, failed: 0xA701}

    result = target(fresh_recorder.port, "RECORDER").handler.send(
        scan_folder(ct_series.folder)
    )

    by_uid = {o.sop_instance_uid: o for o in result.outcomes}
    assert by_uid[warned].status == WARNING
    assert by_uid[warned].message == "warning: coercion of data elements (0xB000)"
    assert by_uid[failed].status == FAILED
    assert by_uid[failed].message == "failed: refused: out of resources (0xA701)"
    assert result.count(SENT) == 18 and result.sent == 19 and result.failed == 1


def test_it_resumes_on_a_new_association_after_a_peer_stops_answering(
    fresh_recorder, ct_series
):
    stalled = ct_series.sop_uids[5]
    fresh_recorder.stall_once = {stalled}

    # The peer leaves exactly this C-STORE unanswered and answers the rest at once;
    # the timeout is long enough that a slow but healthy reply on a loaded machine
    # does not trip it.
    result = target(fresh_recorder.port, "RECORDER", dimse_timeout=2.0).handler.send(
        scan_folder(ct_series.folder)
    )

    assert fresh_recorder.stalled == [stalled]
    assert result.sent == 20 and result.failed == 0
    assert set(fresh_recorder.received) == set(ct_series.sop_uids)
    assert Counter(fresh_recorder.received)[stalled] == 1
    resumed = [n for n in result.notes if stalled in n]
    assert len(resumed) == 1
    assert re.fullmatch(
        r"no response from the target within 2 s \(DIMSE timeout\) at instance "
        rf"{re.escape(stalled)} \(\d+ of 20 done\): aborted, resumed on a new "
        "association",
        resumed[0],
    )


def test_a_peer_that_never_answers_ends_in_a_timeout_error_and_frees_the_thread(
    fresh_recorder, ct_series
):
    fresh_recorder.stall_always = True
    # Short is safe here: no C-STORE is ever answered, so no healthy reply can race
    # the timeout.
    handler = target(fresh_recorder.port, "RECORDER", dimse_timeout=1.0).handler
    outcome = {}

    def run():
        try:
            handler.send(scan_folder(ct_series.folder))
        except TargetError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    error = outcome["error"]
    # Each of the first three instances is tried twice and failed by name; three
    # in a row, with nothing stored before to try again, mean the target is broken:
    # the rest is not sent (the job's next attempt sends it, or its last fails each
    # by name with this error).
    assert re.fullmatch(
        r"no response from the target within 1 s \(DIMSE timeout\) at instance "
        r"[\d.]+; 3 instances in a row failed this way \(3 of 20 done\): the "
        r"target, not the instances, seems broken; the rest was not sent",
        error.message,
    )
    assert not error.permanent
    assert not fresh_recorder.received
    assert len(fresh_recorder.stalled) == 6


def test_instances_a_peer_aborts_on_in_a_row_are_failed_by_name_and_the_rest_is_sent(
    fresh_recorder, ct_series
):
    # Four instances in a row on which the peer aborts every time (an archive that
    # aborts on what it cannot take): each is tried twice and failed by name; after
    # three in a row an instance the peer stored before is stored again, so the
    # peer, not the instances, is found sound and the rest of the series is sent.
    bad = ct_series.sop_uids[5:9]
    fresh_recorder.abort_on = set(bad)

    result = target(fresh_recorder.port, "RECORDER").handler.send(
        scan_folder(ct_series.folder), connections=1
    )

    by_uid = {o.sop_instance_uid: o for o in result.outcomes}
    assert len(by_uid) == 20
    for uid in bad:
        assert by_uid[uid].status == FAILED
        assert "2 times while this instance was being sent: failed" in (
            by_uid[uid].message
        )
    good = set(ct_series.sop_uids) - set(bad)
    assert {u for u, o in by_uid.items() if o.status == SENT} == good
    assert good == set(fresh_recorder.received)
    assert Counter(fresh_recorder.aborted) == dict.fromkeys(bad, 2)
    [probe] = [n for n in result.notes if "stored " in n and "again" in n]
    assert probe.startswith("3 instances in a row failed with a hang or an abort")


# -- rejections and unreachable targets ------------------------------------------------


def test_a_wrong_called_aet_is_rejected_in_words_by_test_and_send(
    orthanc_checking_aet, ct_series
):
    wrong = target(orthanc_checking_aet.dicom_port, "NOTTHIS")

    result = wrong.handler.test()
    assert not result.ok
    check = next(c for c in result.checks if c.name == "Association")
    assert check.message == (
        "association rejected: called AE title not recognised — check the Target AET"
    )
    assert "C-ECHO" not in [c.name for c in result.checks]

    with pytest.raises(TargetError) as caught:
        wrong.handler.send(scan_folder(ct_series.folder))
    assert "called AE title not recognised" in caught.value.message
    assert caught.value.permanent


def test_test_passes_every_check_against_orthanc(orthanc_checking_aet):
    result = target(orthanc_checking_aet.dicom_port, "CHECKED").handler.test()

    assert result.ok, result.summary
    names = [c.name for c in result.checks]
    assert names == [
        "Name resolution",
        "Ping",
        "TCP connect",
        "Association",
        "C-ECHO",
        "Storage Commitment",  # informational: the option is off
    ]
    echo = result.checks[-2]
    assert echo.message.startswith("success, round trip ")
    assert echo.message.endswith(" ms")


def test_a_closed_port_gives_a_failed_check_and_a_transient_error(ct_series):
    port = free_port()
    handler = target(port, "ANY").handler

    result = handler.test()
    assert not result.ok
    tcp = next(c for c in result.checks if c.name == "TCP connect")
    assert not tcp.ok and f"connection refused by 127.0.0.1:{port}" in tcp.message
    assert [c.name for c in result.checks][-1] == "TCP connect"

    with pytest.raises(TargetError) as caught:
        handler.send(scan_folder(ct_series.folder))
    assert f"127.0.0.1:{port}" in caught.value.message
    assert not caught.value.permanent


def test_a_port_that_never_answers_the_association_request_times_out_in_words(
    ct_series,
):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks
    try:
        port = silent.getsockname()[1]
        handler = target(port, "ANY", acse_timeout=0.5).handler
        result = handler.test()
        with pytest.raises(TargetError) as caught:
            handler.send(scan_folder(ct_series.folder))
    finally:
        silent.close()

    association = result.checks[-1]
    assert association.name == "Association" and not association.ok
    assert association.message == (
        f"no answer to the association request from 127.0.0.1:{port} within 0.5 s "
        "(association timeout)"
    )
    assert "association timeout" in caught.value.message
    assert not caught.value.permanent


def test_a_port_that_speaks_http_is_named_as_not_dicom():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)  # so the helper thread ends on its own

    def answer():
        while True:  # the TCP check connects first, then the association
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                if conn.recv(65536):
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        result = target(port, "ANY").handler.test()
    finally:
        server.close()

    association = result.checks[-1]
    assert association.name == "Association" and not association.ok
    assert association.message == (
        "the target sent something that is not DICOM (starting b'HTTP'): "
        "is this a DICOM port?"
    )


def test_an_unresolvable_host_gives_a_failed_name_resolution(ct_series):
    handler = target(104, "ANY", host="no-such-pacs.invalid").handler

    result = handler.test()
    assert [(c.name, c.ok) for c in result.checks] == [("Name resolution", False)]
    assert "cannot resolve host 'no-such-pacs.invalid'" in result.checks[0].message

    with pytest.raises(TargetError) as caught:
        handler.send(scan_folder(ct_series.folder))
    assert "cannot resolve host 'no-such-pacs.invalid'" in caught.value.message


# -- planning ------------------------------------------------------------------------------


def test_contexts_are_grouped_into_associations_of_at_most_128():
    instances = [
        Instance(
            Path(f"/x/{i}"), 1, f"1.2.3.{i}", generate_uid(), "1.2.840.10008.1.2.1"
        )
        for i in range(100)
    ]
    groups = plan_contexts(instances)
    assert [len(g) for g in groups] == [128, 72]
    # Each SOP class: its own syntax alone, then the uncompressed fallback.
    assert groups[0][:2] == [
        ("1.2.3.0", ["1.2.840.10008.1.2.1"]),
        ("1.2.3.0", ["1.2.840.10008.1.2"]),
    ]
    assert all(len(g) <= MAX_CONTEXTS for g in groups)


def test_the_aets_follow_the_pass_incoming_switches():
    incoming = SendContext(calling_aet="IN_CALLING", called_aet="IN_CALLED")
    plain = DicomHandler(target(104, "PACS"))
    both = DicomHandler(
        target(104, "PACS", pass_calling_aet=True, pass_called_aet=True)
    )
    assert plain.aets(incoming) == ("COURIER", "PACS")
    assert both.aets(incoming) == ("IN_CALLING", "IN_CALLED")
    assert both.aets(SendContext()) == ("COURIER", "PACS")
