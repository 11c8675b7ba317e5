"""What dcmtk's storescp and pydicom accept, the receiver accepts (issue 13): a UN
element of undefined length inside Explicit VR (its content Implicit VR Little
Endian, PS3.5 6.2.2), elements out of order, repeated elements, an instance without a
Series Instance UID; Explicit VR preferred when a sender offers both; Courier's own
identity in the association answer and in the file meta of every file written.

Each dataset is built byte by byte and sent from a raw socket (tests/rawdicom.py), so
the receiver gets exactly what a relaying gateway or an odd modality sends; pydicom
and storescp reading the same bytes are the reference."""

from __future__ import annotations

import logging
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.dicomnet.scp import Limits
from tests.fixtures.receive_peers import storescu
from tests.interop.corpus import UN_CREATOR, un_private_sequence
from tests.peers import DCMTK_ENV
from tests.rawdicom import (
    CT_IMAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    RawPeer,
    encode_dataset,
)

EXPLICIT_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SUCCESS, CANNOT_UNDERSTAND = 0x0000, 0xC210


def elements(ds: Dataset) -> list[bytes]:
    """Each top-level element of `ds`, encoded alone (Explicit VR LE)."""
    out = []
    for elem in ds:
        one = Dataset()
        one.add(elem)
        out.append(encode_dataset(one))
    return out


def ct(**changes) -> Dataset:
    ds = examples.ct.copy()
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def store(port: int, data: bytes, sop_instance: str, **assoc) -> int:
    with RawPeer(port) as peer:
        assert peer.associate(**assoc)[0] == 0x02
        status = peer.store(data, sop_instance=sop_instance)
        peer.release()
    return status


def stored_dataset(rx, sop_instance: str) -> tuple[Path, bytes]:
    (path,) = rx.incoming.glob(f"*/{sop_instance}.dcm")
    raw = path.read_bytes()
    meta_length = struct.unpack_from("<I", raw, 140)[0]
    return path, raw[144 + meta_length :]


@pytest.mark.parametrize("pixel_bytes", [0, 1024 * 1024])
def test_un_of_undefined_length_inside_explicit_vr_is_stored_as_sent(
    receiver, pixel_bytes
):
    """The private sequence a gateway relays as UN of undefined length; small (the
    dataset checked in memory) and with 1 MiB of pixels (checked in the file)."""
    ds = ct()
    if pixel_bytes:
        ds.Rows, ds.Columns = 512, 1024
        ds.PixelData = bytes(pixel_bytes)
    encoded = elements(ds)
    tags = [elem.tag for elem in ds]
    at = next(i for i, tag in enumerate(tags) if tag > 0x00091201)
    data = (
        b"".join(encoded[:at]) + UN_CREATOR + un_private_sequence()
        + b"".join(encoded[at:])
    )  # fmt: skip
    rx = receiver()

    assert store(rx.port, data, ds.SOPInstanceUID) == SUCCESS

    path, got = stored_dataset(rx, ds.SOPInstanceUID)
    assert got == data
    read = pydicom.dcmread(path)  # pydicom reads it (the reference)
    assert read.SOPInstanceUID == ds.SOPInstanceUID
    assert (0x0009, 0x1201) in read


def test_elements_out_of_order_are_stored_as_sent_as_storescp_does(receiver):
    ds = ct()
    encoded = elements(ds)
    i = next(i for i, elem in enumerate(ds) if elem.tag == 0x00080020)
    encoded[i], encoded[i + 1] = encoded[i + 1], encoded[i]
    data = b"".join(encoded)
    rx = receiver()

    assert store(rx.port, data, ds.SOPInstanceUID) == SUCCESS

    path, got = stored_dataset(rx, ds.SOPInstanceUID)
    assert got == data
    assert pydicom.dcmread(path).StudyDate == ds.StudyDate


def test_repeated_elements_are_taken_as_pydicom_takes_them(receiver):
    """A repeated element (pydicom keeps the last) and a repeated SOP Instance UID
    of the same value are stored; a UID repeated with another value is refused
    with the reason."""
    rx = receiver()
    ds = ct()
    encoded = elements(ds)
    name = next(i for i, elem in enumerate(ds) if elem.tag == 0x00100010)
    uid = next(i for i, elem in enumerate(ds) if elem.tag == 0x00080018)
    twice = encoded[: name + 1] + encoded[name:]
    assert store(rx.port, b"".join(twice), ds.SOPInstanceUID) == SUCCESS
    _, got = stored_dataset(rx, ds.SOPInstanceUID)
    assert got == b"".join(twice)

    same_uid = ct()
    encoded = elements(same_uid)
    twice = encoded[: uid + 1] + encoded[uid:]
    assert store(rx.port, b"".join(twice), same_uid.SOPInstanceUID) == SUCCESS


def test_a_sop_instance_uid_repeated_with_another_value_is_refused_in_words(
    receiver, caplog
):
    rx = receiver()
    ds = ct()
    other = Dataset()
    other.SOPInstanceUID = generate_uid()
    encoded = elements(ds)
    uid = next(i for i, elem in enumerate(ds) if elem.tag == 0x00080018)
    data = b"".join(encoded[: uid + 1] + [encode_dataset(other)] + encoded[uid + 1 :])
    with caplog.at_level(logging.WARNING, logger="courier.receiver"):
        assert store(rx.port, data, ds.SOPInstanceUID) == CANNOT_UNDERSTAND
    assert "(0008,0018) appears twice with different values" in caplog.text
    assert not list(rx.incoming.glob("*/*.dcm"))


def test_an_instance_without_a_series_uid_is_kept_in_a_series_of_its_own(
    receiver, caplog
):
    """storescp takes it; Courier too, grouped by study and sender, and says so."""
    rx = receiver()
    study = generate_uid()
    first, second = ct(StudyInstanceUID=study), ct(StudyInstanceUID=study)
    del first.SeriesInstanceUID, second.SeriesInstanceUID
    with caplog.at_level(logging.INFO, logger="courier.receiver"):
        for ds in (first, second):
            assert store(rx.port, encode_dataset(ds), ds.SOPInstanceUID) == SUCCESS

    (folder,) = {p.parent for p in rx.incoming.glob("*/*.dcm")}
    assert folder.name.startswith(f"no-series-uid.{study}.")
    assert len(list(folder.glob("*.dcm"))) == 2
    assert "event=series_without_uid" in caplog.text
    assert "has no Series Instance UID" in caplog.text


def accepted_syntaxes(ac_body: bytes) -> dict[int, tuple[int, str]]:
    """{context id: (result, transfer syntax)} of an A-ASSOCIATE-AC body."""
    out, pos = {}, 68
    while pos + 4 <= len(ac_body):
        item_type, _, length = struct.unpack_from(">BBH", ac_body, pos)
        if item_type == 0x21:
            cid, result = ac_body[pos + 4], ac_body[pos + 6]
            sub = pos + 8
            _, _, ts_length = struct.unpack_from(">BBH", ac_body, sub)
            ts = ac_body[sub + 4 : sub + 4 + ts_length].rstrip(b"\0 ").decode()
            out[cid] = (result, ts)
        pos += 4 + length
    return out


def user_items(ac_body: bytes) -> dict[int, bytes]:
    """{sub-item type: value} of the user information item of an association PDU."""
    pos = 68
    while pos + 4 <= len(ac_body):
        item_type, _, length = struct.unpack_from(">BBH", ac_body, pos)
        if item_type == 0x50:
            out, sub = {}, pos + 4
            while sub < pos + 4 + length:
                st, _, sl = struct.unpack_from(">BBH", ac_body, sub)
                out[st] = ac_body[sub + 4 : sub + 4 + sl]
                sub += 4 + sl
            return out
        pos += 4 + length
    return {}


def test_explicit_vr_is_chosen_when_a_sender_offers_both_and_courier_says_who_it_is(
    receiver,
):
    rx = receiver()
    contexts = [
        (1, CT_IMAGE, [IMPLICIT_LE, EXPLICIT_LE]),
        (3, CT_IMAGE, [IMPLICIT_LE, EXPLICIT_BE]),
        (5, CT_IMAGE, [IMPLICIT_LE]),
        (7, CT_IMAGE, [JPEG_BASELINE, EXPLICIT_LE]),
        (9, "1.2.3.4.5.6.7", [EXPLICIT_LE]),
    ]
    with RawPeer(rx.port) as peer:
        pdu_type, body = peer.associate(contexts)
        peer.release()
    assert pdu_type == 0x02
    assert accepted_syntaxes(body) == {
        1: (0, EXPLICIT_LE),
        3: (0, EXPLICIT_BE),
        5: (0, IMPLICIT_LE),
        7: (0, JPEG_BASELINE),  # the sender's first choice: its files' own syntax
        9: (3, EXPLICIT_LE),  # abstract syntax not supported
    }
    user = user_items(body)
    assert user[0x52].rstrip(b"\0").decode() == IMPLEMENTATION_CLASS_UID
    assert user[0x55].decode() == IMPLEMENTATION_VERSION_NAME
    assert IMPLEMENTATION_CLASS_UID.startswith("2.25.")
    assert IMPLEMENTATION_VERSION_NAME.startswith("COURIER_")


def test_dcmtk_storescu_sees_courier_and_every_file_written_names_courier(
    receiver, tmp_path
):
    """What dcmtk's storescu logs of the association answer, and the file meta of
    what the receiver wrote, as dcmtk's dcmdump reads it."""
    rx = receiver()
    ds = ct()
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)

    sent = storescu(rx.port, [path], extra=["-d"])
    assert sent.returncode == 0, sent.stderr
    log = sent.stdout + sent.stderr
    assert f"Their Implementation Class UID:    {IMPLEMENTATION_CLASS_UID}" in log
    assert f"Their Implementation Version Name: {IMPLEMENTATION_VERSION_NAME}" in log
    assert "PYNETDICOM" not in log

    (stored,) = rx.incoming.glob("*/*.dcm")
    meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.SourceApplicationEntityTitle == "MODALITY"
    dump = subprocess.run(
        ["/usr/bin/dcmdump", "-M", str(stored)],
        env=DCMTK_ENV, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert f"[{IMPLEMENTATION_CLASS_UID}]" in dump
    assert f"[{IMPLEMENTATION_VERSION_NAME}]" in dump


# -- release, collisions included (PS3.8 9.2.7) ------------------------------------------

RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def test_an_idle_association_is_released_not_aborted(receiver):
    """pynetdicom as the modality: Courier ends the idle association with
    A-RELEASE, which the modality answers; nobody sees an abort."""
    rx = receiver(limits=Limits(idle_timeout=0.5, pdu_timeout=5))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE)
    ended = []
    assoc = ae.associate(
        "127.0.0.1", rx.port, ae_title="COURIER",
        evt_handlers=[(evt.EVT_RELEASED, lambda e: ended.append("released")),
                      (evt.EVT_ABORTED, lambda e: ended.append("aborted"))],
    )  # fmt: skip
    assert assoc.is_established
    deadline = time.monotonic() + 30
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended == ["released"]
    assert assoc.is_released and not assoc.is_aborted


def test_a_release_collision_is_answered_as_the_acceptor_answers_it(receiver):
    """The modality asks to release just as Courier does: Courier (the acceptor,
    Sta10) waits for the modality's A-RELEASE-RP, then sends its own (AR-4)."""
    rx = receiver(limits=Limits(idle_timeout=0.5, pdu_timeout=5))
    with RawPeer(rx.port) as peer:
        assert peer.associate()[0] == 0x02
        assert peer.read_pdu(timeout=30) == (0x05, b"\x00" * 4)  # Courier's RQ
        peer.send(RELEASE_RQ)  # ours crossed it: a collision
        # The requestor answers first (Sta9 -> Sta11) ...
        peer.send(RELEASE_RP)
        # ... and the acceptor's A-RELEASE-RP follows, then the connection closes.
        assert peer.wait_closed(timeout=30) == RELEASE_RP


def test_a_release_collision_never_answered_ends_in_an_abort(receiver):
    rx = receiver(limits=Limits(idle_timeout=0.5, pdu_timeout=1))
    with RawPeer(rx.port) as peer:
        assert peer.associate()[0] == 0x02
        assert peer.read_pdu(timeout=30)[0] == 0x05
        peer.send(RELEASE_RQ)
        # Courier waits for our A-RELEASE-RP one PDU time, then aborts.
        assert peer.wait_closed(timeout=30).startswith(b"\x07")


def test_a_peer_releasing_gets_its_answer_at_once(receiver):
    rx = receiver()
    with RawPeer(rx.port) as peer:
        assert peer.associate()[0] == 0x02
        peer.send(RELEASE_RQ)
        assert peer.wait_closed(timeout=30) == RELEASE_RP
