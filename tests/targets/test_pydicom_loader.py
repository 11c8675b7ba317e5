"""pydicom's first import from many threads at once, through Courier's own entry points.

The historic wedge (tests/dispatch/jobs/test_worker_startup.py): two threads importing
pydicom for the first time at once can deadlock inside the import system, which then
hands one of them a half-initialised module ("cannot import name 'UID' from partially
initialized module 'pydicom.uid'"). It happens when a thread's first pydicom import is
a submodule: `from pydicom.uid import UID` takes the import lock of `pydicom.uid`
before the package's, while another thread, inside the package's `__init__`, waits for
`pydicom.uid`. Threads whose first import is the package itself only wait for each
other. So the send path's lazy imports all begin with `targets.dicomnet.load_pydicom()`
(the package first); this test holds every such entry point to it.

Each round starts a dozen threads at one barrier, each calling one entry point with
pydicom not yet imported (removed from `sys.modules` between rounds, in a fresh
process), and checks what every thread got back.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
from pydicom.data import get_testdata_file

from targets.dicomnet import commitment, scu
from tests.fixtures.dispatch_peers import PROJECT

ROUNDS = 10
THREADS = 12

_SCRIPT = """
import json, sys, threading
from pathlib import Path

import numpy  # imported once: only pydicom's first import is raced

import targets.dicomnet as dn
from targets.dicomnet import commitment, scu, transcode
from targets.kinds.dicomweb import index

assert "pydicom" not in sys.modules
report, meta_file = bytes.fromhex(sys.argv[1]), Path(sys.argv[2])
rounds, threads = int(sys.argv[3]), int(sys.argv[4])
# Switch threads as often as the interpreter can: the race window is a few bytecodes.
sys.setswitchinterval(1e-6)
sample = commitment.Report("1.2.3", [commitment.Reference("1.2.4", "1.2.5")])
calls = {
    "transcode.name": lambda: transcode.name("1.2.840.10008.1.2.1"),
    "commitment.encode_report": lambda: commitment.encode_report(
        sample, commitment.EXPLICIT_LE
    ).hex(),
    "commitment.parse_report": lambda: commitment.parse_report(
        report, commitment.EXPLICIT_LE
    ).transaction_uid,
    "scu.dataset_offset": lambda: scu.dataset_offset(
        meta_file, meta_file.read_bytes()[:256]
    ),
    "index._text": lambda: index._text(" CHEST "),
}
names = list(calls)
out = []
for _ in range(rounds):
    for name in [m for m in sys.modules if m.split(".")[0] == "pydicom"]:
        del sys.modules[name]
    dn._loaded = False
    barrier = threading.Barrier(threads)
    got = [None] * threads

    def work(i):
        barrier.wait()
        try:
            got[i] = [names[i % len(names)], calls[names[i % len(names)]]()]
        except BaseException as exc:
            got[i] = [names[i % len(names)], f"{type(exc).__name__}: {exc}"]

    started = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in started:
        t.start()
    for i, t in enumerate(started):
        t.join(60)
        if t.is_alive():
            got[i] = [names[i % len(names)], "still importing after 60 s"]
    out.append(got)
print(json.dumps(out))
"""


def test_courier_s_pydicom_entry_points_survive_a_first_import_from_many_threads(
    tmp_path,
):
    """Before this test, `commitment`'s entry points began with `from
    pydicom.filereader import ...`: every round of 3 runs broke. Skipping
    `load_pydicom()` in `transcode.name` alone broke 4-9 rounds of 10 in each of 10
    runs. The lock inside `load_pydicom` is not what protects: without it, 0 rounds
    of 30 broke (the import system already makes package-first imports wait)."""
    source = get_testdata_file("CT_small.dcm")
    data = open(source, "rb").read()
    assert data[132:138] == b"\x02\x00\x00\x00UL"  # File Meta Group Length
    # The same file without its group length: its meta is read by pydicom.
    no_group_length = tmp_path / "no_group_length.dcm"
    no_group_length.write_bytes(data[:132] + data[144:])
    with pydicom.dcmread(source) as ds:
        meta_end = 144 + ds.file_meta.FileMetaInformationGroupLength - 12
    sample = commitment.Report("1.2.3", [commitment.Reference("1.2.4", "1.2.5")])
    encoded = commitment.encode_report(sample, commitment.EXPLICIT_LE)
    report = commitment.encode_report(
        commitment.Report("9.8.7", [commitment.Reference("1.2.4", "1.2.5")]),
        commitment.EXPLICIT_LE,
    )
    assert scu.dataset_offset(no_group_length, no_group_length.read_bytes()) == (
        meta_end
    )
    expected = {
        "transcode.name": "Explicit VR Little Endian",
        "commitment.encode_report": encoded.hex(),
        "commitment.parse_report": "9.8.7",
        "scu.dataset_offset": meta_end,
        "index._text": "CHEST",
    }

    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, report.hex(), str(no_group_length),
         str(ROUNDS), str(THREADS)],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads(done.stdout)

    assert len(rounds) == ROUNDS
    wrong = [
        (n, name, value)
        for n, got in enumerate(rounds)
        for name, value in got
        if value != expected[name]
    ]
    assert not wrong, f"{len(wrong)} wrong answers, first: {wrong[:3]}"
