"""The receiver's files: what it writes to the spool, and how it checks a dataset.

A received dataset is stored behind a file meta header made here from the C-STORE
request (`file_meta_bytes`), written durably (`write_durably`: fsynced file and
folder), named after its SOP Instance UID (`instance_file_name`), and checked whole
from the stored file (`check_stored`) before it is acknowledged.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import tempfile
import threading
import zlib
from pathlib import Path

from targets.dicomnet.check import DEFLATED, CorruptDataset, walk_dataset
from targets.dicomnet.identity import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
)
from targets.dicomnet.vr import LONG_VRS
from targets.paths import fsync_dir
from targets.series import safe_path_part

_VALID_UID = re.compile(r"[0-9.]{1,64}")
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class TooLarge(ValueError):
    """The dataset is larger than the receiver takes (deflated: once inflated)."""


def check_stored(
    path: str | Path, offset: int, transfer_syntax: str, *, max_inflated: int
) -> dict[str, str]:
    """The receiver's walk (`walk_dataset`, elements in any order) of the dataset
    stored in `path` from byte `offset`; return its UIDs.

    The file is mapped, not read: the walk touches the element headers only, so
    memory does not grow with the instance. A deflated dataset is inflated into a
    temporary file beside it first, at most `max_inflated` bytes (`TooLarge`).
    """
    with open(path, "rb") as f:
        if transfer_syntax != DEFLATED:
            return _check_mapped(f, offset, transfer_syntax)
        with tempfile.TemporaryFile(dir=os.path.dirname(path)) as out:
            _inflate(f, offset, out, max_inflated)
            # Deflated is explicit VR little endian once inflated.
            return _check_mapped(out, 0, EXPLICIT_LE)


def _inflate(src, offset: int, out, limit: int) -> None:
    src.seek(offset)
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        while chunk := src.read(1 << 20):
            while chunk:
                data = inflater.decompress(chunk, 4 << 20)
                chunk = inflater.unconsumed_tail
                total += len(data)
                if total > limit:
                    raise TooLarge(f"inflates to more than {limit} bytes")
                out.write(data)
        out.write(inflater.flush())
    except zlib.error as exc:
        raise CorruptDataset(f"deflated data does not inflate: {exc}") from None
    out.flush()


def _check_mapped(f, offset: int, transfer_syntax: str) -> dict[str, str]:
    if os.fstat(f.fileno()).st_size <= offset:
        raise CorruptDataset("empty dataset")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return walk_dataset(mapped, transfer_syntax, offset, ordered=False)


def instance_file_name(sop_uid: str) -> str:
    """The spool file name of an instance: the UID itself when it is a valid UID.

    Anything else (letters, separators, over 64 characters) is cleaned and given a
    hash of the whole UID, so two distinct UIDs that clean alike never share a file
    (the `_` before the hash never occurs in a valid UID's name).
    """
    if _VALID_UID.fullmatch(sop_uid):
        return f"{sop_uid}.dcm"
    digest = hashlib.sha256(sop_uid.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{safe_path_part(sop_uid)[:64]}_{digest[:20]}.dcm"


def unprintable(value: str) -> bool:
    """True if `value` has control or non-ASCII characters (no UID or AE title may)."""
    # For ASCII, printable is exactly " " to "~".
    return not (value.isascii() and value.isprintable())


# -- file meta -------------------------------------------------------------------------


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr in LONG_VRS:
        return tag + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta_bytes(
    sop_class: str, sop_instance: str, transfer_syntax: str, source_aet: str
) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received dataset.

    Encoded directly: pydicom's writer costs about a millisecond per instance, a
    noticeable share of the receiver's time per C-STORE.
    """
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _uid(sop_class)),
            _element(0x00020003, b"UI", _uid(sop_instance)),
            _element(0x00020010, b"UI", _uid(transfer_syntax)),
            _element(0x00020012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x00020013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
            _element(0x00020016, b"AE", _text(source_aet)) if source_aet else b"",
        )
    )
    group_length = _element(0x00020000, b"UL", struct.pack("<L", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def write_all(fd: int, *parts: bytes | memoryview) -> None:
    """Write `parts` in one `writev`, finishing a short write piece by piece."""
    written = os.writev(fd, parts)
    for part in parts:
        view = memoryview(part)[written:]
        written = max(0, written - len(part))
        while view:
            view = view[os.write(fd, view) :]


def write_durably(path: Path, *parts: bytes) -> None:
    """Write `parts` to `path` atomically (replacing any file there), fsynced."""
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        write_all(fd, *parts)
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
