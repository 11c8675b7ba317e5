"""The structural check of an encoded DICOM dataset, and of a DICOM file.

pydicom decodes leniently (a truncated value is silently shortened, garbage becomes a
few UN elements), so "pydicom reads its header" does not mean "the file is whole". The
walk here is strict and cheap (element headers only): the receiver runs it on every
dataset before acknowledging it, and `targets.series` on every file before it is sent
anywhere, so a truncated or corrupt file is never delivered nor replaces a good copy.
It is Courier's one element walker: the folder index reads its headers with it too
(`read_file`), so what the index lists is what Courier can send.
Protocol code: no models, no settings.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from targets.dicomnet.vr import ALL_VRS, LONG_VRS

# Why this module is long: it is the one element walker (issue 13): the encoded
# dataset's walk, the file meta, the Part 10 file's walk with its memo, and the
# header reads the scan, the index and the commitment SCP take from the same walk.
# Split, the readers would drift apart again, as the three walkers before it did.

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

# Tags read from the raw bytes of every instance (top level only).
TAG_SOP_CLASS = 0x00080016
TAG_SOP_INSTANCE = 0x00080018
TAG_STUDY_UID = 0x0020000D
TAG_SERIES_UID = 0x0020000E
_CAPTURED = (TAG_SOP_CLASS, TAG_SOP_INSTANCE, TAG_STUDY_UID, TAG_SERIES_UID)

_UNDEFINED = 0xFFFFFFFF
# An explicit VR element's header size by its VR (PS3.5 7.1.2).
_HEAD_SIZES = {vr: 12 if vr in LONG_VRS else 8 for vr in ALL_VRS}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Undefined-length sequences walked inside one another, at most: the walk recurses
# once per level (Python's stack ends near 500). Real data nests a handful of levels;
# dcmtk has no limit, but a file beyond this one is refused in words.
MAX_DEPTH = 200


def _structs(little: bool, implicit: bool) -> tuple[struct.Struct, ...]:
    e = "<" if little else ">"
    # One unpack per element header: tag, then the VR and a 2-byte length
    # (explicit VR) or a 4-byte length (implicit VR).
    header = struct.Struct(e + ("HHL" if implicit else "HH2sH"))
    return struct.Struct(e + "HH"), struct.Struct(e + "L"), header


# Made once: a walk per file of a folder index is worth a few microseconds.
_STRUCTS = {(le, im): _structs(le, im) for le in (True, False) for im in (True, False)}


class CorruptDataset(ValueError):
    """The encoded dataset cannot be walked to its end (truncated or not DICOM)."""


# -- structural check of the encoded dataset ---------------------------------------


class _Walker:
    """Walk an encoded dataset's elements, checking every length fits.

    pydicom decodes leniently (a truncated value is silently shortened, garbage becomes
    a few UN elements), so it cannot tell a corrupt dataset from a good one. This walk
    is cheap (headers only, values are skipped) and strict: ascending tags at each
    level (unless `ordered` is False), known VRs, every length inside the buffer,
    every undefined-length sequence closed.

    `ordered=False` is the receiver's walk: like dcmtk's storescp and pydicom it
    takes elements out of order and repeated ones (the bytes are stored as they
    came), as long as a repeated top-level UID does not change its value.

    What is wrong but repairable by re-encoding is recorded, not raised: the first
    element with an odd value length (`odd`, PS3.5 7.1.1; `odd_nested` if inside a
    sequence) and, when `ordered` is False, the first element out of order
    (`unordered`).
    """

    # Where the data ends, in messages: "data" (a received dataset) or "file".
    what = "data"

    def __init__(
        self,
        buf: bytes,
        implicit: bool,
        little: bool,
        ordered: bool = True,
        capture: frozenset[int] | tuple[int, ...] = _CAPTURED,
    ):
        self.buf = buf
        self.implicit = implicit
        self.ordered = ordered
        self.capture = capture
        self.odd: int | None = None
        self.odd_nested = False
        self.unordered: int | None = None
        self.tag, self.u32, self.header = _STRUCTS[little, implicit]
        self.captured: dict[int, bytes] = {}
        self.depth = 0

    def implicit_walker(self) -> _Walker:
        inner = _Walker(self.buf, implicit=True, little=True, ordered=self.ordered)
        inner.what, inner.depth = self.what, self.depth
        return inner

    def _merge(self, inner: _Walker) -> None:
        if self.odd is None and inner.odd is not None:
            self.odd, self.odd_nested = inner.odd, True
        if self.unordered is None:
            self.unordered = inner.unordered

    def _read_tag(self, pos: int, end: int) -> tuple[int, int]:
        if pos + 8 > end:
            raise CorruptDataset(f"truncated element header at byte {pos}")
        group, elem = self.tag.unpack_from(self.buf, pos)
        return (group << 16) | elem, pos

    def dataset(self, pos: int, end: int, *, top: bool, in_item: bool) -> int:
        """Walk a dataset from `pos`; return the position after it.

        `in_item`: the dataset is an undefined-length item ending with an item
        delimiter rather than at `end`.
        """
        # The loop runs once per element (hundreds per instance): locals only.
        buf, last, implicit, ordered = self.buf, -1, self.implicit, self.ordered
        header, u32 = self.header.unpack_from, self.u32.unpack_from
        head_sizes, undefined = _HEAD_SIZES, _UNDEFINED
        captured = self.captured
        capture = self.capture if top else ()
        while pos < end:
            if pos + 8 > end:
                raise CorruptDataset(f"truncated element header at byte {pos}")
            if implicit:
                group, elem, length = header(buf, pos)
                pos += 8
            else:
                group, elem, vr, length = header(buf, pos)
                size = head_sizes.get(vr)
                if size == 8:
                    pos += 8
                elif size == 12:
                    if pos + 12 > end:
                        raise CorruptDataset(f"truncated element header at byte {pos}")
                    length = u32(buf, pos + 8)[0]
                    pos += 12
                elif group == 0xFFFE:
                    pos += 8
                else:
                    raise CorruptDataset(f"unknown VR {vr!r} at byte {pos + 4}")
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if in_item and tag == _ITEM_END:
                    return pos
                raise CorruptDataset(
                    f"unexpected delimiter {tag:08X} at byte {pos - 8}"
                )
            if tag <= last:
                if ordered:
                    raise CorruptDataset(f"tags out of order at byte {pos} ({tag:08X})")
                if self.unordered is None:
                    self.unordered = tag
            last = tag
            if length == undefined:
                if not implicit and vr == b"UN":
                    # PS3.5 6.2.2: a UN value of undefined length is a sequence
                    # encoded in Implicit VR Little Endian.
                    inner = self.implicit_walker()
                    pos = inner.items(pos, end)
                    self._merge(inner)
                else:
                    pos = self.items(pos, end)
                continue
            if pos + length > end:
                raise CorruptDataset(
                    f"element ({group:04X},{elem:04X}) runs past the end "
                    f"of the {self.what} ({length} bytes at byte {pos} of {end})"
                )
            if length & 1 and self.odd is None:
                self.odd, self.odd_nested = tag, not top
            if tag in capture:
                value = buf[pos : pos + length]
                if tag in _CAPTURED and captured.get(tag, value) != value:
                    raise CorruptDataset(
                        f"element ({group:04X},{elem:04X}) appears twice with "
                        "different values"
                    )
                captured[tag] = value
            pos += length
        if in_item:
            raise CorruptDataset("item without its delimiter at the end of the data")
        return pos

    def items(self, pos: int, end: int) -> int:
        """Walk an undefined-length value: items up to the sequence delimiter."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CorruptDataset(f"sequences nest more than {MAX_DEPTH} levels deep")
        while True:
            tag, _ = self._read_tag(pos, end)
            length = self.u32.unpack_from(self.buf, pos + 4)[0]
            pos += 8
            if tag == _SEQ_END:
                self.depth -= 1
                return pos
            if tag != _ITEM:
                raise CorruptDataset(f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.dataset(pos, end, top=False, in_item=True)
            elif pos + length > end:
                raise CorruptDataset(
                    f"item runs past the end of the data at byte {pos}"
                )
            else:
                pos += length


def walk_dataset(
    raw: bytes | mmap.mmap,
    transfer_syntax: str,
    start: int = 0,
    *,
    ordered: bool = True,
) -> dict[str, str]:
    """Walk an encoded dataset (from `start`) to its end; return the UIDs it holds
    ("" for a missing one). Raise `CorruptDataset` if it is truncated or not DICOM.

    `ordered=False`: elements out of order or repeated are accepted (see `_Walker`).
    """
    return walk_encoded(raw, transfer_syntax, start, ordered=ordered)[0]


def walk_encoded(
    raw: bytes | mmap.mmap,
    transfer_syntax: str,
    start: int = 0,
    *,
    ordered: bool = True,
    what: str = "data",
) -> tuple[dict[str, str], _Walker]:
    """`walk_dataset`, also returning the walker (what it found to repair)."""
    walker = _walk(raw, transfer_syntax, start, _CAPTURED, ordered=ordered, what=what)
    return _uids(walker.captured), walker


def _uids(captured: dict[int, bytes]) -> dict[str, str]:
    def uid(tag: int) -> str:
        value = captured.get(tag, b"")
        return value.rstrip(b"\x00 ").decode("ascii", "replace")

    return {
        "SOPClassUID": uid(TAG_SOP_CLASS),
        "SOPInstanceUID": uid(TAG_SOP_INSTANCE),
        "StudyInstanceUID": uid(TAG_STUDY_UID),
        "SeriesInstanceUID": uid(TAG_SERIES_UID),
    }


def _walk(
    raw: bytes | mmap.mmap,
    transfer_syntax: str,
    start: int,
    capture: frozenset[int] | tuple[int, ...],
    *,
    ordered: bool = True,
    what: str = "data",
) -> _Walker:
    """Walk the dataset to its end; return the walker, holding the raw values of
    the top-level `capture` tags found (`captured`) and what it found to repair."""
    if transfer_syntax == DEFLATED:
        try:
            raw = zlib.decompress(raw[start:], -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise CorruptDataset(f"deflated data does not inflate: {exc}") from None
        start = 0
        implicit, little = False, True
    else:
        implicit = transfer_syntax == IMPLICIT_LE
        little = transfer_syntax != EXPLICIT_BE
    if len(raw) <= start:
        raise CorruptDataset("empty dataset")
    walker = _Walker(raw, implicit, little, ordered, capture)
    walker.what = what
    try:
        walker.dataset(start, len(raw), top=True, in_item=False)
    except struct.error as exc:  # a header cut short inside a long-VR element
        raise CorruptDataset(f"truncated data ({exc})") from None
    return walker


def check_dataset(
    raw: bytes | bytearray | mmap.mmap, transfer_syntax: str, start: int = 0
) -> dict[str, str]:
    """Check an encoded dataset (from `start`) end to end; return its
    SOP/Study/Series UIDs.

    Raise `CorruptDataset` if it is truncated, not DICOM, or lacks the UIDs
    Courier needs to file it.
    """
    found = walk_dataset(raw, transfer_syntax, start)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        if not found[keyword]:
            raise CorruptDataset(f"the dataset has no {keyword}")
    return found


_META_TS = 0x00020010


def _file_meta(
    buf: bytes | mmap.mmap, values: dict[int, bytes] | None = None
) -> tuple[int, str]:
    """Walk the file meta group after the preamble; return where the dataset starts
    and its transfer syntax (and, into `values`, every meta element's raw value)."""
    end, pos, ts = len(buf), 132, ""
    while True:
        if pos + 8 > end:
            raise CorruptDataset("the file ends inside its file meta information")
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            if pos + 12 > end:
                raise CorruptDataset("the file ends inside its file meta information")
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            pos += 12
        elif vr in ALL_VRS:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            pos += 8
        else:
            raise CorruptDataset(f"unknown VR {vr!r} in the file meta information")
        if pos + length > end:
            raise CorruptDataset("the file ends inside its file meta information")
        if values is not None:
            values[(group << 16) | elem] = bytes(buf[pos : pos + length])
        if (group << 16) | elem == _META_TS:
            ts = (
                bytes(buf[pos : pos + length])
                .rstrip(b"\x00 ")
                .decode("ascii", "replace")
            )
        pos += length
    if not ts:
        raise CorruptDataset("the file meta information has no transfer syntax")
    return pos, ts


def read_file_meta(path: str | Path) -> dict[int, bytes]:
    """The file meta elements of a Part 10 file by tag (raw values), without walking
    its dataset: for a file Courier checked when it took it, e.g. in its own spool.

    Raise `NotPart10`, `CorruptDataset` or `OSError`.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
        if len(head) < 132 or head[128:132] != b"DICM":
            raise NotPart10("no DICM prefix after the preamble")
        while True:
            values: dict[int, bytes] = {}
            try:
                _file_meta(head, values)
                return values
            except CorruptDataset:
                more = f.read(len(head))  # a meta longer than the first read
                if not more:
                    raise
                head += more


@dataclass(frozen=True)
class FileWalk:
    """What one walk of a Part 10 file found (see `_Walker` for `odd`...)."""

    start: int  # where the dataset starts
    size: int  # the file's size
    transfer_syntax: str
    uids: dict[str, str]
    odd: int | None
    odd_nested: bool
    unordered: int | None


# Walks of whole files, by (device, inode, size, modification time, ordered): a
# series is walked when its folder is read and again just before each file is
# sent; the second walk is a stat when the file has not changed in between.
_WALKED: dict[tuple, FileWalk] = {}
_WALKED_MAX = 20000


class NotPart10(CorruptDataset):
    """The file has no DICM prefix after a 128-byte preamble (not a Part 10 file)."""


@dataclass
class FileHeader:
    """What `read_file` found: the file's size, its transfer syntax, its file meta
    elements and the top-level elements asked for (raw values)."""

    size: int
    transfer_syntax: str
    meta: dict[int, bytes]
    values: dict[int, bytes]


def walk_file(path: str | Path, *, ordered: bool = True) -> FileWalk:
    """Check a DICOM Part 10 file: preamble, file meta, and the whole dataset.

    Raise `NotPart10`, `CorruptDataset` (truncated, or not what its header says) or
    `OSError`. The file is mapped, not read: a large instance costs no memory. A
    file walked before and unchanged since (same inode, size and modification time)
    is not walked again.
    """
    found = _read(path, (), ordered, None, True)[0]
    assert found is not None
    return found


def read_file(
    path: str | Path,
    tags: frozenset[int] | tuple[int, ...],
    *,
    ordered: bool = True,
    remember: bool = True,
) -> FileHeader:
    """Check a Part 10 file as `walk_file` does, keeping the raw values of the
    top-level `tags` met on the way: one pass serves the check and the header (and
    leaves the walk for the check before sending, see `walk_file`; not with
    `remember=False`, for a file that is read, not sent: a folder index).

    Raise `NotPart10` (no preamble and DICM prefix), `CorruptDataset` or `OSError`.
    """
    # The file meta's values are kept for a file that may be sent (its header
    # gives the instance's UIDs when the dataset lacks them).
    header = _read(path, tags, ordered, {} if remember else None, remember)[1]
    assert header is not None
    return header


# Files up to this size are read, larger ones mapped (a map costs more system
# calls than reading a small file; a large instance costs no memory mapped).
_READ_MAX = 256 * 1024


def _capture(tags: frozenset[int] | tuple[int, ...]) -> frozenset[int]:
    """The tags a walk keeps: the UIDs every check needs and those asked for."""
    found = _CAPTURES.get(tags)
    if found is None:
        found = _CAPTURES[tags] = frozenset(_CAPTURED).union(tags)
    return found


_CAPTURES: dict[frozenset[int] | tuple[int, ...], frozenset[int]] = {}


def _read(
    path: str | Path,
    tags: frozenset[int] | tuple[int, ...],
    ordered: bool,
    meta: dict[int, bytes] | None,
    remember: bool,
) -> tuple[FileWalk | None, FileHeader | None]:
    """Walk the file (see `read_file`); with `remember`, return the walk too and
    keep it for `walk_file`; `meta` None: the file meta's values are not kept."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, ordered)
        known = _WALKED.get(key)
        if known is not None and meta is None and remember:
            return known, None
        size = st.st_size
        if size < 132:
            raise NotPart10("shorter than a DICOM preamble")
        capture = _capture(tags) if tags else _CAPTURED
        if size <= _READ_MAX:
            buf = f.read()
            start, ts, w = _walk_part10(buf, meta, capture, ordered)
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                start, ts, w = _walk_part10(mapped, meta, capture, ordered)
    if not remember:
        return None, FileHeader(size, ts, meta or {}, w.captured)
    uids = _uids(w.captured)
    found = FileWalk(start, size, ts, uids, w.odd, w.odd_nested, w.unordered)
    if len(_WALKED) >= _WALKED_MAX:
        try:
            del _WALKED[next(iter(_WALKED))]
        except (KeyError, StopIteration, RuntimeError):  # another thread was first
            pass
    _WALKED[key] = found
    header = None if meta is None else FileHeader(size, ts, meta, w.captured)
    return found, header


def _walk_part10(
    buf: bytes | mmap.mmap,
    meta: dict[int, bytes] | None,
    capture: frozenset[int] | tuple[int, ...],
    ordered: bool,
) -> tuple[int, str, _Walker]:
    """Walk a whole Part 10 file; return where its dataset starts, its transfer
    syntax and the walker."""
    if buf[128:132] != b"DICM":
        raise NotPart10("no DICM prefix after the preamble")
    start, ts = _file_meta(buf, meta)
    return start, ts, _walk(buf, ts, start, capture, ordered=ordered, what="file")


def check_file(path: str | Path, *, ordered: bool = True) -> None:
    """`walk_file` for its errors only."""
    walk_file(path, ordered=ordered)
