"""A series on disk: the DICOM files of a folder, with the few tags sending needs."""

from __future__ import annotations

import fnmatch
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from targets.dicomnet import load_pydicom
from targets.dicomnet.check import CorruptDataset, FileHeader, NotPart10, read_file
from targets.paths import clean_part, plain_name, uid_part

# Read once per file; enough for presentation contexts, layouts and routing.
HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "InstanceNumber",
    "Modality",
    "BodyPartExamined",
]
# Their tags, so that the header is read without pydicom's dictionary (pydicom, with
# numpy, costs a quarter of a second to import; tests/targets/test_series.py checks
# this table against it).
HEADER_TAG_NUMBERS = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "PatientID": 0x00100020,
    "PatientName": 0x00100010,
    "AccessionNumber": 0x00080050,
    "StudyDate": 0x00080020,
    "StudyTime": 0x00080030,
    "StudyDescription": 0x00081030,
    "SeriesDescription": 0x0008103E,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "Modality": 0x00080060,
    "BodyPartExamined": 0x00180015,
}
_CHARSET = 0x00080005
_READ = frozenset((*HEADER_TAG_NUMBERS.values(), _CHARSET))
# Character sets decoded here; any other (ISO 2022 escapes, GB18030, ...) is left
# to pydicom.
_ENCODINGS = {
    b"": "ascii",
    b"ISO_IR 6": "ascii",
    b"ISO_IR 100": "latin-1",
    b"ISO_IR 192": "utf-8",
}
_MEDIA_SOP_CLASS, _MEDIA_SOP_INSTANCE = 0x00020002, 0x00020003


@dataclass
class Instance:
    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def study_uid(self) -> str:
        return self.tags.get("StudyInstanceUID", "")

    @property
    def series_uid(self) -> str:
        return self.tags.get("SeriesInstanceUID", "")


@dataclass
class OtherFile:
    """A file of the series folder that is not DICOM: a report, a preview, results.

    Folder, SFTP, rsync and S3 targets deliver these beside the instances; the DICOM
    kinds leave them out. It looks like an instance to outcome reporting (no SOP
    Instance UID).
    """

    path: Path
    size: int
    # Why it is not an instance, e.g. "not DICOM (File is missing DICOM File Meta
    # Information header ...)", for the summaries of kinds that leave it out.
    reason: str
    sop_instance_uid: str = ""


@dataclass
class Series:
    """The files of a series folder: DICOM instances, other files, unreadable ones."""

    root: Path
    instances: list[Instance] = field(default_factory=list)
    # Readable files that are not DICOM.
    others: list[OtherFile] = field(default_factory=list)
    # Files that could not be read at all, with the reason.
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # DICOM files that fail the structural check (truncated, corrupt), with the
    # reason: never sent anywhere, in any form.
    corrupt: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def relative(self, path: Path) -> str:
        """The file's path under the series folder (its name if it is elsewhere)."""
        if path.is_relative_to(self.root):
            return path.relative_to(self.root).as_posix()
        return path.name

    def excluding(self, globs: Iterable[str]) -> Series:
        """Return the series without files whose name or relative path matches a glob."""
        globs = list(globs)
        if not globs:
            return self

        def kept(path: Path) -> bool:
            rel = self.relative(path)
            return not any(
                fnmatch.fnmatch(path.name, g) or fnmatch.fnmatch(rel, g) for g in globs
            )

        return Series(
            root=self.root,
            instances=[i for i in self.instances if kept(i.path)],
            others=[o for o in self.others if kept(o.path)],
            skipped=list(self.skipped),
            corrupt=[(p, why) for p, why in self.corrupt if kept(p)],
        )

    def rebased(self, root: Path) -> Series:
        """The same series as read from a copy of its folder at `root`."""

        def moved(path: Path) -> Path:
            return root / path.relative_to(self.root)

        return Series(
            root=root,
            instances=[replace(i, path=moved(i.path)) for i in self.instances],
            others=[replace(o, path=moved(o.path)) for o in self.others],
            skipped=[(moved(p), why) for p, why in self.skipped],
            corrupt=[(moved(p), why) for p, why in self.corrupt],
        )

    def only(self, paths: Iterable[str | Path]) -> Series:
        """Return the series restricted to the given file paths (for a retry)."""
        wanted = {str(p) for p in paths}
        return Series(
            root=self.root,
            instances=[i for i in self.instances if str(i.path) in wanted],
            others=[o for o in self.others if str(o.path) in wanted],
            skipped=list(self.skipped),
            corrupt=list(self.corrupt),
        )


class NoInstance(ValueError):
    """A DICOM file without a SOP Class UID or SOP Instance UID: not an instance."""


def _text(raw: bytes, encoding: str) -> str:
    return raw.decode(encoding).strip("\0 ")


def _from_header(path: Path, head: FileHeader) -> Instance | None:
    """The instance from what `read_file` kept; None if pydicom must decode the
    text (a character set other than ASCII, Latin-1 or UTF-8)."""
    values, meta = head.values, head.meta
    charset = values.get(_CHARSET, b"").strip(b"\0 ")
    encoding = _ENCODINGS.get(charset)
    if encoding is None:
        return None
    tags = {}
    try:
        for keyword, tag in HEADER_TAG_NUMBERS.items():
            raw = values.get(tag)
            if raw:
                text = _text(raw, encoding)
                if text:
                    tags[keyword] = text
        sop_class = tags.get("SOPClassUID") or _text(
            meta.get(_MEDIA_SOP_CLASS, b""), "ascii"
        )
        sop_instance = tags.get("SOPInstanceUID") or _text(
            meta.get(_MEDIA_SOP_INSTANCE, b""), "ascii"
        )
    except UnicodeDecodeError:
        return None  # not what its character set says: pydicom judges it
    if not sop_class or not sop_instance:
        raise NoInstance("no SOP Class UID or SOP Instance UID")
    return Instance(
        path=path,
        size=head.size,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=head.transfer_syntax,
        tags=tags,
    )


def read_instance(path: Path) -> Instance:
    """Read the header of one DICOM file with pydicom; raise `InvalidDicomError` if
    it is not one (what `scan_paths` falls back to)."""
    # Imported here: this module loads with the admin at every django.setup(), and
    # pydicom (numpy with it) costs most of a second to processes that read no DICOM.
    import pydicom
    from pydicom.errors import InvalidDicomError

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    meta = getattr(ds, "file_meta", None)
    sop_class = str(
        ds.get("SOPClassUID", "")
        or (meta and meta.get("MediaStorageSOPClassUID", ""))
        or ""
    )
    sop_instance = str(
        ds.get("SOPInstanceUID", "")
        or (meta and meta.get("MediaStorageSOPInstanceUID", ""))
        or ""
    )
    if not sop_class or not sop_instance:
        raise InvalidDicomError("no SOP Class UID or SOP Instance UID")
    ts = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    tags = {}
    for keyword in HEADER_TAGS:
        value = ds.get(keyword)
        if value is not None and value != "":
            tags[keyword] = str(value)
    return Instance(
        path=path,
        size=path.stat().st_size,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        transfer_syntax=ts or "1.2.840.10008.1.2",
        tags=tags,
    )


# The element walker and pydicom recurse once per sequence level: a file nested
# deeper than Python's recursion limit (valid DICOM; dcmtk reads it) cannot be
# checked here, so it is never sent, and says why, instead of ending the scan.
TOO_DEEP = (
    "corrupt DICOM (its sequences nest too deeply to be checked: hundreds of levels)"
)


def scan_folder(folder: str | Path) -> Series:
    """Collect every file under `folder`, recursively, in a stable order.

    DICOM files become instances (headers read), other files `others`, and files
    that cannot be read `skipped` with the reason; none of it is fatal. A DICOM file
    whose header reads but whose data does not walk to its end (a truncated copy,
    say) is listed in `corrupt`: it must never reach a target, in any form (not as an
    other file either), nor replace a good copy there.
    """
    root = Path(folder).resolve()
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            paths.append(Path(dirpath) / name)
    return scan_paths(root, paths)


def scan_paths(root: Path, paths: Iterable[Path]) -> Series:
    """Read the given files of the series folder `root` as `scan_folder` does.

    One pass per file checks its structure and keeps the header tags
    (`targets.dicomnet.check.read_file`); pydicom reads only what that pass cannot
    judge alone (a damaged file, an unusual character set).
    """
    series = Series(root=root)
    for path in paths:
        try:
            head = read_file(path, _READ, ordered=False)  # send re-encodes those
        except NotPart10 as exc:
            # Not a Part 10 file, as pydicom sees it too (it refuses a file without
            # the DICM prefix): an other file.
            series.others.append(
                OtherFile(path=path, size=_size(path), reason=f"not DICOM ({exc})")
            )
            continue
        except CorruptDataset:
            _scan_slowly(series, path)  # corrupt, or not DICOM at all: pydicom says
            continue
        except RecursionError:
            series.corrupt.append((path, TOO_DEEP))
            continue
        except OSError as exc:
            series.skipped.append((path, f"unreadable ({exc.strerror or exc})"))
            continue
        try:
            instance = _from_header(path, head)
        except NoInstance as exc:
            series.others.append(
                OtherFile(path=path, size=head.size, reason=f"not DICOM ({exc})")
            )
            continue
        if instance is None:
            _scan_slowly(series, path)
        else:
            series.instances.append(instance)
    return series


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _scan_slowly(series: Series, path: Path) -> None:
    """Read one file with pydicom, then check it (files the fast pass cannot judge)."""
    load_pydicom()  # the package first: threads may scan at once (load_pydicom)
    from pydicom.errors import InvalidDicomError

    try:
        instance = read_instance(path)
        read_file(path, (), ordered=False)
        series.instances.append(instance)
    except CorruptDataset as exc:
        series.corrupt.append((path, f"corrupt DICOM ({exc})"))
    except struct.error as exc:
        # pydicom ran out of bytes inside an element's header: a DICOM file cut
        # short (the fast pass had found it corrupt already).
        series.corrupt.append((path, f"corrupt DICOM (truncated element: {exc})"))
    except RecursionError:
        series.corrupt.append((path, TOO_DEEP))
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        try:
            size = path.stat().st_size
        except OSError as err:
            series.skipped.append((path, f"unreadable ({err.strerror or err})"))
            return
        reason = f"not DICOM ({exc})" if str(exc) else "not DICOM"
        series.others.append(OtherFile(path=path, size=size, reason=reason))
    except OSError as exc:
        series.skipped.append((path, f"unreadable ({exc.strerror or exc})"))


# The one path-cleaning rule (targets/paths.py), under the name its callers know.
safe_path_part = clean_part


def instance_file_name(instance: Instance) -> str:
    """`<SOP Instance UID>.dcm`, one plain file name whatever the UID holds: the
    name an instance gets in a target's folder."""
    return plain_name(uid_part(instance.sop_instance_uid) + ".dcm")


DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}"


class LayoutError(ValueError):
    pass


def layout_error(template: str) -> str | None:
    """Return why a layout template cannot be used, or None if it can."""
    keywords = re.findall(r"\{(\w+)\}", template)
    rest = re.sub(r"\{\w+\}", "", template)
    if "{" in rest or "}" in rest:
        return (
            "Put each DICOM keyword in braces, e.g. "
            "{StudyInstanceUID}/{SeriesInstanceUID}."
        )
    unknown = [k for k in keywords if k not in HEADER_TAGS]
    if unknown:
        return f"Unknown layout tag {unknown[0]}: use one of {', '.join(HEADER_TAGS)}."
    if any(part.strip() in (".", "..") for part in template.split("/")):
        return "A layout cannot contain . or .. folders."
    return None


def render_layout(template: str, tags: dict[str, str]) -> str:
    """Fill a layout like `{StudyInstanceUID}/{SeriesInstanceUID}` from tags.

    Each filled value is sanitised into one path part; a missing tag is an error
    naming it.
    """

    def fill(match: re.Match) -> str:
        keyword = match.group(1)
        value = tags.get(keyword, "")
        if value == "":
            raise LayoutError(
                f"the series has no {keyword} for the layout {template!r}"
            )
        return safe_path_part(value)

    parts = [p for p in template.strip("/").split("/") if p]
    rendered = [re.sub(r"\{(\w+)\}", fill, part) for part in parts]
    rendered = [safe_path_part(p) if p in (".", "..") else p for p in rendered]
    return "/".join(rendered)
