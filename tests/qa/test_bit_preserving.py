"""Every byte unchanged, checked by dcmtk's bit-preserving storescp (`+B`).

A storescp started with `+B` writes each dataset exactly as it came off the wire,
and with `--max-pdu 4096` it makes the sender cut every instance into the smallest
fragments the standard allows. So:

- Courier sending pydicom's files in several transfer syntaxes (uncompressed, big
  endian, implicit, RLE and JPEG 2000 multi-frame, JPEG) to it: each dataset arrives
  byte for byte as it is in the file, under its own SOP Instance UID;
- dcmtk's storescu (options nobody here uses: JPEG lossless proposed `-xs`, so it
  compresses what it can, 4 KiB PDUs both ways) sending the same files
  to it and to Courier's receiver: Courier's spool holds the very bytes storescp
  wrote, behind a file meta that names Courier.
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dispatch.jobs import services
from dispatch.jobs.models import State
from targets.dicomnet.identity import IMPLEMENTATION_CLASS_UID
from targets.models import DicomTarget
from tests.interop.corpus import PYDICOM_DATA, dataset_start, with_fresh_uid
from tests.peers import DCMTK_ENV, StoreSCP

FILES = (
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "SC_rgb_rle_2frame.dcm",  # RLE, 2 frames
    "JPEG2000.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG baseline
    "MR_small_jpeg_ls_lossless.dcm",
    "rtdose_rle.dcm",  # RLE, 15 frames of 32-bit dose
    "rtplan.dcm",
)


@pytest.fixture(scope="module")
def bit_preserving(tmp_path_factory) -> Iterator[StoreSCP]:
    peer = StoreSCP(
        tmp_path_factory.mktemp("storescp-bp"), aet="BITPRES", max_pdu=4096,
        extra_args=["+B"],
    )  # fmt: skip
    with peer:
        yield peer


def fresh_copies(folder: Path) -> dict[str, Path]:
    """{SOP Instance UID: path} of fresh-UID copies of FILES in `folder`."""
    folder.mkdir(parents=True)
    out = {}
    for name in FILES:
        raw, uid = with_fresh_uid((PYDICOM_DATA / "test_files" / name).read_bytes())
        path = folder / name
        path.write_bytes(raw)
        out[uid] = path
    return out


def by_uid(paths: list[Path]) -> dict[str, Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in paths
        }


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    raw = path.read_bytes()
    start, syntax = dataset_start(raw)
    return syntax, raw[start:]


@pytest.mark.django_db(transaction=True)
def test_courier_sends_each_file_s_bytes_unchanged_in_4_kib_fragments(
    tmp_path, bit_preserving, immediate_huey
):
    sent = fresh_copies(tmp_path / "in")
    target = DicomTarget.objects.create(
        name="qa-bitpres", host="127.0.0.1", port=bit_preserving.port,
        called_aet=bit_preserving.aet, retry_max_attempts=1,
    )  # fmt: skip

    (job,) = services.create_jobs(tmp_path / "in", [target], owned_spool=False)

    job.refresh_from_db()
    assert job.state == State.DONE, job.last_error
    arrived = by_uid(bit_preserving.files())
    for uid, path in sent.items():
        assert uid in arrived, path.name
        assert dataset_bytes(arrived[uid]) == dataset_bytes(path), path.name


def test_what_storescu_sends_courier_stores_as_bit_preserving_storescp_does(
    tmp_path, bit_preserving, receiver
):
    sent = fresh_copies(tmp_path / "in")
    rx = receiver()
    for port, aet in ((bit_preserving.port, bit_preserving.aet), (rx.port, "COURIER")):
        done = subprocess.run(
            ["/usr/bin/storescu", "-xs", "--max-send-pdu", "4096",
             "-pdu", "4096", "-nh", "-aet", "MODALITY", "-aec", aet,
             "127.0.0.1", str(port), *(str(p) for p in sent.values())],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    theirs = by_uid(bit_preserving.files())
    ours = by_uid(sorted(rx.incoming.rglob("*.dcm")))
    # storescu could convert only what it has codecs for: those are the files
    # both received; every one of them Courier has too, with the same bytes.
    sent_both = set(theirs) & set(sent)
    assert len(sent_both) >= 4, sorted(p.name for p in theirs.values())
    for uid in sent_both:
        assert uid in ours, sent[uid].name
        assert dataset_bytes(ours[uid]) == dataset_bytes(theirs[uid]), sent[uid].name
        meta = pydicom.dcmread(ours[uid], stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.SourceApplicationEntityTitle == "MODALITY"
