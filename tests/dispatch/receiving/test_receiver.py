"""The receiver alone (no database): dcmtk storescu/echoscu and pynetdicom as peers."""

from __future__ import annotations

import logging
import shutil
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import examples
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode

from targets.dicomnet.check import CorruptDataset, check_dataset
from targets.dicomnet.sockets import enable_tcp_nodelay
from tests.dicomgen import make_mixed_study, make_series
from tests.fixtures.receive_peers import echoscu, responses_to_the_caller, storescu

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a file, without preamble and file meta."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return path.read_bytes()[128 + 4 + 12 + meta.FileMetaInformationGroupLength :]


def stored_files(rx) -> list[Path]:
    return sorted(rx.incoming.glob("*/*.dcm"))


def raw_instance(path: Path, payload: bytes, sop_uid: str | None = None) -> Path:
    """A file with valid file meta followed by `payload` as its dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + payload)
    return path


def send_raw(port: int, paths: list[Path]) -> list[int]:
    """C-STORE files as their bytes are (corrupt or not) over one association."""
    enable_tcp_nodelay()
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="COURIER")
        assert assoc.is_established
        responses_to_the_caller(assoc)
        statuses = [int(assoc.send_c_store(p).Status) for p in paths]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
    return statuses


def test_a_series_from_storescu_is_stored_as_sent_in_one_folder(receiver, tmp_path):
    series = make_series(tmp_path / "ct", 12)
    rx = receiver()

    done = storescu(rx.port, [series.folder], calling="CT_SCANNER",
                    called="PACS", extra=["+sd"])  # fmt: skip

    assert done.returncode == 0, done.stderr
    files = stored_files(rx)
    assert len(files) == 12
    assert {f.stem for f in files} == set(series.sop_uids)
    (open_series,) = rx.open_series()
    assert open_series.key == (series.series_uid, "CT_SCANNER", "PACS")
    assert open_series.peer_address.startswith("127.0.0.1:")
    assert open_series.instance_count == 12
    source = {s: f for s, f in zip(series.sop_uids, series.files, strict=True)}
    for f in files[:3]:
        got, sent = pydicom.dcmread(f), pydicom.dcmread(source[f.stem])
        assert got.PixelData == sent.PixelData
        # storescu itself drops the trailing padding element (FFFC,FFFC).
        assert [e.tag for e in got] == [e.tag for e in sent if e.tag != 0xFFFCFFFC]


def test_the_bytes_sent_are_stored_untouched(receiver, tmp_path):
    original = make_series(tmp_path / "ct", 1).files[0]
    rx = receiver()

    assert send_raw(rx.port, [original]) == [0x0000]

    (stored,) = stored_files(rx)
    assert stored.read_bytes().endswith(dataset_bytes(original))
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_each_series_of_a_study_gets_its_own_folder(receiver, tmp_path):
    ct, mr = make_mixed_study(tmp_path / "study", ct=5, mr=4)
    rx = receiver()

    done = storescu(rx.port, [tmp_path / "study"], extra=["+sd", "+r"])

    assert done.returncode == 0, done.stderr
    by_series = {s.series_uid: s for s in rx.open_series()}
    assert by_series[ct.series_uid].instance_count == 5
    assert by_series[mr.series_uid].instance_count == 4
    assert len({s.folder for s in by_series.values()}) == 2


def test_a_duplicate_instance_replaces_the_earlier_copy(receiver, tmp_path):
    series = make_series(tmp_path / "ct", 4)
    rx = receiver()

    assert storescu(rx.port, [series.folder], extra=["+sd"]).returncode == 0
    assert storescu(rx.port, series.files[:2]).returncode == 0

    assert len(stored_files(rx)) == 4
    assert rx.open_series()[0].instance_count == 4
    assert rx.stats["replaced"] == 2
    assert not list(rx.incoming.glob("*/.*.part"))


def test_a_series_is_closed_after_the_quiet_period(receiver, tmp_path):
    series = make_series(tmp_path / "ct", 3)
    rx = receiver(quiet_seconds=0.5)

    assert storescu(rx.port, [series.folder], extra=["+sd"]).returncode == 0

    assert rx.bookkeeper.closed_event.wait(30)
    (closed,) = rx.bookkeeper.closed
    assert closed.instance_count == 3 and closed.calling_aet == "MODALITY"
    assert rx.open_series() == []
    # The same series arriving again afterwards starts a new folder.
    assert storescu(rx.port, series.files[:1]).returncode == 0
    assert rx.open_series()[0].folder != closed.folder


def test_the_folder_description_survives_for_adoption(receiver, tmp_path):
    import json

    series = make_series(tmp_path / "ct", 2)
    rx = receiver()
    assert storescu(rx.port, [series.folder], extra=["+sd"]).returncode == 0

    (sidecar,) = rx.incoming.glob("*.series.json")
    meta = json.loads(sidecar.read_text())
    assert meta["series_uid"] == series.series_uid
    assert meta["calling_aet"] == "MODALITY" and meta["called_aet"] == "COURIER"


def test_echo_is_answered(receiver):
    rx = receiver()
    done = echoscu(rx.port)
    assert done.returncode == 0, done.stderr


def test_an_unknown_calling_ae_title_is_refused_when_a_list_is_set(
    receiver, tmp_path, caplog
):
    series = make_series(tmp_path / "ct", 2)
    rx = receiver(accepted_calling_aets=["CT_SCANNER"])

    with caplog.at_level(logging.WARNING, logger="courier.receiver"):
        refused = storescu(rx.port, [series.folder], calling="INTRUDER", extra=["+sd"])
    accepted = storescu(rx.port, [series.folder], calling="CT_SCANNER", extra=["+sd"])

    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr + refused.stdout
    assert "event=association_rejected calling_aet=INTRUDER" in caplog.text
    assert accepted.returncode == 0, accepted.stderr
    assert {s.calling_aet for s in rx.open_series()} == {"CT_SCANNER"}


def test_a_non_dicom_payload_is_refused_and_logged(receiver, tmp_path, caplog):
    rx = receiver()
    junk = raw_instance(tmp_path / "junk.dcm", b"this is not a DICOM dataset\n" * 40)
    good = make_series(tmp_path / "ct", 1).files[0]

    with caplog.at_level(logging.WARNING, logger="courier.receiver"):
        statuses = send_raw(rx.port, [junk, good])

    assert statuses[0] == 0xC210
    assert statuses[1] == 0x0000  # the same association goes on
    assert "event=instance_refused status=0xC210 calling_aet=RAWSCU" in caplog.text
    assert [f.stem for f in stored_files(rx)] == [pydicom.dcmread(good).SOPInstanceUID]


def test_a_truncated_dataset_is_refused_without_affecting_other_associations(
    receiver, tmp_path, caplog
):
    rx = receiver()
    good_series = make_series(tmp_path / "ct", 30)
    whole = dataset_bytes(make_series(tmp_path / "src", 1).files[0])
    truncated = raw_instance(tmp_path / "cut.dcm", whole[: len(whole) // 2])
    results: dict = {}

    def send_good():
        results["good"] = storescu(rx.port, [good_series.folder], extra=["+sd"])

    thread = threading.Thread(target=send_good)
    thread.start()
    with caplog.at_level(logging.WARNING, logger="courier.receiver"):
        statuses = send_raw(rx.port, [truncated] * 3)
    thread.join(120)

    assert statuses == [0xC210] * 3
    assert "runs past the end of the data" in caplog.text
    assert results["good"].returncode == 0, results["good"].stderr
    assert len(stored_files(rx)) == 30


def test_a_nearly_full_disk_answers_out_of_resources(receiver, tmp_path, caplog):
    series = make_series(tmp_path / "ct", 2)
    rx = receiver(min_free_bytes=1 << 62)

    with caplog.at_level(logging.ERROR, logger="courier.receiver"):
        statuses = send_raw(rx.port, series.files)

    assert statuses == [0xA700, 0xA700]
    assert stored_files(rx) == []
    assert "event=instance_refused status=0xA700" in caplog.text
    assert "nearly full" in caplog.text
    rx.tick()
    # Both refusals reported, in one tick or two (the receiver ticks every 0.2 s).
    refusals = rx.bookkeeper.refusals
    assert sum(count for _, count in refusals) == 2, refusals
    assert all("out of resources" in reason for reason, _ in refusals), refusals


def test_a_series_folder_that_cannot_be_made_answers_out_of_resources(
    receiver, tmp_path, caplog
):
    series = make_series(tmp_path / "ct", 2)
    rx = receiver()
    # The spool's incoming folder replaced by a file: a new series' folder cannot
    # be made (as on a full or read-only disk), before any instance is written.
    shutil.rmtree(rx.incoming)
    rx.incoming.write_bytes(b"")

    with caplog.at_level(logging.ERROR, logger="courier.receiver"):
        statuses = send_raw(rx.port, series.files)

    assert statuses == [0xA700, 0xA700]
    assert "event=instance_refused status=0xA700" in caplog.text
    assert "cannot write to the spool" in caplog.text
    rx.tick()
    # Both refusals reported, in one tick or two (the receiver ticks every 0.2 s).
    refusals = rx.bookkeeper.refusals
    assert sum(count for _, count in refusals) == 2, refusals
    assert all("out of resources" in reason for reason, _ in refusals), refusals
    assert rx.open_series() == []

    rx.incoming.unlink()
    rx.incoming.mkdir()
    assert send_raw(rx.port, series.files) == [0x0000, 0x0000]
    assert len(stored_files(rx)) == 2


@pytest.mark.parametrize("example", ["ct", "mr", "rt_plan", "rt_ss", "jpeg2k",
                                     "rgb_color", "waveform"])  # fmt: skip
def test_the_dataset_check_accepts_real_files(example):
    ds = getattr(examples, example)
    ts = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    raw = encode(ds, ts.is_implicit_VR, ts.is_little_endian)
    uids = check_dataset(raw, str(ts))
    assert uids["SOPInstanceUID"] == ds.SOPInstanceUID
    for cut in (len(raw) - 1, len(raw) // 2, 10):
        with pytest.raises(CorruptDataset):
            check_dataset(raw[:cut], str(ts))


def test_the_dataset_check_needs_the_series_uid():
    ds = examples.ct.copy()
    del ds.SeriesInstanceUID
    raw = encode(ds, False, True)
    with pytest.raises(CorruptDataset, match="SeriesInstanceUID"):
        check_dataset(raw, str(ds.file_meta.TransferSyntaxUID))


def test_a_series_the_bookkeeping_cannot_save_or_close_never_holds_up_the_others(
    receiver, tmp_path
):
    from tests.fixtures.receive_peers import MemoryBookkeeper

    class Picky(MemoryBookkeeper):
        """Refuses one series, as PostgreSQL refused a value with a NUL."""

        bad: str = ""

        def save(self, series):
            super().save(series)
            return [s for s in series if s.series_uid == self.bad]

        def close(self, series):
            if series.series_uid == self.bad:
                raise ValueError("A string literal cannot contain NUL characters")
            super().close(series)

    first, second = make_series(tmp_path / "a", 2), make_series(tmp_path / "b", 2)
    bookkeeper = Picky()
    bookkeeper.bad = first.series_uid
    rx = receiver(bookkeeper=bookkeeper, quiet_seconds=3600, tick_seconds=3600)
    for series in (first, second):
        assert storescu(rx.port, [series.folder], extra=["+sd"]).returncode == 0

    rx.tick()
    bad = next(s for s in rx.open_series() if s.series_uid == first.series_uid)
    assert bad.dirty  # tried again on the next tick
    rx.quiet_seconds = 0
    closed = rx.tick()

    assert [s.series_uid for s in closed] == [second.series_uid]
    assert [s.series_uid for s in bookkeeper.closed] == [second.series_uid]
    assert rx.open_series() == []
