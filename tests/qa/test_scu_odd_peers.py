"""An outsider's peers for the sender's own association code (`targets/dicomnet/
scu.py`, issue 15): raw-socket SCPs answering with odd but valid A-ASSOCIATE-ACs,
PDUs split into one-byte TCP segments or several PDUs in one, an A-ABORT right
behind the acceptance. dcmtk's storescu against the same peers is the reference
(figures in the comments were measured with /usr/bin/storescu 3.6.7).
"""

from __future__ import annotations

import struct
import time

import pydicom
import pytest

from targets.dicomnet.scu import (
    UNLIMITED_PDU,
    Association,
    LinkError,
    LinkTimeout,
    dataset_offset,
    propose,
)
from tests.dicomgen import make_series
from tests.qa.oddpeer import (
    OddPeer,
    associate_ac,
    bytewise,
    command_fragment,
    item,
    pdu,
)


def open_to(peer: OddPeer, files, dimse_timeout: float = 10) -> Association:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    return Association.open(
        "127.0.0.1",
        peer.port,
        calling_aet="COURIER",
        called_aet="ODD",
        contexts=propose([(ds.SOPClassUID, [syntax])]),
        connect_timeout=5,
        acse_timeout=5,
        dimse_timeout=dimse_timeout,
        max_pdu=16384,
    )


def store_all(assoc: Association, files) -> list[int]:
    statuses = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rsp = assoc.c_store_file(assoc.contexts[0], ds.SOPClassUID,
                                 ds.SOPInstanceUID, f)  # fmt: skip
        statuses.append(struct.unpack("<H", rsp[0x0900])[0])
    return statuses


def datasets(files) -> list[bytes]:
    out = []
    for f in files:
        data = f.read_bytes()
        out.append(data[dataset_offset(f, data[:65536]) :])
    return out


def test_a_peer_announcing_a_huge_maximum_pdu_gets_fragments_of_at_most_4_mib(
    tmp_path,
):
    # storescu sends 128 KiB PDUs to this peer; Courier used to send the 4.7 MB
    # dataset in one PDU, read into memory whole (a 1 GB multi-frame likewise).
    big = make_series(tmp_path / "big", 1, size=1536)
    peer = OddPeer(max_pdu=0xFFFFFFFF)
    assoc = open_to(peer, big.files)
    assert store_all(assoc, big.files) == [0]
    assoc.release()
    assert peer.done.wait(10)
    assert max(peer.pdata_lengths) <= UNLIMITED_PDU
    assert peer.datasets == datasets(big.files)


def test_an_abort_right_behind_the_acceptance_is_read_not_waited_out(tmp_path):
    # The peer accepts and aborts in one TCP segment, then waits for the transport
    # to close (PS3.8 Sta13). storescu: "Peer aborted Association". Courier used to
    # drop the A-ABORT with the rest of the acceptance's read, send the C-STORE and
    # wait its whole DIMSE timeout for an answer.
    series = make_series(tmp_path / "ct", 1)
    peer = OddPeer(
        answer=lambda rq: associate_ac(rq, max_pdu=16384) + pdu(0x07, bytes(4)),
        silent=True,
    )
    assoc = open_to(peer, series.files, dimse_timeout=5)
    try:
        store_all(assoc, series.files)
    except LinkError as exc:
        message = exc.message
    else:
        message = "stored"
    assoc.abort()
    assert message == "the target aborted the association"


def test_odd_but_valid_acceptances_in_one_byte_segments_are_understood(tmp_path):
    # Every optional sub-item an acceptor may answer with (asynchronous operations
    # window, role selection, version name, user identity response, extended
    # negotiation, one of a future version), each byte in its own TCP segment.
    extra = (
        item(0x53, struct.pack(">HH", 0, 0))
        + item(0x54, struct.pack(">H", 25) + b"1.2.840.10008.5.1.4.1.1.2\x01\x00")
        + item(0x55, b"ODD_PEER_1")
        + item(0x59, struct.pack(">H", 4) + b"ok!!")
        + item(0x56, struct.pack(">H", 3) + b"1.2\x01")
        + item(0x5F, b"future")
    )
    series = make_series(tmp_path / "ct", 2)
    peer = OddPeer(extra=extra, write=bytewise)
    assoc = open_to(peer, series.files)
    assert store_all(assoc, series.files) == [0, 0]
    assoc.release()
    assert peer.done.wait(10)
    assert peer.datasets == datasets(series.files)
    assert peer.received[-1] == 0x05  # released, not aborted


def test_a_response_trickled_without_end_times_out_as_the_dimse_timeout_says(
    tmp_path,
):
    # The peer sends a command fragment every 0.1 s for 3 s before its response:
    # each read came within the DIMSE timeout (1 s), so Courier used to wait for
    # as long as the peer kept trickling (forever, the job held with its lease).
    def trickle(conn, cid):
        for _ in range(30):
            conn.sendall(command_fragment(cid, b"\x00\x00"))
            time.sleep(0.1)

    series = make_series(tmp_path / "ct", 1)
    peer = OddPeer(before_response=trickle)
    assoc = open_to(peer, series.files, dimse_timeout=1)
    with pytest.raises(LinkTimeout, match="no response from the target within 1 s"):
        store_all(assoc, series.files)
    assoc.abort()


def test_a_response_larger_than_any_command_set_is_refused_not_buffered(tmp_path):
    # 2 MiB of command fragments that never end the command: Courier used to keep
    # them all (a peer sending without end fills the sender's memory).
    def flood(conn, cid):
        for _ in range(32):
            conn.sendall(command_fragment(cid, bytes(65536)))

    series = make_series(tmp_path / "ct", 1)
    peer = OddPeer(before_response=flood)
    assoc = open_to(peer, series.files, dimse_timeout=5)
    with pytest.raises(LinkError, match="response is over 65536 bytes"):
        store_all(assoc, series.files)
    assoc.abort()


def test_a_release_answered_with_a_trickle_of_other_pdus_ends_in_an_abort(tmp_path):
    # The peer answers Courier's A-RELEASE-RQ with a P-DATA every 0.1 s for 3 s
    # before its A-RELEASE-RP: Courier used to wait as long as it kept on (each
    # read within the ACSE timeout); the ACSE timeout (1 s) now ends it, with an
    # A-ABORT and the connection closed while the peer still trickles.
    trickled = []

    def trickle(conn):
        for _ in range(30):
            try:
                conn.sendall(command_fragment(1, b"\x00\x00"))
            except OSError:
                return
            trickled.append(1)
            time.sleep(0.1)

    series = make_series(tmp_path / "ct", 1)
    peer = OddPeer(on_release=trickle)
    assoc = Association.open(
        "127.0.0.1", peer.port, calling_aet="COURIER", called_aet="ODD",
        contexts=propose([(series_sop_class(series), [EXPLICIT])]),
        connect_timeout=5, acse_timeout=1, dimse_timeout=5, max_pdu=16384,
    )  # fmt: skip
    assert store_all(assoc, series.files) == [0]
    assoc.release()
    assert peer.done.wait(10)
    assert len(trickled) < 30


EXPLICIT = "1.2.840.10008.1.2.1"


def series_sop_class(series) -> str:
    return pydicom.dcmread(series.files[0], stop_before_pixels=True).SOPClassUID
