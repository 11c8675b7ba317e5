"""The receiver's journal (`dispatch/receiving/journal.py`): an instance acknowledged
with Success survives a crash, however it ends.

- in process: a crash after the flush of the journal record but before the spool file
  reached the disk (the page cache lost: files deleted or torn by hand) is repaired at
  start-up, byte for byte; a refused instance is never replayed; the records are
  dropped once checkpointed;
- with real processes: `manage.py receive` SIGKILLed at random points while dcmtk's
  storescu sends, restarted; every instance storescu saw acknowledged is in the spool
  exactly once, intact, and routed.
"""

from __future__ import annotations

import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

from dispatch.receiving.journal import Journal
from tests.dicomgen import make_series
from tests.fixtures.receive_peers import ReceiverProcess
from tests.peers import DCMTK_ENV, free_port, require_binary

from .test_receiver import send_raw, stored_files


def spool_files(incoming: Path) -> list[Path]:
    """Instance files in series folders (not the journal's or partial files)."""
    return sorted(
        p for p in incoming.glob("*/*.dcm") if not p.parent.name.startswith(".")
    )


def test_acknowledged_instances_lost_from_the_page_cache_are_written_again(
    receiver, tmp_path
):
    series = make_series(tmp_path / "ct", 6)
    spool = tmp_path / "spool"
    # No checkpoint before the "crash": the bookkeeping thread never ticks.
    rx = receiver(spool_dir=spool, tick_seconds=3600)
    assert send_raw(rx.port, series.files) == [0] * 6
    files = stored_files(rx)
    assert len(files) == 6
    originals = {f.name: f.read_bytes() for f in files}
    # What a power cut before the writeback leaves: names without data, torn files,
    # names gone (the renames were not synced either).
    files[0].write_bytes(b"")
    files[1].write_bytes(originals[files[1].name][:1000])
    files[2].unlink()
    files[3].unlink()
    rx._server.shutdown()  # dies: no final tick, no checkpoint
    rx._server = None
    rx._release_spool()  # the process's lock on the spool dies with it

    again = receiver(spool_dir=spool)
    restored = stored_files(again)
    assert {f.name: f.read_bytes() for f in restored} == originals
    for f in restored:
        assert pydicom.dcmread(f).SOPInstanceUID + ".dcm" == f.name
    # Replayed once: the journal is empty after the start.
    journal = Journal(again.incoming)
    try:
        assert journal.open() == []
    finally:
        journal.close()


def test_a_checkpoint_empties_the_journal_and_refusals_are_never_replayed(
    receiver, tmp_path
):
    series = make_series(tmp_path / "ct", 3)
    spool = tmp_path / "spool"
    rx = receiver(spool_dir=spool, tick_seconds=3600)
    assert send_raw(rx.port, series.files) == [0] * 3
    journal = Journal(rx.incoming)
    try:
        assert len(journal.open()) == 3  # acknowledged, not yet checkpointed
    finally:
        journal.close()
    rx.tick()  # the bookkeeping thread's checkpoint: one syncfs, records dropped
    journal = Journal(rx.incoming)
    try:
        assert journal.open() == []
    finally:
        journal.close()

    # A record whose file could not be put in place is zeroed: never replayed.
    ticket = rx.journal.append("nowhere/1.2.3.dcm", b"data")
    assert ticket is not None
    rx.journal.abort(ticket)
    journal = Journal(rx.incoming)
    try:
        assert journal.open() == []
    finally:
        journal.close()


def delivered(out: Path) -> set[str]:
    """SOP Instance UIDs in the Folder target (not in its temporary folders)."""
    done = set()
    for f in out.rglob("*.dcm"):
        if not any(part.startswith(".") for part in f.relative_to(out).parts):
            try:
                done.add(pydicom.dcmread(f).SOPInstanceUID)
            except FileNotFoundError:  # moved as we looked
                pass
    return done


def _dataset(path: Path) -> pydicom.Dataset:
    """The dataset without its file meta and trailing padding (storescu drops the
    (FFFC,FFFC) element the generated files end with)."""
    ds = pydicom.dcmread(path)
    del ds.file_meta
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    return ds


def test_receive_sigkilled_at_random_points_keeps_every_acknowledged_instance(
    courier_site, tmp_path
):
    count = 30
    series = make_series(tmp_path / "ct", count)
    originals = {pydicom.dcmread(f).SOPInstanceUID: f for f in series.files}
    out = tmp_path / "routed"
    out.mkdir()
    site = courier_site(
        env={"COURIER_SERIES_QUIET_SECONDS": "3600", "COURIER_MIN_FREE_BYTES": "0"}
    ).migrate()
    # The target and its rule in one site process (one Django start-up), made while
    # the first receiver starts: it never routes (quiet for an hour), the second does.
    setup = ThreadPoolExecutor(1)
    made = setup.submit(
        site.python,
        "from dispatch.routing.models import Rule\n"
        "from targets.models import Target\n"
        f"t = Target(name='out', kind='folder', path={str(out)!r})\n"
        "t.save()\n"
        "r = Rule.objects.create(name='all')\n"
        "r.targets.set([t])\nprint(1)\n",
    )
    setup.shutdown(wait=False)
    port = free_port()
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    acknowledged: set[str] = set()
    storescu = require_binary("storescu")
    # One kill per run, at a random point (the suite's runs add up).
    rx = ReceiverProcess(site, port=port).start()
    sender = subprocess.Popen(
        [storescu, "-v", "-aet", "MODALITY", "-aec", "COURIER", "127.0.0.1",
         str(port), *map(str, series.files)],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    kill_after = rng.randrange(1, count)
    sending, acks = None, 0
    assert sender.stdout is not None
    for line in sender.stdout:
        if "Sending file:" in line:
            sending = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line:
            acknowledged.add(pydicom.dcmread(sending).SOPInstanceUID)
            acks += 1
            if acks == kill_after:
                rx.kill()  # SIGKILL, wherever the next instance is
    sender.wait(60)
    assert made.result() == 1

    # Restarted once more, routing on: the journal replayed, the series adopted.
    rx = ReceiverProcess(
        site, port=port, env={"COURIER_SERIES_QUIET_SECONDS": "1"}
    ).start()
    try:
        found: dict[str, list[Path]] = {}
        for f in spool_files(site.spool / "incoming"):
            found.setdefault(pydicom.dcmread(f).SOPInstanceUID, []).append(f)
        for uid in acknowledged:
            assert len(found.get(uid, [])) == 1, (seed, uid, found.get(uid))
            (path,) = found[uid]
            assert _dataset(path) == _dataset(originals[uid]), seed
        # Nothing half-written anywhere: every file in the spool reads whole.
        for paths in found.values():
            for path in paths:
                assert _dataset(path) == _dataset(
                    originals[pydicom.dcmread(path).SOPInstanceUID]
                ), seed
        worker = site.start_worker()
        site.wait_for(lambda: _delivered(out) >= acknowledged, timeout=300)
        site.stop_worker(worker)
    finally:
        rx.stop()


def _delivered(out: Path) -> set[str]:
    """The SOP Instance UIDs in the Folder target's finished folders. The target
    writes a series into a hidden temporary folder and renames it into place, so the
    walk skips hidden folders and does not mind one vanishing while it is listed."""
    found = set()
    for folder, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.endswith(".dcm") and not name.startswith("."):
                found.add(pydicom.dcmread(os.path.join(folder, name)).SOPInstanceUID)
    return found
