"""A series on disk: the DICOM files of a folder, with the few tags sending needs."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from targets.dicomcheck import CorruptDataset, check_file
from targets.paths import clean_part

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
class Series:
    """DICOM instances to send, and what was skipped while collecting them."""

    root: Path
    instances: list[Instance] = field(default_factory=list)
    # Files that are not DICOM (or unreadable), with the reason.
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    # DICOM files that fail the structural check (truncated, corrupt), with the
    # reason: never sent anywhere, in any form.
    corrupt: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def excluding(self, globs: Iterable[str]) -> Series:
        """Return the series without files whose name or relative path matches a glob."""
        globs = list(globs)
        if not globs:
            return self
        kept = []
        for inst in self.instances:
            rel = (
                inst.path.relative_to(self.root).as_posix()
                if inst.path.is_relative_to(self.root)
                else inst.path.name
            )
            if not any(
                fnmatch.fnmatch(inst.path.name, g) or fnmatch.fnmatch(rel, g)
                for g in globs
            ):
                kept.append(inst)
        return Series(
            root=self.root,
            instances=kept,
            skipped=list(self.skipped),
            corrupt=list(self.corrupt),
        )

    def only(self, paths: Iterable[str | Path]) -> Series:
        """Return the series restricted to the given file paths (for a retry)."""
        wanted = {str(p) for p in paths}
        return Series(
            root=self.root,
            instances=[i for i in self.instances if str(i.path) in wanted],
            skipped=list(self.skipped),
            corrupt=list(self.corrupt),
        )


def read_instance(path: Path) -> Instance:
    """Read the header of one DICOM file; raise `InvalidDicomError` if it is not one."""
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


def scan_folder(folder: str | Path) -> Series:
    """Collect every DICOM file under `folder`, recursively, in a stable order.

    Files that are not DICOM are listed in `skipped` with the reason, never fatal.
    A DICOM file whose header reads but whose data does not walk to its end (a
    truncated copy, say) is listed in `corrupt`: it must never reach a target, nor
    replace a good copy there.
    """
    from pydicom.errors import InvalidDicomError

    root = Path(folder).resolve()
    series = Series(root=root)
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            paths.append(Path(dirpath) / name)
    for path in paths:
        try:
            instance = read_instance(path)
            check_file(path)
            series.instances.append(instance)
        except CorruptDataset as exc:
            series.corrupt.append((path, f"corrupt DICOM ({exc})"))
        except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
            series.skipped.append(
                (path, f"not DICOM ({exc})" if str(exc) else "not DICOM")
            )
        except OSError as exc:
            series.skipped.append((path, f"unreadable ({exc.strerror or exc})"))
    return series


# The one path-cleaning rule (targets/paths.py), under the name its callers know.
safe_path_part = clean_part


class LayoutError(ValueError):
    pass


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
