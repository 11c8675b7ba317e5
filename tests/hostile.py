"""Crafted DICOM for the path-escape tests: UIDs and tags that are paths.

Anyone who can C-STORE into a PACS (or write into a watched folder) chooses these
values; Courier must treat them as data. Each set carries a random token in its
names so a file that escaped can be found by name.
"""

from __future__ import annotations

import copy
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


@dataclass
class Crafted:
    token: str
    study_uid: str
    files: list[Path] = field(default_factory=list)
    # SOP Instance UID -> SeriesInstanceUID of every instance written.
    series_of: dict[str, str] = field(default_factory=dict)

    @property
    def absolute_escape(self) -> Path:
        """Where '../../../../tmp/courier-x<token>' leads from a shallow folder."""
        return Path(f"/tmp/courier-x{self.token}")


def _quiet_pydicom():
    # pydicom warns, rightly, about every invalid UI value written here.
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    return logger, level


def write_crafted(folder: Path, *, study_uid: str | None = None) -> Crafted:
    """Write four instances of one study with hostile values into `folder`.

    - series '../../../../tmp/courier-x<token>' with SOP Instance UIDs
      '../../courier-y<token>', '1.2/3' and '1.2_3' (the last two clean to one name)
    - series '..' with SOP Instance UID '..'
    PatientID and PatientName are '../../etc<token>' and '../..'.
    """
    token = secrets.token_hex(4)
    crafted = Crafted(token=token, study_uid=study_uid or generate_uid())
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base.StudyInstanceUID = crafted.study_uid
    base.PatientID = f"../../etc{token}"
    base.PatientName = "../.."
    plan = [
        (f"../../../../tmp/courier-x{token}", f"../../courier-y{token}"),
        (f"../../../../tmp/courier-x{token}", "1.2/3"),
        (f"../../../../tmp/courier-x{token}", "1.2_3"),
        ("..", ".."),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    logger, level = _quiet_pydicom()
    try:
        for n, (series_uid, sop_uid) in enumerate(plan):
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 1 if series_uid != ".." else 2
            ds.InstanceNumber = n + 1
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            path = folder / f"crafted{n + 1}.dcm"
            ds.save_as(path, enforce_file_format=True)
            crafted.files.append(path)
            crafted.series_of[sop_uid] = series_uid
    finally:
        logger.setLevel(level)
    return crafted


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def named_with(root: Path, token: str) -> set[Path]:
    """Every file or folder under `root` whose name carries `token`."""
    return {p for p in root.rglob(f"*{token}*")}
