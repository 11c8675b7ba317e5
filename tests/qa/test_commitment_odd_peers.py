"""Storage Commitment's own associations against the raw-socket peer of
`tests/qa/oddpeer.py`: the report Courier delivers (`commitment.send_report`) and
the request it makes (`commit_scu.request`), with a response trickled without end,
a response larger than any command set, a release answered with a stream of other
PDUs, a maximum PDU length no P-DATA fits. The same limits as the sender's
(`scu.read_command`, `scu.release`; tests in test_scu_odd_peers.py)."""

from __future__ import annotations

import time

import pytest
from pydicom.uid import generate_uid

from targets.dicomnet import commit_scu
from targets.dicomnet.commitment import (
    STORAGE_COMMITMENT,
    Reference,
    Report,
    send_report,
)
from targets.dicomnet.scu import Association, LinkError, LinkTimeout, propose
from tests.qa.oddpeer import OddPeer, command_fragment

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def trickle_fragments(conn, cid):
    for _ in range(30):
        conn.sendall(command_fragment(cid, b"\x00\x00"))
        time.sleep(0.1)


def flood_fragments(conn, cid):
    for _ in range(32):
        conn.sendall(command_fragment(cid, bytes(65536)))


def report_to(peer: OddPeer, timeout: float) -> None:
    report = Report(generate_uid(), [Reference(CT_IMAGE, generate_uid())])
    send_report(
        "127.0.0.1", peer.port, calling_aet="COURIER", called_aet="ODD",
        report=report, timeout=timeout,
    )  # fmt: skip


def test_a_report_response_trickled_without_end_times_out():
    # A command fragment every 0.1 s for 3 s: each read came within the timeout
    # (1 s), so delivering the report used to wait as long as the peer kept on.
    peer = OddPeer(before_response=trickle_fragments)
    with pytest.raises(
        LinkTimeout, match=r"no response from 127\.0\.0\.1:\d+ within 1 s"
    ):
        report_to(peer, timeout=1)


def test_a_report_response_larger_than_any_command_set_is_refused():
    # 2 MiB of command fragments without the end: used to be buffered whole.
    peer = OddPeer(before_response=flood_fragments)
    with pytest.raises(LinkError, match="response is over 65536 bytes"):
        report_to(peer, timeout=5)


def test_a_release_answered_with_a_trickle_is_aborted_and_the_report_delivered():
    # The peer answers the A-RELEASE-RQ with a P-DATA every 0.1 s for 3 s: the
    # timeout (1 s) bounds the whole wait; the report was answered success, so
    # send_report returns (the report is not sent again) after an A-ABORT.
    trickled = []

    def trickle(conn):
        for _ in range(30):
            try:
                conn.sendall(command_fragment(1, b"\x00\x00"))
            except OSError:
                return
            trickled.append(1)
            time.sleep(0.1)

    peer = OddPeer(on_release=trickle)
    report_to(peer, timeout=1)
    assert peer.done.wait(10)
    assert len(trickled) < 30


def test_a_requester_announcing_a_maximum_pdu_of_12_is_refused_and_aborted():
    # At 6 or less no PDV data fits (the report's framing made empty fragments
    # without end); 7-12 leaves a few bytes a PDU. Refused as dcmtk does, so the
    # report goes out in no P-DATA at all (it used to, in 6-byte fragments).
    peer = OddPeer(max_pdu=12)
    with pytest.raises(LinkError, match="maximum PDU length of 12 bytes: illegal"):
        report_to(peer, timeout=5)
    assert peer.done.wait(10)
    assert peer.received[:2] == [0x01, 0x07]  # associate, abort; no P-DATA
    assert 0x04 not in peer.received


@pytest.mark.parametrize(
    ("answer", "error", "words"),
    [
        (trickle_fragments, LinkTimeout, "did not complete a message within 1 s"),
        (flood_fragments, LinkError, "response is over 65536 bytes"),
    ],
)
def test_a_commitment_request_answered_without_end_ends_in_words(answer, error, words):
    # Courier's N-ACTION answered with a command trickled for 3 s (each read
    # within the DIMSE timeout: it waited as long as the peer kept on) or 2 MiB
    # of command without its end (buffered whole).
    peer = OddPeer(before_response=answer)
    assoc = Association.open(
        "127.0.0.1", peer.port, calling_aet="COURIER", called_aet="ODD",
        contexts=propose([(STORAGE_COMMITMENT, ["1.2.840.10008.1.2.1"])]),
        connect_timeout=5, acse_timeout=5, dimse_timeout=1, max_pdu=16384,
    )  # fmt: skip
    try:
        with pytest.raises(error, match=words):
            commit_scu.request(
                assoc, generate_uid(), [Reference(CT_IMAGE, generate_uid())],
                wait=10, poll=lambda: None, tick=0.2,
            )  # fmt: skip
    finally:
        assoc.abort()
