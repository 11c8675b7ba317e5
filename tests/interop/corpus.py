"""The interoperability corpus: every Part 10 instance bundled with pydicom, plus
crafted files that real networks produce, each with a fresh SOP Instance UID.

pydicom's files keep every byte except the UID: the new SOP Instance UID has the
same length as the old one and is written over it in place (in the dataset and in
the file meta; a deflated dataset is inflated, patched and deflated again), so
whatever is odd about a file (element order, padding, odd lengths, a truncated end)
reaches Courier as pydicom ships it. Several bundled files share a UID (one image in
several syntaxes); after this every file has its own.

The extras are made here, with dcmtk's own tools where one exists (dcmconv for big
endian and deflated, pdf2dcm for an encapsulated PDF) and by hand for what no tool
writes: a private sequence relayed as UN of undefined length inside an Explicit VR
dataset (PS3.5 6.2.2: its content is Implicit VR Little Endian), an odd-length
value, a truncated file, and pydicom's JPEG-LS lossy files (which lack a Series
Instance UID) with one added.

Nothing is downloaded: pydicom's files are found on disk, never through
`get_testdata_files` (which tries to download the extra pydicom-data set).
"""

from __future__ import annotations

import random
import struct
import subprocess
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.misc import is_dicom
from pydicom.uid import UID

from tests.peers import DCMTK_ENV

PYDICOM_DATA = Path(pydicom.data.__file__).parent
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
IMPLICIT = "1.2.840.10008.1.2"
# VRs with a 2-byte reserved field and a 4-byte length in Explicit VR (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
            b"UR", b"UT", b"UV"}  # fmt: skip
_rng = random.SystemRandom()


@dataclass
class CorpusFile:
    name: str  # where it came from: "test_files/CT_small.dcm", "extra/deflated.dcm"
    path: Path  # the copy with the fresh UID
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    # Why this file must never be stored anywhere: it is truncated ("" if whole).
    broken: str = ""
    # Something odd about a valid-looking file, e.g. misencoded ("" if nothing).
    note: str = ""

    @property
    def syntax_name(self) -> str:
        return UID(self.transfer_syntax).name or self.transfer_syntax


def bundled_files() -> list[tuple[str, Path]]:
    """(name, path) of every bundled Part 10 file that is a storable instance: it
    has a SOP Class UID and a SOP Instance UID (DICOMDIRs and bare fragments have
    neither). Listed from pydicom's data folder, not hard-coded."""
    found = []
    for path in sorted(PYDICOM_DATA.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            if not is_dicom(path):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # no usable file meta: not an instance to send
            continue
        if "SOPClassUID" in ds and "SOPInstanceUID" in ds:
            found.append((str(path.relative_to(PYDICOM_DATA)), path))
    return found


@dataclass(frozen=True)
class Source:
    """A file the corpus copies: read once per session, copied with a fresh SOP
    Instance UID for each sender (only the UID's characters differ)."""

    name: str
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str


def sources(extras: Path) -> list[Source]:
    """Every bundled instance and every crafted one (written into `extras`)."""
    out = []
    for name, path in bundled_files() + make_extras(extras):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append(
            Source(
                name=name,
                path=path,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            )
        )
    return out


def structure(raw: bytes) -> tuple[str, str]:
    """(why the dataset is truncated, how it is misencoded): "" when it is not.

    Truncated: an element runs past the end in the file's own transfer syntax and
    in any other. Misencoded: it walks only in a syntax other than its own (e.g. an
    Implicit VR dataset under a JPEG transfer syntax; pydicom reads it, dcmtk not).
    """
    offset, ts = dataset_start(raw)
    body = raw[offset:]
    if ts == DEFLATED:
        try:
            body = zlib.decompress(body, -zlib.MAX_WBITS)
        except zlib.error as exc:
            return f"deflated data does not inflate: {exc}", ""
    implicit, little = ts == IMPLICIT, ts != BIG_ENDIAN
    try:
        walk(body, implicit=implicit, little=little)
        return "", ""
    except ValueError as exc:
        reason = str(exc)
    try:
        walk(body, implicit=not implicit, little=little)
    except ValueError:
        return reason, ""
    other = "Explicit" if implicit else "Implicit"
    return "", f"dataset is {other} VR, not {UID(ts).name} as its meta says"


# -- raw elements --------------------------------------------------------------------


def dataset_start(raw: bytes) -> tuple[int, str]:
    """(offset of the dataset, transfer syntax) of a Part 10 file's bytes."""
    if raw[128:132] != b"DICM":
        raise ValueError("not a Part 10 file")
    pos, ts = 132, ""
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        if group != 2:
            break
        vr = raw[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            start = pos + 8
        if elem == 0x0010:
            ts = raw[start : start + length].rstrip(b"\0 ").decode()
        pos = start + length
    return pos, ts


def walk(
    body: bytes, *, implicit: bool, little: bool, start: int = 0
) -> list[tuple[int, int, int]]:
    """Elements of `body` from `start` as (tag, header start, value end), to the end
    of the data or to an item or sequence delimiter (included, then it stops).

    Undefined lengths are followed through items and delimiters; an undefined-length
    UN holds Implicit VR Little Endian (PS3.5 6.2.2). ValueError when an element runs
    past the end of the data.
    """
    out, pos = [], start
    while pos < len(body):
        tag, value_start, length, vr = _header(body, pos, implicit, little)
        if tag in (0xFFFEE0DD, 0xFFFEE00D):
            out.append((tag, pos, value_start))
            return out
        if length == 0xFFFFFFFF:
            un = vr == b"UN"
            value_end = _skip_items(body, value_start, implicit or un, little or un)
        else:
            value_end = value_start + length
        if value_end > len(body):
            raise ValueError(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end "
                f"of the data ({value_end - len(body)} bytes missing)"
            )
        out.append((tag, pos, value_end))
        pos = value_end
    return out


def _header(body: bytes, pos: int, implicit: bool, little: bool):
    """(tag, value start, length, VR) of the element at `pos`."""
    if pos + 8 > len(body):
        raise ValueError(f"the data ends inside an element header at byte {pos}")
    fmt = "<" if little else ">"
    group, elem = struct.unpack_from(fmt + "HH", body, pos)
    tag = group << 16 | elem
    if group == 0xFFFE or implicit:
        (length,) = struct.unpack_from(fmt + "I", body, pos + 4)
        return tag, pos + 8, length, b""
    vr = body[pos + 4 : pos + 6]
    if vr in LONG_VRS:
        if pos + 12 > len(body):
            raise ValueError(f"the data ends inside an element header at byte {pos}")
        (length,) = struct.unpack_from(fmt + "I", body, pos + 8)
        return tag, pos + 12, length, vr
    (length,) = struct.unpack_from(fmt + "H", body, pos + 6)
    return tag, pos + 8, length, vr


def _skip_items(body: bytes, pos: int, implicit: bool, little: bool) -> int:
    """End of an undefined-length value at `pos`: items up to (FFFE,E0DD)."""
    fmt = "<" if little else ">"
    while True:
        if pos + 8 > len(body):
            raise ValueError("an undefined-length value runs past the end of the data")
        group, elem, length = struct.unpack_from(fmt + "HHI", body, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos + 8
        if (group, elem) != (0xFFFE, 0xE000):
            raise ValueError(
                f"({group:04X},{elem:04X}) where an item was expected at byte {pos}"
            )
        if length != 0xFFFFFFFF:
            pos += 8 + length
            continue
        inside = walk(body, implicit=implicit, little=little, start=pos + 8)
        if not inside or inside[-1][0] != 0xFFFEE00D:
            raise ValueError("an item of undefined length has no delimiter")
        pos = inside[-1][2]


# -- fresh SOP Instance UIDs -----------------------------------------------------------

PYDICOM_ROOT = "1.2.826.0.1.3680043.8.498."


def fresh_uid(length: int) -> str:
    """A new random UID of exactly `length` characters (10 to 64)."""
    if not 10 <= length <= 64:
        raise ValueError(f"cannot make a UID of {length} characters")
    if length - 5 <= 38:  # 2.25.<integer below 2**128>
        prefix = "2.25."
    else:
        prefix = PYDICOM_ROOT
    digits = length - len(prefix)
    return (
        prefix
        + str(_rng.randint(1, 9))
        + "".join(str(_rng.randint(0, 9)) for _ in range(digits - 1))
    )


def _element_patterns(ts: str, length: int) -> list[bytes]:
    """The header bytes of (0008,0018) with a value of `length` in syntax `ts`."""
    if ts == IMPLICIT:
        return [b"\x08\x00\x18\x00" + struct.pack("<I", length)]
    if ts == BIG_ENDIAN:
        return [b"\x00\x08\x00\x18UI" + struct.pack(">H", length)]
    # Explicit little endian and the compressed syntaxes. A misencoded file may be
    # implicit under an explicit syntax; a GDCM-converted one has the UID as UN.
    return [
        b"\x08\x00\x18\x00UI" + struct.pack("<H", length),
        b"\x08\x00\x18\x00UN\x00\x00" + struct.pack("<I", length),
        b"\x08\x00\x18\x00" + struct.pack("<I", length),
    ]


def with_fresh_uid(raw: bytes, old: str = "") -> tuple[bytes, str]:
    """`raw` (whose SOP Instance UID is `old`, read from it when not given) with a
    new SOP Instance UID of the same length; (bytes, new UID).

    Only the UID's characters change: in the dataset's (0008,0018) and in the file
    meta's (0002,0003) (there with the group length adjusted when the meta's old
    value had another length).
    """
    offset, ts = dataset_start(raw)
    if not old:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import io

            ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        old = str(ds.SOPInstanceUID)
    new = fresh_uid(len(old))
    body = raw[offset:]
    deflated = ts == DEFLATED
    if deflated:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    hits = 0
    patched = bytearray(body)
    for value_length in {len(old), len(old) + 1}:
        for header in _element_patterns(ts, value_length):
            pos = patched.find(header)
            while pos >= 0:
                start = pos + len(header)
                value = bytes(patched[start : start + value_length])
                if value.rstrip(b"\0 ").decode("ascii", "replace") == old:
                    patched[start : start + len(old)] = new.encode()
                    hits += 1
                pos = patched.find(header, pos + 1)
    if not hits:
        raise ValueError(f"SOP Instance UID {old} not found in the dataset")
    body = bytes(patched)
    if deflated:
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
        # PS3.5 A.5: an odd deflated stream gets a trailing null, as the original
        # had one if it was even (pydicom's image_dfl.dcm is odd: kept odd).
        if len(body) % 2 and not (len(raw) - offset) % 2:
            body += b"\0"
    return _meta_with_uid(raw[:offset], new) + body, new


def _meta_with_uid(meta: bytes, uid: str) -> bytes:
    """The preamble and file meta with (0002,0003) set to `uid`."""
    value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
    out, pos, delta = bytearray(meta[:132]), 132, 0
    while pos + 8 <= len(meta):
        elem = struct.unpack_from("<H", meta, pos + 2)[0]
        vr = meta[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", meta, pos + 8)
            end = pos + 12 + length
        else:
            (length,) = struct.unpack_from("<H", meta, pos + 6)
            end = pos + 8 + length
        if elem == 0x0003:
            out += meta[pos : pos + 6] + struct.pack("<H", len(value)) + value
            delta = len(value) - length
        else:
            out += meta[pos:end]
        pos = end
    if delta and struct.unpack_from("<HH", out, 132) == (2, 0):
        (group_length,) = struct.unpack_from("<I", out, 140)
        struct.pack_into("<I", out, 140, group_length + delta)
    return bytes(out)


# -- crafted files ---------------------------------------------------------------------


def _explicit_le(
    tag: int, vr: bytes, value: bytes, *, undefined: bool = False
) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        length = 0xFFFFFFFF if undefined else len(value)
        return head + b"\0\0" + struct.pack("<I", length) + value
    return head + struct.pack("<H", len(value)) + value


def _implicit_le(tag: int, value: bytes, *, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, n) + value


ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF


def un_private_sequence() -> bytes:
    """A private sequence relayed as UN of undefined length: two items (one of
    undefined, one of defined length), Implicit VR inside. Block 0x12 of group 0009
    (CT_small already uses block 0x10): its creator is `UN_CREATOR`."""
    creator = b"COURIER TEST"
    first = (
        _implicit_le(0x00080100, b"12345 ")
        + _implicit_le(0x00090012, creator)
        + _implicit_le(0x00091202, b"relayed by a gateway")
    )
    second = _implicit_le(0x00090012, creator) + _implicit_le(0x00091203, b"\x01\0")
    content = (
        _implicit_le(ITEM, b"", length=UNDEFINED)
        + first
        + _implicit_le(ITEM_END, b"")
        + _implicit_le(ITEM, second)
        + _implicit_le(SEQ_END, b"")
    )
    return _explicit_le(0x00091201, b"UN", content, undefined=True)


UN_CREATOR = _explicit_le(0x00090012, b"LO", b"COURIER TEST")


def insert_elements(raw: bytes, tag: int, encoded: bytes) -> bytes:
    """`raw` (Explicit VR Little Endian) with `encoded` inserted before the first
    top-level element whose tag is above `tag`."""
    offset, ts = dataset_start(raw)
    assert ts == "1.2.840.10008.1.2.1", ts
    body = raw[offset:]
    for elem_tag, start, _end in walk(body, implicit=False, little=True):
        if elem_tag > tag:
            return raw[: offset + start] + encoded + body[start:]
    return raw + encoded


def swap_first_two(raw: bytes, tag: int) -> bytes:
    """`raw` with the top-level element `tag` and the one after it swapped (tag
    order broken, as some modalities write it)."""
    offset, _ts = dataset_start(raw)
    body = raw[offset:]
    elements = walk(body, implicit=False, little=True)
    for i, (elem_tag, start, end) in enumerate(elements):
        if elem_tag == tag:
            _, _, after_end = elements[i + 1]
            swapped = body[end:after_end] + body[start:end]
            return raw[: offset + start] + swapped + body[after_end:]
    raise ValueError(f"no element {tag:08X}")


def minimal_pdf() -> bytes:
    """A one-page PDF with a line of text (hand-written, valid cross references)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 100] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        None,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    text = b"BT /F1 18 Tf 20 40 Td (Courier corpus report) Tj ET"
    objects[3] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def comprehensive_sr(path: Path) -> None:
    """A small Comprehensive SR: a container with text, code and numeric items."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    def item(value_type: str, name: Dataset, **values) -> Dataset:
        d = Dataset()
        d.RelationshipType = "CONTAINS"
        d.ValueType = value_type
        d.ConceptNameCodeSequence = Sequence([name])
        for key, value in values.items():
            setattr(d, key, value)
        return d

    measured = Dataset()
    measured.NumericValue = "42.5"
    measured.MeasurementUnitsCodeSequence = Sequence([code("mm", "UCUM", "mm")])
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "SR", "Corpus^Report", "CORPUS-SR"
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = (
        "20240101", "120000", "20240101", "120000",
    )  # fmt: skip
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, 1, "Courier tests"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([code("18748-4", "LN", "Diagnostic report")])
    ds.ContentTemplateSequence = Sequence()
    ds.ContentSequence = Sequence(
        [
            item("TEXT", code("121071", "DCM", "Finding"), TextValue="No change."),
            item(
                "CODE",
                code("121071", "DCM", "Finding"),
                ConceptCodeSequence=Sequence([code("17621005", "SCT", "Normal")]),
            ),
            item(
                "NUM",
                code("121206", "DCM", "Distance"),
                MeasuredValueSequence=Sequence([measured]),
            ),
        ]
    )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _dcmtk(*args: str) -> None:
    done = subprocess.run(
        list(args), env=DCMTK_ENV, capture_output=True, text=True, timeout=60
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stdout}{done.stderr}")


def make_extras(folder: Path) -> list[tuple[str, Path]]:
    """Write the crafted files into `folder`; return (name, path) of each."""
    folder.mkdir(parents=True, exist_ok=True)
    tf = PYDICOM_DATA / "test_files"
    ct, mr = tf / "CT_small.dcm", tf / "MR_small.dcm"
    made: list[tuple[str, Path]] = []

    def add(name: str) -> Path:
        path = folder / name
        made.append((f"extra/{name}", path))
        return path

    _dcmtk("/usr/bin/dcmconv", "+tb", str(ct), str(add("ct_big_endian.dcm")))
    _dcmtk("/usr/bin/dcmconv", "+td", str(mr), str(add("mr_deflated.dcm")))
    pdf = folder / "report.pdf.src"
    pdf.write_bytes(minimal_pdf())
    _dcmtk("/usr/bin/pdf2dcm", "+pn", "Corpus^Pdf", "+pi", "CORPUS-PDF",
           str(pdf), str(add("encapsulated_pdf.dcm")))  # fmt: skip
    pdf.unlink()
    comprehensive_sr(add("comprehensive_sr.dcm"))
    raw = ct.read_bytes()
    relayed = insert_elements(raw, 0x00090012, UN_CREATOR)
    relayed = insert_elements(relayed, 0x00091201, un_private_sequence())
    add("ct_un_private_sequence.dcm").write_bytes(relayed)
    odd = _explicit_le(0x00104000, b"LT", b"odd")  # Patient Comments, 3 bytes
    add("ct_odd_length_value.dcm").write_bytes(insert_elements(raw, 0x00104000, odd))
    add("ct_truncated.dcm").write_bytes(raw[:-1000])
    add("ct_out_of_order.dcm").write_bytes(swap_first_two(raw, 0x00080020))
    # pydicom's JPEG-LS lossy files have no Series Instance UID (so no series to
    # send them in): the same pixel data with one.
    from pydicom.uid import generate_uid

    for name in ("JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm",
                 "SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(tf / name)
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.save_as(add(f"with_series_{name}"), enforce_file_format=True)
    return made


def build_corpus(folder: Path, from_sources: list[Source]) -> list[CorpusFile]:
    """Every file of `from_sources` (see `sources`), each with a fresh SOP Instance
    UID, as flat files in `folder` (names: the source path with "/" as "__")."""
    folder.mkdir(parents=True)
    out = []
    for src in from_sources:
        raw, uid = with_fresh_uid(src.path.read_bytes(), src.sop_instance_uid)
        path = folder / src.name.replace("/", "__")
        path.write_bytes(raw)
        truncated, misencoded = structure(raw)
        out.append(
            CorpusFile(
                name=src.name,
                path=path,
                sop_instance_uid=uid,
                # Only the SOP Instance UID differs from the source's.
                sop_class_uid=src.sop_class_uid,
                transfer_syntax=src.transfer_syntax,
                broken=truncated,
                note=misencoded,
            )
        )
    return out
