"""Converting a file for a peer that refuses its transfer syntax, with pydicom's own
test files (JPEG with YCbCr, RLE, JPEG 2000, JPEG-LS near-lossless, big endian, an
Implicit VR dataset under a JPEG syntax, an undecodable JPEG): the SOP Instance UID
and every attribute kept, what decompression changes set per PS3.3, every value at
an even length, the pixel values those of a real decoder."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_fragments

from targets.dicomnet.scu import Context
from targets.dicomnet.transcode import (
    CannotConvert,
    Converted,
    _j2k_irreversible,
    _jpeg_ls_near,
    convert,
    transcode,
)
from tests.interop.corpus import PYDICOM_DATA, _explicit_le, insert_elements

FILES = PYDICOM_DATA / "test_files"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
# The image pixel attributes decompression may change (PS3.3 C.7.6.3), and those a
# lossy source gains (C.7.6.1.1.5); every other attribute must come out unchanged.
CHANGED = {
    "PixelData",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
}


def read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def accepted(*syntaxes: str) -> list[Context]:
    return [Context(2 * i + 1, "1.2.3", ts) for i, ts in enumerate(syntaxes)]


def received(converted: Converted) -> pydicom.Dataset:
    """The converted dataset as a peer reads it off the wire."""
    ts = converted.context.transfer_syntax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(converted.data), force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def pixels(ds: pydicom.Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.pixel_array


def odd_lengths(data: bytes, implicit: bool) -> list[str]:
    """Every element (nested items too) whose value length is odd."""
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN",
                b"UR", b"UT", b"SV", b"UV"}  # fmt: skip
    odd, pos = [], 0
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group == 0xFFFE:  # item / delimiters: step inside
            pos += 8
            continue
        if implicit:
            (length,) = struct.unpack_from("<I", data, pos + 4)
            vr, start = b"", pos + 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in long_vrs:
                (length,) = struct.unpack_from("<I", data, pos + 8)
                start = pos + 12
            else:
                (length,) = struct.unpack_from("<H", data, pos + 6)
                start = pos + 8
        if length == 0xFFFFFFFF or vr == b"SQ":
            pos = start  # a sequence: walk its items' elements
            continue
        if length % 2:
            odd.append(f"({group:04X},{elem:04X}) {length}")
        pos = start + length
    return odd


def assert_kept(original: pydicom.Dataset, got: pydicom.Dataset) -> None:
    """The same SOP Instance UID and every other attribute with its value, but for
    those decompression changes (and the retired group lengths, which pydicom drops:
    they would be wrong after it)."""
    assert got.SOPInstanceUID == original.SOPInstanceUID
    for elem in original:
        if elem.keyword in CHANGED or elem.tag.element == 0:
            continue
        assert elem.tag in got, f"{elem.tag} {elem.keyword} lost"
        assert got[elem.tag].value == elem.value, f"{elem.tag} {elem.keyword} changed"


# -- JPEG with YCbCr -------------------------------------------------------------------


def test_a_ybr_full_422_jpeg_arrives_as_rgb_with_its_uid_and_lossy_history():
    path = FILES / "SC_rgb_dcmtk_+eb+cy+np.dcm"  # JPEG baseline, YBR_FULL_422
    original = read(path)
    assert original.PhotometricInterpretation == "YBR_FULL_422"

    converted = convert(path, str(original.file_meta.TransferSyntaxUID),
                        accepted(EXPLICIT))  # fmt: skip

    got = received(converted)
    assert_kept(original, got)
    # The decoder turned YCbCr into RGB (PS3.3 C.7.6.3.1.2), colour-by-pixel.
    assert got.PhotometricInterpretation == "RGB"
    assert got.PlanarConfiguration == 0
    assert len(got.PixelData) == 100 * 100 * 3
    assert np.array_equal(pixels(got), pixels(original))
    # Already recorded as lossy by dcmtk: the history stays as it was, once.
    assert got.LossyImageCompression == "01"
    assert got.LossyImageCompressionMethod == "ISO_10918_1"
    assert got.LossyImageCompressionRatio == original.LossyImageCompressionRatio
    assert converted.lossy and "lossy-compressed pixels sent decompressed" in (
        converted.note
    )
    assert "from JPEG Baseline (Process 1) to Explicit VR Little Endian" in (
        converted.note
    )
    assert odd_lengths(converted.data, implicit=False) == []


def test_the_file_meta_says_the_new_syntax_and_keeps_the_instance_uid(tmp_path):
    ds = read(FILES / "SC_rgb_dcmtk_+eb+cy+np.dcm")
    uid = ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == uid

    assert transcode(ds, IMPLICIT) is True  # lossy

    assert ds.file_meta.TransferSyntaxUID == IMPLICIT
    assert ds.SOPInstanceUID == uid == ds.file_meta.MediaStorageSOPInstanceUID
    # Written as a Part 10 file, it reads back as what it now is.
    ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
    again = read(tmp_path / "out.dcm")
    assert again.file_meta.TransferSyntaxUID == IMPLICIT
    assert np.array_equal(pixels(again), pixels(ds))


def test_a_lossy_jpeg_into_implicit_vr_is_flagged_with_ratio_and_method():
    # GDCM recorded 01 and a ratio but no method: what is there is kept as it is.
    path = FILES / "SC_rgb_jpeg_lossy_gdcm.dcm"
    original = read(path)

    converted = convert(path, "1.2.840.10008.1.2.4.50", accepted(IMPLICIT))

    got = received(converted)
    assert converted.context.transfer_syntax == IMPLICIT
    assert_kept(original, got)
    assert got.PhotometricInterpretation == "RGB"
    assert got.LossyImageCompression == "01"
    assert "LossyImageCompressionMethod" not in got
    assert got.LossyImageCompressionRatio == original.LossyImageCompressionRatio
    assert odd_lengths(converted.data, implicit=True) == []


def test_an_implicit_vr_dataset_under_a_jpeg_syntax_is_converted_with_its_vrs():
    # pydicom's SC_rgb_jpeg.dcm: its meta says JPEG baseline (explicit VR), its
    # dataset is Implicit VR; written as read, it would carry no VRs at all.
    path = FILES / "SC_rgb_jpeg.dcm"
    original = read(path)

    converted = convert(path, "1.2.840.10008.1.2.4.50", accepted(EXPLICIT))

    got = received(converted)
    assert_kept(original, got)
    assert got["ImageType"].VR == "CS"
    assert np.array_equal(pixels(got), pixels(original))


# -- RLE -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["SC_rgb_rle.dcm", "SC_rgb_rle_16bit_2frame.dcm", "rtdose_rle.dcm"]
)
def test_rle_is_decoded_losslessly_with_no_lossy_flag(name):
    path = FILES / name
    original = read(path)

    converted = convert(path, "1.2.840.10008.1.2.5", accepted(EXPLICIT))

    got = received(converted)
    assert_kept(original, got)
    assert got.PhotometricInterpretation == original.PhotometricInterpretation
    if original.SamplesPerPixel > 1:
        # RLE holds colour by plane; native data here are colour-by-pixel, as the
        # attribute says (PS3.3 C.7.6.3.1.3).
        assert got.PlanarConfiguration == 0
        assert np.array_equal(
            np.frombuffer(got.PixelData, dtype=pixels(got).dtype),
            pixels(original).ravel(),
        )
    assert np.array_equal(pixels(got), pixels(original))
    assert "LossyImageCompression" not in got
    assert not converted.lossy and "lossy" not in converted.note


def test_rle_pixels_equal_the_uncompressed_twin():
    # rtdose_rle.dcm is rtdose.dcm compressed: the bytes must come back exactly.
    converted = convert(FILES / "rtdose_rle.dcm", "1.2.840.10008.1.2.5",
                        accepted(EXPLICIT))  # fmt: skip
    assert received(converted).PixelData == read(FILES / "rtdose.dcm").PixelData


def test_public_elements_relayed_as_un_get_their_vr_back():
    # rtdose_rle.dcm (made by gdcmconv) has every element as UN: dcmtk's storescp
    # finds no SOP Instance UID in that and answers 0xC000 (to dcmsend too).
    path = FILES / "rtdose_rle.dcm"
    original = read(path)
    assert original.get_item(0x00080018).VR == "UN"  # as read, before pydicom parses it

    converted = convert(path, "1.2.840.10008.1.2.5", accepted(EXPLICIT))

    assert b"\x08\x00\x18\x00UI" in converted.data
    got = received(converted)
    assert got["SOPInstanceUID"].VR == "UI" and got["StudyDate"].VR == "DA"
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.ReferencedRTPlanSequence[0].ReferencedSOPClassUID == (
        "1.2.840.10008.5.1.4.1.1.481.5"
    )


# -- JPEG 2000 -------------------------------------------------------------------------


def test_jpeg_2000_ybr_rct_arrives_as_rgb_without_a_lossy_flag():
    path = FILES / "GDCMJ2K_TextGBR.dcm"  # J2K lossless, YBR_RCT
    original = read(path)
    assert original.PhotometricInterpretation == "YBR_RCT"

    converted = convert(path, "1.2.840.10008.1.2.4.90", accepted(EXPLICIT))

    got = received(converted)
    assert_kept(original, got)
    assert got.PhotometricInterpretation == "RGB"  # the inverse RCT was applied
    assert got.PlanarConfiguration == 0
    assert np.array_equal(pixels(got), pixels(original))
    assert "LossyImageCompression" not in got and not converted.lossy


def test_lossless_jpeg_2000_equals_the_uncompressed_twin():
    converted = convert(FILES / "MR_small_jp2klossless.dcm",
                        "1.2.840.10008.1.2.4.90", accepted(EXPLICIT))  # fmt: skip
    assert received(converted).PixelData == read(FILES / "MR_small.dcm").PixelData


def test_an_irreversible_jpeg_2000_without_a_flag_gets_01_ratio_and_method(
    tmp_path,
):
    # JPEG2000.dcm (1.2.840.10008.1.2.4.91, which may be either) uses the 9-7
    # wavelet: lossy. With its flags removed, Courier must record them.
    original = read(FILES / "JPEG2000.dcm")
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio"):
        delattr(original, keyword)
    path = tmp_path / "unflagged.dcm"
    original.save_as(path)
    fragments = list(generate_fragments(original.PixelData[8:]))  # after the BOT
    expected_ratio = (original.Rows * original.Columns * 2) / sum(
        len(f) for f in fragments
    )

    converted = convert(path, "1.2.840.10008.1.2.4.91", accepted(EXPLICIT))

    got = received(converted)
    assert_kept(original, got)
    assert got.LossyImageCompression == "01"
    assert got.LossyImageCompressionMethod == "ISO_15444_1"
    assert float(got.LossyImageCompressionRatio) == pytest.approx(expected_ratio, 1e-5)
    assert converted.lossy


def first_fragment(name: str) -> bytes:
    data = read(FILES / name).PixelData
    return next(generate_fragments(data[8 + int.from_bytes(data[4:8], "little") :]))


def test_the_irreversible_j2k_wavelet_is_taken_as_lossy_and_the_flag_wins():
    assert _j2k_irreversible(first_fragment("JPEG2000.dcm"))  # 9-7: lossy
    assert not _j2k_irreversible(first_fragment("MR_small_jp2klossless.dcm"))  # 5-3
    # 693_J2KI.dcm has the reversible wavelet but truncated layers (ratio 339):
    # nothing in the header tells, its "01" does, and it is kept.
    assert not _j2k_irreversible(first_fragment("693_J2KI.dcm"))
    path = FILES / "693_J2KI.dcm"
    original = read(path)

    converted = convert(path, "1.2.840.10008.1.2.4.91", accepted(EXPLICIT))

    got = received(converted)
    assert_kept(original, got)
    assert converted.lossy and got.LossyImageCompression == "01"
    assert got.LossyImageCompressionRatio == original.LossyImageCompressionRatio
    assert "LossyImageCompressionMethod" not in got


# -- JPEG-LS ---------------------------------------------------------------------------


def test_jpeg_ls_near_lossless_without_a_flag_gets_01_ratio_and_method():
    path = FILES / "JPEGLSNearLossless_16.dcm"
    original = read(path)
    assert "LossyImageCompression" not in original
    fragment = first_fragment("JPEGLSNearLossless_16.dcm")
    assert _jpeg_ls_near(fragment) > 0

    converted = convert(path, "1.2.840.10008.1.2.4.81", accepted(EXPLICIT))

    got = received(converted)
    assert_kept(original, got)
    assert got.LossyImageCompression == "01"
    assert got.LossyImageCompressionMethod == "ISO_14495_1"
    ratio = original.Rows * original.Columns * 2 / len(fragment)
    assert float(got.LossyImageCompressionRatio) == pytest.approx(ratio, 1e-5)
    assert np.array_equal(pixels(got), pixels(original))


def test_jpeg_ls_lossless_equals_the_uncompressed_twin_and_stays_unflagged():
    converted = convert(FILES / "MR_small_jpeg_ls_lossless.dcm",
                        "1.2.840.10008.1.2.4.80", accepted(EXPLICIT))  # fmt: skip
    got = received(converted)
    assert got.PixelData == read(FILES / "MR_small.dcm").PixelData
    assert "LossyImageCompression" not in got and not converted.lossy


# -- uncompressed sources --------------------------------------------------------------


@pytest.mark.parametrize(
    ("big", "twin"),
    [("MR_small_bigendian.dcm", "MR_small.dcm"), ("rtdose_expb.dcm", "rtdose.dcm")],
)
def test_big_endian_words_are_swapped_for_little_endian(big, twin):
    # pydicom writes OW values as they were read: unswapped, every pixel would
    # change. The little endian twin holds the values.
    converted = convert(FILES / big, "1.2.840.10008.1.2.2", accepted(EXPLICIT))
    got = received(converted)
    assert got.SOPInstanceUID == read(FILES / big).SOPInstanceUID
    assert np.array_equal(pixels(got), pixels(read(FILES / twin)))


def test_an_odd_length_value_is_padded_when_re_encoded(tmp_path):
    raw = (FILES / "CT_small.dcm").read_bytes()
    odd = _explicit_le(0x00104000, b"LT", b"odd")  # Patient Comments, 3 bytes
    path = tmp_path / "odd.dcm"
    path.write_bytes(insert_elements(raw, 0x00104000, odd))

    # Into Implicit VR pydicom re-encodes every value; into the file's own Explicit
    # VR it would write the values as read (the path of a compressed source).
    for syntax in (IMPLICIT, EXPLICIT):
        converted = convert(path, EXPLICIT, accepted(syntax))
        assert odd_lengths(converted.data, implicit=syntax == IMPLICIT) == []
        assert received(converted).PatientComments == "odd"


# -- what cannot be converted ----------------------------------------------------------


def test_a_jpeg_no_python_decoder_reads_fails_in_words():
    # 12-bit JPEG extended with invalid scan parameters: only dcmtk decodes it.
    with pytest.raises(CannotConvert) as caught:
        convert(FILES / "JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", accepted(EXPLICIT))
    message = str(caught.value)
    assert message.startswith(
        "the pixel data do not decode as JPEG Extended (Process 2 and 4): "
    )
    assert "scan start must be zero" in message and "\n" not in message


def test_a_peer_that_accepts_only_another_compressed_syntax_is_named():
    with pytest.raises(CannotConvert) as caught:
        convert(FILES / "MR_small_RLE.dcm", "1.2.840.10008.1.2.5",
                accepted("1.2.840.10008.1.2.4.80"))  # fmt: skip
    assert "only as JPEG-LS Lossless Image Compression" in str(caught.value)


def test_a_syntax_accepted_on_several_contexts_is_named_once():
    # A peer accepting both proposed contexts (Explicit, Implicit) with JPEG
    # Baseline, proposed on neither: the message named it twice.
    jpeg = "1.2.840.10008.1.2.4.50"
    offered = [Context(1, "1.2.3", jpeg), Context(3, "1.2.3", jpeg)]
    with pytest.raises(CannotConvert) as caught:
        convert(FILES / "MR_small_RLE.dcm", "1.2.840.10008.1.2.5", offered)
    assert str(caught.value) == (
        "the target accepts this SOP class only as JPEG Baseline (Process 1); "
        "Courier converts RLE Lossless only into an uncompressed syntax"
    )


def test_transcode_imports_neither_pydicom_nor_numpy_until_it_converts():
    # A send that converts nothing must not pay for numpy and the decoders here.
    code = (
        "import sys, targets.dicomnet.transcode as t\n"
        "t.plan_contexts([])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'pydicom', 'numpy', 'pylibjpeg', 'libjpeg', 'openjpeg', 'jpeg_ls'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- through the DICOM handler, to a peer ----------------------------------------------


class StorageSCP:
    """A pynetdicom storage SCP for CT, MR and Secondary Capture accepting only
    `syntaxes`; it records each dataset by the SOP Instance UID of the request, with
    the transfer syntax it came in."""

    def __init__(self, syntaxes: list[str]):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import (
            CTImageStorage,
            MRImageStorage,
            SecondaryCaptureImageStorage,
        )

        from tests.peers import free_port

        self.received: dict[str, tuple[str, pydicom.Dataset]] = {}
        ae = AE(ae_title="PICKY")
        for sop_class in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class, syntaxes)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.on_store)],
        )

    def on_store(self, event) -> int:
        ds = event.dataset
        ts = str(event.context.transfer_syntax)
        self.received[str(event.request.AffectedSOPInstanceUID)] = (ts, ds)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def corpus_folder(folder: Path, names: list[str]) -> dict[str, str]:
    """Copies of pydicom's files, each with a fresh SOP Instance UID; {name: UID}."""
    from tests.interop.corpus import with_fresh_uid

    folder.mkdir()
    uids = {}
    for name in names:
        raw, uid = with_fresh_uid((FILES / name).read_bytes())
        (folder / name).write_bytes(raw)
        uids[name] = uid
    return uids


SENT_FILES = [
    "CT_small.dcm",  # Explicit VR Little Endian: goes as it is
    "MR_small_RLE.dcm",  # RLE: lossless conversion
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422: lossy
    "JPEG-lossy.dcm",  # 12-bit JPEG no Python decoder reads
]


def send(tmp_path: Path, syntaxes: list[str]):
    from targets.models import DicomTarget
    from targets.series import scan_folder

    uids = corpus_folder(tmp_path / "series", SENT_FILES)
    scp = StorageSCP(syntaxes)
    try:
        target = DicomTarget(
            name="picky", host="127.0.0.1", port=scp.port, called_aet="PICKY",
            calling_aet="COURIER", connect_timeout=5.0, acse_timeout=10.0,
            dimse_timeout=30.0,
        )  # fmt: skip
        result = target.handler.send(scan_folder(tmp_path / "series"))
    finally:
        scp.stop()
    outcomes = {Path(o.path).name: o for o in result.outcomes}
    return uids, outcomes, scp.received


def test_only_what_the_peer_refuses_is_converted_each_under_its_own_uid(tmp_path):
    from targets.kinds.base import FAILED, SENT, WARNING

    uids, outcomes, received = send(tmp_path, [EXPLICIT])

    assert outcomes["CT_small.dcm"].status == SENT
    assert outcomes["CT_small.dcm"].message == ""
    rle = outcomes["MR_small_RLE.dcm"]
    assert rle.status == SENT
    assert rle.message == (
        "converted from RLE Lossless to Explicit VR Little Endian (the target "
        "refused RLE Lossless)"
    )
    lossy = outcomes["SC_rgb_dcmtk_+eb+cy+np.dcm"]
    assert lossy.status == WARNING
    assert "lossy-compressed pixels sent decompressed" in lossy.message
    # Nothing in Python decodes it: failed by name, in words, and the rest went on.
    bad = outcomes["JPEG-lossy.dcm"]
    assert bad.status == FAILED
    assert bad.message.startswith(
        "cannot convert: the pixel data do not decode as JPEG Extended"
    )
    assert uids["JPEG-lossy.dcm"] not in received
    # The peer got each instance under the UID of its request, the dataset's own.
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"):
        ts, ds = received[uids[name]]
        assert ts == EXPLICIT and ds.SOPInstanceUID == uids[name]
    ds = received[uids["SC_rgb_dcmtk_+eb+cy+np.dcm"]][1]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    assert ds.PhotometricInterpretation == "RGB" and ds.LossyImageCompression == "01"
    assert np.array_equal(
        pixels(ds), pixels(read(tmp_path / "series" / "SC_rgb_dcmtk_+eb+cy+np.dcm"))
    )


def test_a_peer_that_accepts_the_files_syntaxes_gets_the_files_unconverted(tmp_path):
    from targets.kinds.base import SENT

    syntaxes = [
        EXPLICIT,
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
    ]
    uids, outcomes, received = send(tmp_path, syntaxes)

    assert {o.status for o in outcomes.values()} == {SENT}
    assert all(o.message == "" for o in outcomes.values())
    for name, uid in uids.items():
        original = read(tmp_path / "series" / name)
        ts, ds = received[uid]
        assert ts == str(original.file_meta.TransferSyntaxUID), name
        assert ds.PixelData == original.PixelData, name


def test_without_pylibjpeg_libjpeg_what_the_readme_says_is_lost_fails_by_name():
    # A site that must not ship GPL code uninstalls pylibjpeg-libjpeg: pydicom's
    # "pylibjpeg" plugin for the JPEG and JPEG-LS syntaxes is exactly libjpeg.
    # In a subprocess: pydicom's decoder registry is global.
    code = """
from pathlib import Path
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEGLSTransferSyntaxes, JPEGTransferSyntaxes
for uid in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes):
    get_decoder(uid).remove_plugin("pylibjpeg")
from targets.dicomnet.scu import Context
from targets.dicomnet.transcode import CannotConvert, convert
offered = [Context(1, "1.2.3", "1.2.840.10008.1.2.1")]
for name, ts in (
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "1.2.840.10008.1.2.4.50"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
):
    try:
        convert(Path(FILES_DIR) / name, ts, offered)
        print(name, "converted")
    except CannotConvert as exc:
        print(name, "failed:", exc)
""".replace("FILES_DIR", repr(str(FILES)))
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert said["JPGExtended.dcm"].startswith(
        "failed: the pixel data do not decode as JPEG Extended"
    )
    assert "12-bit precision" in said["JPGExtended.dcm"]
    assert said["SC_rgb_jpeg_gdcm.dcm"].startswith(
        "failed: no decoder for JPEG Lossless, Non-Hierarchical, First-Order Prediction"
    )
    for name in (
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
    ):
        assert said[name] == "converted", name
