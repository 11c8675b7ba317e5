"""One 1 GiB instance (tomosynthesis, whole-slide sizes) into `manage.py receive`: the
receiving process's peak memory stays flat, the file stored is the bytes sent.

The instance is generated while it is sent (never on disk on the sending side) and
its SHA-256 taken on the way; the stored copy is hashed in pieces and removed."""

from __future__ import annotations

import hashlib
import struct

from pydicom import examples
from pydicom.uid import generate_uid

from tests.dicomgen import make_series
from tests.dispatch.receiving.test_attacks import proc_status
from tests.fixtures.receive_peers import ReceiverProcess, storescu
from tests.rawdicom import COMMAND, CT_IMAGE, LAST, RawPeer, c_store_rq, encode_dataset

MiB = 1024 * 1024
GiB = 1024 * MiB


def test_a_1_gib_instance_is_streamed_to_the_spool_with_flat_memory(
    courier_site, tmp_path
):
    site = courier_site(env={"COURIER_MIN_FREE_BYTES": "0"}).migrate()
    header = examples.ct.copy()
    del header.PixelData
    header.SOPInstanceUID = generate_uid()
    header.Rows = header.Columns = 4096
    header.NumberOfFrames = GiB // (4096 * 4096 * 2)
    head = encode_dataset(header) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW",
                                                0, GiB)  # fmt: skip
    # 1 MiB of pattern, each copy made different by its index: no two pieces alike.
    block = bytes(range(256)) * 4096
    rx = ReceiverProcess(site).start()
    stored = None
    try:
        # Warm up (imports, first association) before the baseline.
        warmup = make_series(tmp_path / "small", 2)
        assert storescu(rx.port, warmup.files).returncode == 0
        before = proc_status(rx.proc.pid)

        sent = hashlib.sha256()
        with RawPeer(rx.port) as peer:
            kind, ac = peer.associate(max_pdu=1 << 20)
            assert kind == 0x02
            fragment = peer.accepted_max_pdu(ac) - 6
            peer.send(
                _pdata(COMMAND | LAST, c_store_rq(CT_IMAGE, header.SOPInstanceUID))
            )
            sent.update(head)
            peer.send(_pdata(0, head))
            pending = b""
            for i in range(GiB // MiB):
                piece = struct.pack("<Q", i) + block[8:]
                sent.update(piece)
                pending += piece
                while len(pending) >= fragment:
                    peer.send(_pdata(0, pending[:fragment]))
                    pending = pending[fragment:]
            peer.send(_pdata(LAST, pending))
            status = peer.read_status(timeout=600)
            peer.release()
        after = proc_status(rx.proc.pid)
        assert status == 0x0000

        (stored,) = site.spool.glob(f"incoming/*/{header.SOPInstanceUID}.dcm")
        got = hashlib.sha256()
        with open(stored, "rb") as f:
            f.seek(128 + 4 + 12 + struct.unpack("<I", f.read(144)[140:144])[0])
            while chunk := f.read(8 * MiB):
                got.update(chunk)
        assert got.hexdigest() == sent.hexdigest()
    finally:
        rx.stop()
        if stored is not None:
            stored.unlink()

    grown = (after["VmHWM"] - before["VmHWM"]) / 1024
    print(
        f"receiver peak RSS {before['VmHWM'] / 1024:.0f} MiB before, "
        f"+{grown:.1f} MiB after one {GiB // MiB} MiB instance"
    )
    # Holding the dataset (once or twice, as before issue 11) would be +1024 MiB.
    assert grown < 24


def _pdata(control: int, value: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(value) + 2, 1, control) + value
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv
