"""Generate a large folder of small DICOM files for the folder-index benchmark.

Not part of the test suite; the tree is written outside the repository (default
/var/tmp/courier-tree-1m) and reused by `bench/cmd_index.py`. Layout as a PACS export
or a research archive writes it: patients / studies / series / instances,

    <tree>/<PatientID>/<StudyDate>_<Accession>/<SeriesNumber>_<Modality>/IM<n>.dcm

with 1-4 studies per patient, of a mix of kinds: radiographs and mammograms (1-2
series of a few images), ultrasound (one series of 10-80), CT, MR and PET (2-9 series
of 5-400); pseudo-random from `--seed`, so the same tree every time; descriptions
drawn from real-looking exam names, and 8x8-pixel CT images of about 1.4 KB each
(pydicom's bundled CT header; one encoded template per series, the SOP Instance UID
and InstanceNumber patched per file).

    .venv/bin/python bench/make_tree.py                    # 1,000,000 files
    .venv/bin/python bench/make_tree.py --count 20000 --tree /tmp/tree20k
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import random
import sys
import time
from pathlib import Path

# Kind of study: (weight, modality, descriptions, series per study, instances per
# series as (low, high, mode)); radiographs and mammograms are a few images, CT and
# MR hundreds in several series.
STUDY_KINDS = [
    (35, "CR", ["XR CHEST PA AND LATERAL", "XR KNEE 3 VIEWS", "XR HAND LEFT"],
     (1, 2), (1, 2, 1)),
    (10, "MG", ["MAMMO SCREENING BILATERAL", "MAMMO DIAGNOSTIC LEFT"],
     (1, 2), (2, 4, 2)),
    (10, "US", ["US ABDOMEN COMPLETE", "US THYROID", "US CAROTID DOPPLER"],
     (1, 1), (10, 80, 30)),
    (25, "CT", ["CT CHEST W CONTRAST", "CT CHEST WO CONTRAST", "CT HEAD WO CONTRAST",
                "CT ABDOMEN PELVIS W CONTRAST", "CTA PULMONARY ARTERIES"],
     (2, 5), (5, 400, 60)),
    (15, "MR", ["MR BRAIN W WO CONTRAST", "MR KNEE RIGHT", "MR KNEE LEFT",
                "MR LUMBAR SPINE WO", "MR PROSTATE MULTIPARAMETRIC"],
     (3, 9), (15, 200, 30)),
    (5, "PT", ["PET CT WHOLE BODY FDG"], (2, 4), (100, 400, 250)),
]  # fmt: skip
SERIES_DESCRIPTIONS = ["SCOUT", "AXIAL 5MM", "AXIAL 1MM", "CORONAL", "SAGITTAL",
                       "T1", "T2 FLAIR", "DWI", "PA", "LATERAL"]  # fmt: skip
UID_ROOT = "1.2.826.0.1.3680043.8.498.9"
SOP_PLACEHOLDER = f"{UID_ROOT}.1.999999999999"
NUMBER_PLACEHOLDER = "987654"


def plan(count: int, seed: int):
    """Yield (patient, study, series, instances, study kind, rng) until `count`."""
    rng = random.Random(seed)
    weights = [k[0] for k in STUDY_KINDS]
    left = count
    patient = 0
    while left > 0:
        patient += 1
        for study in range(rng.randint(1, 4)):
            kind = rng.choices(STUDY_KINDS, weights)[0]
            _, _, _, (s_lo, s_hi), (lo, hi, mode) = kind
            for series in range(rng.randint(s_lo, s_hi)):
                n = min(left, round(rng.triangular(lo, hi, mode)))
                yield patient, study, series, n, kind, rng
                left -= n
                if left <= 0:
                    return


def generate(tree: Path, count: int, seed: int) -> int:
    from pydicom import examples

    base = copy.deepcopy(examples.ct)
    base.Rows = base.Columns = 8
    base.PixelData = bytes(8 * 8 * 2)
    base.remove_private_tags()
    del base[0xFFFCFFFC]  # trailing padding
    written = 0
    study_meta: dict[tuple[int, int], tuple[str, str, str]] = {}
    last = time.monotonic()
    for patient, study, series, n, kind, rng in plan(count, seed):
        key = (patient, study)
        if key not in study_meta:
            modality, description = kind[1], rng.choice(kind[2])
            date = f"{rng.randint(2005, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            study_meta = {key: (modality, description, date)}
        modality, description, date = study_meta[key]
        pid = f"PAT{patient:07d}"
        accession = f"A{patient:07d}{study}"
        ds = copy.copy(base)
        ds.file_meta = copy.deepcopy(base.file_meta)
        ds.PatientID = pid
        ds.PatientName = f"TEST^PATIENT{patient:07d}"
        ds.PatientBirthDate = f"19{rng.randint(30, 99)}0101"
        ds.StudyInstanceUID = f"{UID_ROOT}.2.{patient}.{study}"
        ds.SeriesInstanceUID = f"{UID_ROOT}.3.{patient}.{study}.{series}"
        ds.AccessionNumber = accession
        ds.StudyDate = ds.SeriesDate = date
        ds.StudyDescription = description
        ds.SeriesDescription = rng.choice(SERIES_DESCRIPTIONS)
        ds.Modality = modality
        ds.SeriesNumber = series + 1
        ds.InstanceNumber = NUMBER_PLACEHOLDER
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = SOP_PLACEHOLDER
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        template = buf.getvalue()
        assert template.count(SOP_PLACEHOLDER.encode()) == 2
        out = tree / pid / f"{date}_{accession}" / f"{series + 1:03d}_{modality}"
        out.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            written += 1
            uid = f"{UID_ROOT}.1.{100_000_000_000 + written}".encode()
            data = template.replace(SOP_PLACEHOLDER.encode(), uid).replace(
                NUMBER_PLACEHOLDER.encode(), f"{i + 1:<6d}".encode()
            )
            fd = os.open(out / f"IM{i + 1:05d}.dcm", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, data)
            os.close(fd)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"  {written:,} files", flush=True)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="/var/tmp/courier-tree-1m")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    tree = Path(args.tree)
    if tree.exists() and any(tree.iterdir()):
        sys.exit(f"{tree} is not empty: remove it first (or choose another --tree)")
    tree.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    written = generate(tree, args.count, args.seed)
    # Beside the tree, not in it (the index would list it as a file that is not DICOM).
    info = tree.with_name(tree.name + ".info")
    info.write_text(f"{written} files, seed {args.seed}\n")
    print(f"{written:,} files in {tree} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
