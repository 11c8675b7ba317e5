"""What Courier puts on the wire for one file: checked first, repaired if it can be.

Every dataset is walked once (element headers only, `targets.dicomnet.check`) just
before it is sent, so that no bytes that are not valid DICOM reach a peer: a peer
given a truncated dataset or an odd-length P-DATA fragment may hang the association
(Orthanc does) instead of refusing the instance. What the walk finds:

- truncated, overrunning, unknown VRs, not DICOM: the instance is refused by name with
  the reason ("element (300A,00B0) runs past the end of the file ..."), nothing sent;
- an element with an odd value length (PS3.5 7.1.1) or elements out of order: the
  dataset is re-encoded by pydicom in its own transfer syntax (odd values padded,
  elements sorted, every value and UID kept) and checked again;
- a deflated stream of odd length: one trailing null, as PS3.5 A.5 prescribes.

Protocol code: no models, no settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from targets.dicomnet.check import (
    DEFLATED,
    EXPLICIT_BE,
    IMPLICIT_LE,
    CorruptDataset,
    walk_encoded,
    walk_file,
)


class RefusedFile(Exception):
    """The file is not sent (unreadable or malformed); the association is unharmed."""


@dataclass(frozen=True)
class Outgoing:
    """The dataset to send: `length` bytes of the file from `offset`, or `data`."""

    offset: int
    length: int
    data: bytes | None = None
    # Said about the instance when it was repaired ("" if sent as it is).
    note: str = ""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def prepare(path: Path) -> Outgoing:
    """Walk `path` and return what to send; raise `RefusedFile` in words."""
    try:
        walk = walk_file(path, ordered=False)
    except CorruptDataset as exc:
        raise RefusedFile(f"malformed DICOM, not sent: {exc}") from exc
    except OSError as exc:
        raise RefusedFile(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    length = walk.size - walk.start
    if walk.odd is None and walk.unordered is None:
        if length % 2 == 0:
            return Outgoing(walk.start, length)
        if walk.transfer_syntax == DEFLATED:
            with open(path, "rb") as f:
                f.seek(walk.start)
                return Outgoing(walk.start, length + 1, f.read() + b"\x00")
    reasons = []
    if walk.odd is not None:
        reasons.append(f"element {_tag(walk.odd)} has an odd length")
    if walk.unordered is not None:
        reasons.append(f"element {_tag(walk.unordered)} is out of order")
    if not reasons:
        reasons.append("the dataset has an odd length")
    data = reencode(path, walk.transfer_syntax, deep=walk.odd_nested)
    note = "re-encoded before sending (" + "; ".join(reasons) + "), values unchanged"
    return Outgoing(0, len(data), data, note)


def reencode(path: Path, transfer_syntax: str, *, deep: bool) -> bytes:
    """The dataset of `path` written again by pydicom in its own syntax, checked."""
    import pydicom
    import pynetdicom  # noqa: F401 (each package before its submodules: load_pydicom)
    from pydicom.dataelem import RawDataElement
    from pynetdicom.dsutils import encode

    try:
        ds = pydicom.dcmread(path)
        if deep:
            for _ in ds.iterall():  # converting a raw element pads it when written
                pass
        else:
            for tag in list(ds.keys()):
                raw = ds.get_item(tag)
                if isinstance(raw, RawDataElement) and raw.length % 2:
                    ds[tag]  # noqa: B018 (converts it: written padded)
        data = encode(
            ds,
            transfer_syntax == IMPLICIT_LE,
            transfer_syntax != EXPLICIT_BE,
            transfer_syntax == DEFLATED,
        )
    except Exception as exc:  # pydicom raises many kinds for a broken file
        raise RefusedFile(f"malformed DICOM that could not be repaired: {exc}") from exc
    if data is None or len(data) % 2:
        raise RefusedFile("malformed DICOM: re-encoding it gave an odd length")
    try:
        _, walker = walk_encoded(data, transfer_syntax)
    except CorruptDataset as exc:
        raise RefusedFile(f"malformed DICOM after re-encoding: {exc}") from exc
    if walker.odd is not None and not deep:
        return reencode(path, transfer_syntax, deep=True)
    if walker.odd is not None:
        raise RefusedFile(
            f"malformed DICOM: element {_tag(walker.odd)} keeps an odd length"
        )
    return data
