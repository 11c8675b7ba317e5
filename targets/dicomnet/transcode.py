"""Transfer syntaxes for a peer: which contexts to propose, and converting a file
for a peer that refuses its own syntax, keeping its identity.

A file goes as it is on disk whenever the peer accepts its transfer syntax; the
proposal (`plan_contexts`) offers each file's own syntax first, so conversion is
the exception. When the peer accepts a SOP class only uncompressed, `convert`
re-encodes the file: decompressed through pydicom's pixel decoders (pylibjpeg with
its libjpeg, openjpeg and rle plugins; pyjpegls for JPEG-LS), the SOP Instance UID
and every other attribute kept, and what decompression changes set right per PS3.3
C.7.6.3 and C.7.6.1.1.5: Photometric Interpretation (what the decoder produced),
Planar Configuration, Lossy Image Compression "01" with its Ratio and Method once
pixels were lossy-compressed. Every value is written at an even length (PS3.5 7.1.1).

pydicom (which imports numpy and the decoders' plugin frames) is imported only when a
file is converted, so a send that converts nothing does not pay for it here.
Protocol code: no models, no settings.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from targets.dicomnet import load_pydicom
from targets.dicomnet.check import CorruptDataset, walk_dataset

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from targets.dicomnet.scu import Context

ExplicitVRLittleEndian = "1.2.840.10008.1.2.1"
ImplicitVRLittleEndian = "1.2.840.10008.1.2"
ExplicitVRBigEndian = "1.2.840.10008.1.2.2"
DeflatedExplicitVRLittleEndian = "1.2.840.10008.1.2.1.99"

# What a file is converted to, best first: Explicit VR keeps private VRs.
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128

# Syntaxes whose pixel data are lossy whatever the codestream (JPEG processes with
# DCT, PS3.5 A.4.1-A.4.2; the video syntaxes), and those that may be either: the
# codestream tells (JPEG-LS NEAR > 0; JPEG 2000's irreversible 9-7 wavelet).
_LOSSY = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    *(f"1.2.840.10008.1.2.4.{n}" for n in (52, 53, 54, 55, 56, 59, 60, 61, 62, 63,
                                           64, 100, 101, 102, 103, 104, 105, 106,
                                           107, 108)),
}  # fmt: skip
_JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
_J2K_EITHER = {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93",
               "1.2.840.10008.1.2.4.203"}  # fmt: skip
# Lossy Image Compression Method (0028,2114) defined terms, PS3.3 C.7.6.1.1.5.1.
_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    _JPEG_LS_NEAR: "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1", "1.2.840.10008.1.2.4.93": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}  # fmt: skip
# JPEG-LS decodes about four times faster with CharLS (the reference JPEG-LS codec,
# also dcmtk's and GDCM's) than with libjpeg, pydicom's first choice.
_PLUGIN = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    _JPEG_LS_NEAR: "pyjpegls",
}
# Bytes per swapped unit of the VRs whose values are words (PS3.5 7.3).
_SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH",
             "ST", "TM", "UC", "UR", "UT"}  # fmt: skip


class CannotConvert(Exception):
    """The file cannot be converted for the peer; the message says why."""


class _HasSyntax(Protocol):
    sop_class_uid: str
    transfer_syntax: str


@dataclass
class Converted:
    """A file re-encoded for an accepted context."""

    context: Context
    data: bytes  # the dataset, encoded in the context's transfer syntax
    lossy: bool  # the pixels had been lossy-compressed (now sent decompressed)
    note: str  # what was done, in words, for the job


def name(uid: str) -> str:
    """A transfer syntax or SOP class by name (the UID if pydicom knows none)."""
    load_pydicom()
    from pydicom.uid import UID

    known = UID(uid).name
    return known if known and known != uid else uid


def plan_contexts(
    instances: Iterable[_HasSyntax],
) -> list[list[tuple[str, list[str]]]]:
    """Group the presentation contexts a series needs into associations of <= 128.

    Per SOP class: one context per transfer syntax the files have (so the file bytes
    can go as they are), plus one with the uncompressed syntaxes the files lack, so a
    peer that refuses the files' own syntax can still get a converted copy.
    """
    syntaxes: dict[str, list[str]] = {}
    for inst in instances:
        own = syntaxes.setdefault(inst.sop_class_uid, [])
        if inst.transfer_syntax not in own:
            own.append(inst.transfer_syntax)
    groups: list[list[tuple[str, list[str]]]] = [[]]
    for sop_class, own in syntaxes.items():
        contexts = [(sop_class, [ts]) for ts in own]
        fallback = [ts for ts in TARGETS if ts not in own]
        if fallback:
            contexts.append((sop_class, fallback))
        if len(groups[-1]) + len(contexts) > MAX_CONTEXTS:
            groups.append([])
        groups[-1].extend(contexts)
    return [g for g in groups if g]


def convert(path: Path, transfer_syntax: str, offered: Sequence[Context]) -> Converted:
    """Re-encode the file at `path` for one of the `offered` (accepted) contexts of
    its SOP class, none of which is its own `transfer_syntax`.

    Raise `CannotConvert` when no offered syntax is one Courier converts into, or
    the file does not decode (no decoder for its syntax, or the decoder fails).
    """
    load_pydicom()
    cx = next((c for ts in TARGETS for c in offered if c.transfer_syntax == ts), None)
    if cx is None:
        # Each syntax once: a peer accepting several contexts with one syntax
        # (even one never proposed) named it once per context.
        names = ", ".join(dict.fromkeys(name(c.transfer_syntax) for c in offered))
        raise CannotConvert(
            f"the target accepts this SOP class only as {names}; Courier converts "
            f"{name(transfer_syntax)} only into an uncompressed syntax"
        )
    source = name(transfer_syntax)
    ds = _read(path)
    lossy = transcode(ds, cx.transfer_syntax)
    data = encode(ds, cx.transfer_syntax)
    note = (
        f"converted from {source} to {name(cx.transfer_syntax)} (the target "
        f"refused {source})"
    )
    if lossy:
        note += (
            "; lossy-compressed pixels sent decompressed (Lossy Image Compression "
            "01 kept)"
        )
    return Converted(context=cx, data=data, lossy=lossy, note=note)


def _read(path: Path) -> Dataset:
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many kinds for broken files
        raise CannotConvert(f"the file does not read: {_words(exc)}") from exc


def transcode(ds: Dataset, transfer_syntax: str) -> bool:
    """Make `ds` (a whole file's dataset) fit to be encoded in `transfer_syntax`
    (an uncompressed one), in place; return whether its pixels had been
    lossy-compressed.

    The SOP Instance UID and all other attributes stay; decompression sets the image
    pixel attributes to what the decoder produced (Photometric Interpretation,
    Planar Configuration, Number of Frames) and the lossy flags per PS3.3. Raise
    `CannotConvert` if the pixel data do not decode.
    """
    load_pydicom()
    from pydicom.uid import UID

    source = str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    lossy = False
    if UID(source).is_compressed and "PixelData" in ds:
        lossy = _lossy(ds, source)
        if lossy:
            _mark_lossy(ds, source)
        _decompress(ds, source, as_rgb=source in _LOSSY)
    elif source == ExplicitVRBigEndian and transfer_syntax != ExplicitVRBigEndian:
        _swap_words(ds)
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return lossy


def _lossy(ds: Dataset, source: str) -> bool:
    """Whether the pixel data were lossy-compressed: the flag says so, the syntax is
    lossy, or the codestream is (JPEG-LS NEAR > 0, JPEG 2000's irreversible wavelet,
    as GDCM decides it). A reversible wavelet with truncated layers cannot be told
    from its header: such a file without the flag stays without it."""
    if ds.get("LossyImageCompression") == "01" or source in _LOSSY:
        return True
    if source == _JPEG_LS_NEAR:
        return _jpeg_ls_near(_first_fragment(ds.PixelData)) > 0
    if source in _J2K_EITHER:
        return _j2k_irreversible(_first_fragment(ds.PixelData))
    return False


def _mark_lossy(ds: Dataset, source: str) -> None:
    """Lossy Image Compression "01", and the Ratio and Method of this compression
    when Courier is the first to record it (PS3.3 C.7.6.1.1.5: once lossy, always
    "01"; a history already recorded is kept as it is)."""
    if ds.get("LossyImageCompression") == "01":
        return
    ds.LossyImageCompression = "01"
    compressed = _encapsulated_size(ds.PixelData)
    expected = _expected_size(ds)
    if compressed and expected:
        ratio = f"{expected / compressed:.6g}"[:16]
        ds.LossyImageCompressionRatio = [*_values(ds, "LossyImageCompressionRatio"),
                                         ratio]  # fmt: skip
    method = _METHOD.get(source)
    if method:
        ds.LossyImageCompressionMethod = [
            *_values(ds, "LossyImageCompressionMethod"),
            method,
        ]


def _values(ds: Dataset, keyword: str) -> list:
    """The values of a multi-valued attribute as a list ([] when absent)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _decompress(ds: Dataset, source: str, *, as_rgb: bool) -> None:
    """Decode the pixel data in place, keeping the SOP Instance UID.

    YCbCr becomes RGB only for the DCT-based syntaxes, whose codec made it (as
    dcmtk's dcmdjpeg does): any other image keeps the values its codestream holds.
    JPEG 2000's YBR_RCT/YBR_ICT come out as RGB whatever (the decoder applies the
    inverse component transform).
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    try:
        decoder = get_decoder(UID(source))
    except NotImplementedError as exc:
        raise CannotConvert(f"Courier has no decoder for {name(source)}") from exc
    if not decoder.is_available:
        raise CannotConvert(
            f"no decoder for {name(source)} is installed here (pydicom needs one "
            f"of: {_words('; '.join(decoder.missing_dependencies))})"
        )
    preferred = _PLUGIN.get(source, "")
    plugins = [preferred, ""] if preferred in decoder.available_plugins else [""]
    error: Exception | None = None
    for plugin in plugins:
        try:
            _decode(ds, plugin, as_rgb)
            break
        except Exception as exc:  # noqa: BLE001 (decoders raise anything)
            error = exc
    else:
        raise CannotConvert(
            f"the pixel data do not decode as {name(source)}: {_words(error)}"
        ) from error
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        # Decoded frames are full resolution: YBR_FULL_422's native layout (two Y
        # per CbCr pair, PS3.3 C.7.6.3.1.2) would misdescribe them.
        ds.PhotometricInterpretation = "YBR_FULL"
    expected = _expected_size(ds)
    if expected and len(ds.PixelData) != expected + expected % 2:
        raise CannotConvert(
            f"decoding {name(source)} gave {len(ds.PixelData)} bytes of pixel data "
            f"where the image attributes describe {expected}"
        )


def _decode(ds: Dataset, plugin: str, as_rgb: bool) -> None:
    import warnings

    from pydicom.pixels import decompress

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decompress(
            ds,
            as_rgb=as_rgb,
            generate_instance_uid=False,
            decoding_plugin=plugin,
        )


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """`ds` encoded in `transfer_syntax` (uncompressed), every value at an even
    length, checked to walk end to end. Raise `CannotConvert` if it cannot be."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import correct_ambiguous_vr, write_dataset
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    if ts.is_compressed or ts == DeflatedExplicitVRLittleEndian:
        raise CannotConvert(f"Courier does not encode datasets as {name(ts)}")
    fp = DicomBytesIO()
    fp.is_implicit_VR = ts.is_implicit_VR
    fp.is_little_endian = ts.is_little_endian
    try:
        _prepare(ds, ts.is_implicit_VR, ts.is_little_endian)
        if not ts.is_implicit_VR:
            correct_ambiguous_vr(ds, ts.is_little_endian)
        write_dataset(fp, ds)
    except Exception as exc:  # pydicom raises many kinds for values it cannot write
        raise CannotConvert(
            f"the dataset cannot be encoded as {name(ts)}: {_words(exc)}"
        ) from exc
    data = fp.getvalue()
    try:
        walk_dataset(data, str(ts))
    except CorruptDataset as exc:
        raise CannotConvert(
            f"the dataset encoded as {name(ts)} does not check: {exc}"
        ) from exc
    return data


def _prepare(ds: Dataset, implicit: bool, little: bool) -> None:
    """Make every element of `ds` (nested items too) fit to be written as `implicit`
    / `little`: pydicom writes an element read from the file as it was read, which
    is right only when it was read in that encoding (an Implicit VR dataset under a
    JPEG syntax was not) and at an even length (PS3.5 7.1.1: a value of odd length
    gets its padding, space for text, NUL for the rest). A public element read as UN
    gets its VR from the dictionary (pydicom's `replace_un_with_known_vr`)."""
    from pydicom.dataelem import RawDataElement

    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            if (
                elem.VR is None
                or elem.is_implicit_VR != implicit
                or elem.is_little_endian != little
                or (elem.VR == "UN" and _public(tag))
            ):
                # Parsed, so pydicom encodes (and pads) it anew; a public element
                # relayed as UN gets its dictionary VR back (dcmtk's storescp finds
                # no SOP Instance UID in a UN and answers 0xC000).
                elem = ds[tag]
            elif elem.VR == "SQ" or (elem.VR == "UN" and elem.length == 0xFFFFFFFF):
                elem = ds[tag]  # parsed to reach the values in its items
            elif elem.length != 0xFFFFFFFF and elem.value and len(elem.value) % 2:
                pad = b" " if elem.VR in _TEXT_VRS else b"\0"
                ds[tag] = _raw_to_element(elem, elem.value + pad, elem.VR)
                continue
            else:
                continue
        if elem.VR == "SQ":
            for item in elem.value:
                _prepare(item, implicit, little)


def _public(tag: int) -> bool:
    from pydicom.datadict import dictionary_has_tag

    return not (tag >> 16) % 2 and dictionary_has_tag(tag)


def _raw_to_element(raw, value: bytes, vr: str):
    from pydicom.dataelem import RawDataElement, convert_raw_data_element

    padded = RawDataElement(
        raw.tag,
        vr,
        len(value),
        value,
        raw.value_tell,
        raw.is_implicit_VR,
        raw.is_little_endian,
    )
    try:
        return convert_raw_data_element(padded)
    except Exception:  # noqa: BLE001 (an odd value pydicom cannot parse: keep bytes)
        return padded


def _swap_words(ds: Dataset) -> None:
    """Byte-swap the values pydicom writes as they were read (OW, OF, OL, OD, OV)
    when a big endian dataset is written little endian (pydicom swaps numbers and
    text itself, not these). Pixel Data is swapped per Bits Allocated, as pydicom
    reads it."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_words(item)
            continue
        unit = _SWAP.get(str(elem.VR))
        if tag == 0x7FE00010 and ds.get("BitsAllocated", 0) > 8:
            unit = {16: 2, 32: 4, 64: 8}.get(int(ds.BitsAllocated), unit)
        if unit and isinstance(elem.value, bytes | bytearray) and elem.value:
            elem.value = _swapped(bytes(elem.value), unit)


def _swapped(value: bytes, unit: int) -> bytes:
    whole = len(value) - len(value) % unit
    words = array({2: "H", 4: "I", 8: "Q"}[unit], value[:whole])
    words.byteswap()
    return words.tobytes() + value[whole:]


# -- reading codestreams -------------------------------------------------------------


def _items(data: bytes) -> Iterable[bytes]:
    """The items of encapsulated pixel data (the Basic Offset Table first)."""
    pos = 0
    while pos + 8 <= len(data):
        tag = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if tag != b"\xfe\xff\x00\xe0":
            return
        yield data[pos + 8 : pos + 8 + length]
        pos += 8 + length


def _first_fragment(data: bytes) -> bytes:
    items = iter(_items(data))
    next(items, b"")
    return next(items, b"")


def _encapsulated_size(data: bytes) -> int:
    """Bytes of compressed data (fragments, without the offset table)."""
    items = iter(_items(data))
    next(items, b"")
    return sum(len(item) for item in items)


def _expected_size(ds: Dataset) -> int:
    """Bytes of native pixel data the image attributes describe (0 if unknown)."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames
        return bits * int(ds.BitsAllocated) // 8
    except (AttributeError, TypeError, ValueError):
        return 0


def _jpeg_ls_near(stream: bytes) -> int:
    """The NEAR parameter of a JPEG-LS codestream's first scan (0: lossless)."""
    pos = stream.find(b"\xff\xda")  # SOS: Ls, Ns, Ns x (Ci, Tm), NEAR, ILV, Al/Ah
    if pos < 0 or pos + 5 > len(stream):
        return 1  # unreadable: assume lossy, the safe side for the flag
    count = stream[pos + 4]
    near = pos + 5 + 2 * count
    return stream[near] if near < len(stream) else 1


def _j2k_irreversible(stream: bytes) -> bool:
    """Whether a JPEG 2000 codestream uses the irreversible 9-7 wavelet (lossy)."""
    start = stream.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (a JP2 header before)
    if start < 0:
        return True  # unreadable: assume lossy, the safe side for the flag
    pos = start + 2
    while pos + 4 <= len(stream):
        marker = stream[pos : pos + 2]
        if marker == b"\xff\x52":  # COD: Lcod Scod SGcod(4) SPcod(levels, cb
            # width, cb height, cb style, transformation)
            at = pos + 13
            return at >= len(stream) or stream[at] == 0
        if marker == b"\xff\x90":  # SOT before any COD: not a valid main header
            return True
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return True


def _words(exc: object) -> str:
    """An exception's message on one line (pydicom's span several)."""
    text = str(exc) or type(exc).__name__
    return re.sub(r"\s+", " ", text).strip()
