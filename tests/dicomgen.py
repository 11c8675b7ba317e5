"""Generate test series from pydicom's bundled example files (never downloaded).

Each series gets fresh Study/Series UIDs and a unique SOP Instance UID per file.
Used by the tests and the bench/ scripts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


@dataclass
class GeneratedSeries:
    folder: Path
    study_uid: str
    series_uid: str
    sop_uids: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def pydicom_test_files(pattern: str = "*") -> list[Path]:
    """pydicom's bundled test files matching `pattern`, listed from disk.

    The same list as `pydicom.data.get_testdata_files(pattern)` when the optional
    pydicom-data set is not cached, without that function's attempt to download the
    set first: about 80 failed requests, 10-15 s per call, without a network."""
    from pydicom.data.data_manager import DATA_ROOT

    return sorted(p for p in Path(DATA_ROOT, "test_files").glob(pattern))


def _base(kind: str) -> Dataset:
    if kind == "ct":
        return examples.ct
    if kind == "mr":
        return examples.mr
    raise ValueError(kind)


def _tile(ds: Dataset, size: int) -> None:
    """Enlarge the pixel data to size x size by tiling (for a ~530 KB instance)."""
    import numpy as np

    arr = ds.pixel_array
    reps = (size // arr.shape[0], size // arr.shape[1])
    big = np.tile(arr, reps)
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.astype(arr.dtype).tobytes()


def make_series(
    folder: str | Path,
    count: int,
    *,
    kind: str = "ct",
    size: int | None = None,
    study_uid: str | None = None,
    patient_id: str | None = None,
    modality: str | None = None,
    tags: dict | None = None,
    prefix: str | None = None,
) -> GeneratedSeries:
    """Write `count` instances of one new series into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = copy.deepcopy(_base(kind))
    if size:
        _tile(base, size)
    base.StudyInstanceUID = study_uid or generate_uid()
    base.SeriesInstanceUID = generate_uid()
    base.FrameOfReferenceUID = generate_uid()
    if patient_id:
        base.PatientID = patient_id
    if modality:
        base.Modality = modality
    for key, value in (tags or {}).items():
        setattr(base, key, value)
    out = GeneratedSeries(folder, base.StudyInstanceUID, base.SeriesInstanceUID)
    prefix = prefix or kind.upper()
    for i in range(count):
        ds = copy.copy(base)
        ds.file_meta = copy.deepcopy(base.file_meta)
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        if "ImagePositionPatient" in ds:
            ds.ImagePositionPatient = [0, 0, float(i)]
        if "SliceLocation" in ds:
            ds.SliceLocation = float(i)
        path = folder / f"{prefix}{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.sop_uids.append(uid)
        out.files.append(path)
    return out


def make_mixed_study(folder: str | Path, ct: int, mr: int) -> list[GeneratedSeries]:
    """A study with a CT and an MR series (two SOP classes) under one folder."""
    folder = Path(folder)
    ct_series = make_series(folder / "ct", ct, kind="ct")
    mr_series = make_series(
        folder / "mr",
        mr,
        kind="mr",
        study_uid=ct_series.study_uid,
        patient_id=str(examples.ct.PatientID),
    )
    return [ct_series, mr_series]
