"""Attacks on the receiver from raw sockets (issue 11), and a real modality beside them.

Each test plays what an attacker (or a broken peer) sends, byte by byte
(tests/rawdicom.py), against the real receiver: in this process where the receiver's
answer is the point, as a `manage.py receive` process where its memory or its
threads are. Source addresses 127.0.0.2 and up stand for other hosts (all of
127/8 is loopback), so the per-peer limit can tell the attacker from the modality on
127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import examples
from pydicom.uid import generate_uid

from dispatch.receiving.files import TooLarge, check_stored
from dispatch.receiving.receiver import DOES_NOT_MATCH, CorruptDataset
from targets.dicomnet.scp import Limits
from tests.dicomgen import make_series
from tests.fixtures.receive_peers import ReceiverProcess, echoscu, storescu
from tests.rawdicom import (
    COMMAND,
    CT_IMAGE,
    EXPLICIT_LE,
    LAST,
    Closed,
    RawPeer,
    associate_rq,
    c_store_rq,
    encode_dataset,
    p_data,
)

MiB = 1024 * 1024
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def ct_dataset(**changes) -> pydicom.Dataset:
    ds = examples.ct.copy()
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def stored_files(rx) -> list[Path]:
    return sorted(rx.incoming.glob("*/*.dcm"))


def partial_files(incoming: Path) -> list[Path]:
    return list((incoming / ".partial").glob("*"))


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS (kB) and Threads of a process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def wait_until(condition, timeout: float = 60, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {condition}")


# -- memory: one association cannot exhaust it ------------------------------------------


def test_fragments_without_their_last_bit_and_a_large_instance_leave_memory_flat(
    courier_site, tmp_path
):
    site = courier_site(env={"COURIER_MIN_FREE_BYTES": "0"}).migrate()
    big = ct_dataset(Rows=7168, Columns=7168)
    big.PixelData = bytes(7168 * 7168 * 2)  # 98 MiB
    big_file = tmp_path / "big.dcm"
    big.save_as(big_file, enforce_file_format=True)
    del big
    warmup = make_series(tmp_path / "small", 2)
    rx = ReceiverProcess(site).start()
    try:
        assert storescu(rx.port, warmup.files).returncode == 0
        before = proc_status(rx.proc.pid)

        # The attack: 16 MiB P-DATA fragments of one C-STORE, none marked last.
        with RawPeer(rx.port) as attacker:
            assert attacker.associate()[0] == 0x02
            attacker.send(p_data(1, COMMAND | LAST, c_store_rq(CT_IMAGE, "1.2.3.4")))
            fragment = p_data(1, 0, bytes(16 * MiB))
            for _ in range(10):
                attacker.send(fragment)
            incoming = site.spool / "incoming"
            # The receiver has taken all 160 MiB: into a partial file on disk (or,
            # before streaming, into its memory).
            wait_until(
                lambda: (
                    sum(p.stat().st_size for p in partial_files(incoming)) >= 160 * MiB
                    or proc_status(rx.proc.pid)["VmRSS"] - before["VmRSS"] > 150 * 1024
                )
            )
            after_attack = proc_status(rx.proc.pid)
            assert (after_attack["VmHWM"] - before["VmHWM"]) / 1024 < 24
        # The attacker gone, its partial file goes too.
        wait_until(lambda: not partial_files(incoming))

        sent = storescu(rx.port, [big_file])
        assert sent.returncode == 0, sent.stderr
        after_big = proc_status(rx.proc.pid)
    finally:
        rx.stop()

    (stored,) = [f for f in incoming.glob("*/*.dcm") if f.stat().st_size > MiB]
    got, original = pydicom.dcmread(stored), pydicom.dcmread(big_file)
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert got.PixelData == original.PixelData
    del got, original
    grown_attack = (after_attack["VmHWM"] - before["VmHWM"]) / 1024
    grown_big = (after_big["VmHWM"] - before["VmHWM"]) / 1024
    print(
        f"receiver peak RSS: {before['VmHWM'] / 1024:.0f} MiB before, "
        f"+{grown_attack:.1f} MiB after 160 MiB of unfinished fragments, "
        f"+{grown_big:.1f} MiB after a 98 MiB instance"
    )
    # Before streaming, each grew by the data's size (the issue: 101 -> 996 MB).
    assert grown_attack < 24
    assert grown_big < 24


def test_an_instance_over_the_size_limit_is_refused_and_the_association_goes_on(
    receiver, tmp_path
):
    rx = receiver(max_instance_bytes=MiB)
    large = ct_dataset()
    large.PixelData = bytes(3 * MiB)
    small = ct_dataset()

    with RawPeer(rx.port) as peer:
        assert peer.associate()[0] == 0x02
        status_large = peer.store(
            encode_dataset(large), sop_instance=large.SOPInstanceUID
        )
        status_small = peer.store(
            encode_dataset(small), sop_instance=small.SOPInstanceUID
        )
        peer.release()

    assert status_large == 0xA700
    assert status_small == 0x0000
    assert [f.stem for f in stored_files(rx)] == [small.SOPInstanceUID]
    assert partial_files(rx.incoming) == []
    rx.tick()
    reason, _count = rx.bookkeeper.refusals[-1]
    assert "larger than 1048576 bytes" in reason


def test_a_deflated_dataset_is_inflated_to_disk_within_the_size_limit(tmp_path):
    import zlib

    ds = ct_dataset()
    raw = encode_dataset(ds)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    good = tmp_path / "good.part"
    good.write_bytes(b"META" + packer.compress(raw) + packer.flush())
    bomb_packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = tmp_path / "bomb.part"
    bomb.write_bytes(
        b"META" + bomb_packer.compress(raw + bytes(64 * MiB)) + bomb_packer.flush()
    )
    deflated = "1.2.840.10008.1.2.1.99"

    uids = check_stored(good, 4, deflated, max_inflated=MiB)

    assert uids["SOPInstanceUID"] == ds.SOPInstanceUID
    with pytest.raises(TooLarge):
        check_stored(bomb, 4, deflated, max_inflated=8 * MiB)
    with pytest.raises(CorruptDataset):
        check_stored(good, 4, EXPLICIT_LE, max_inflated=MiB)


# -- slow connections cannot shut the intake -------------------------------------------


class SlowDrip:
    """An attacker holding connections open by trickling bytes into them.

    `count` connections from each of `sources`; each one sends one byte of an
    A-ASSOCIATE-RQ every `every` seconds and reconnects when the receiver drops it.
    """

    def __init__(self, port: int, sources: list[str], count: int, every: float):
        self.port, self.sources, self.count, self.every = port, sources, count, every
        self.request = associate_rq([(1, CT_IMAGE, [EXPLICIT_LE])])
        self.dropped = 0
        self.connected = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def _connect(self, source: str):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            return None
        self.connected += 1
        return [sock, source, 0]

    def run(self) -> None:
        conns = [
            c
            for s in self.sources
            for _ in range(self.count)
            if (c := self._connect(s)) is not None
        ]
        while not self.stop.is_set():
            for i, conn in enumerate(conns):
                sock, source, pos = conn
                try:
                    sock.send(self.request[pos % len(self.request) : pos + 1])
                    conn[2] = pos + 1
                except OSError:
                    self.dropped += 1
                    sock.close()
                    conns[i] = self._connect(source) or conn
            time.sleep(self.every)
        for sock, _, _ in conns:
            sock.close()

    def __enter__(self) -> SlowDrip:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def test_slow_connections_cannot_shut_out_a_real_modality(courier_site, tmp_path):
    site = courier_site(
        env={
            "COURIER_MIN_FREE_BYTES": "0",
            "COURIER_RECEIVER_MAX_ASSOCIATIONS": "8",
            "COURIER_RECEIVER_MAX_ASSOCIATIONS_PER_PEER": "4",
            "COURIER_RECEIVER_ASSOCIATE_TIMEOUT": "1.5",
            "COURIER_RECEIVER_PDU_TIMEOUT": "1.5",
            "COURIER_RECEIVER_IDLE_TIMEOUT": "2",
        }
    ).migrate()
    series = make_series(tmp_path / "ct", 5)
    rx = ReceiverProcess(site).start()
    threads: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            threads.append(proc_status(rx.proc.pid)["Threads"])
            time.sleep(0.1)

    try:
        idle_threads = proc_status(rx.proc.pid)["Threads"]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # 80 connections from 20 "hosts", more than the old limit of 64 raw
        # connections, each trickling a byte every 0.3 s: under the old per-recv
        # timeouts they were held forever. Beside them one host holds its 4
        # allowed associations with a PDU that never ends.
        holders = []
        for _ in range(4):
            holder = RawPeer(rx.port, source="127.0.0.50")
            assert holder.associate()[0] == 0x02
            holder.send(p_data(1, COMMAND | LAST, c_store_rq(CT_IMAGE, "1.2.3")))
            holder.send(struct.pack(">BBI", 0x04, 0, 1000) + b"\x00")
            holders.append(holder)
        sources = [f"127.0.0.{n}" for n in range(2, 22)]
        with SlowDrip(rx.port, sources, 4, 0.3) as drip:
            wait_until(lambda: drip.connected >= 80, timeout=60)
            time.sleep(2.5)  # every deadline has fired at least once by now

            started = time.monotonic()
            echoed = echoscu(rx.port)
            sent = storescu(rx.port, [series.folder], extra=["+sd"])
            took = time.monotonic() - started
            dropped = drip.dropped
            assert echoed.returncode == 0, echoed.stderr
            assert sent.returncode == 0, sent.stderr
            for holder in holders:
                assert holder.wait_closed(timeout=30) is not None
                holder.close()
        sampling.set()
        sampler.join(5)
    finally:
        sampling.set()
        rx.stop()

    print(
        f"during the attack: echo + 5 instances took {took:.2f} s; receiver threads "
        f"{idle_threads} idle, at most {max(threads)}; {dropped} slow connections "
        "dropped (deadline, or room for newer ones) and reconnected"
    )
    assert len(list((site.spool / "incoming").glob("*/*.dcm"))) == 5
    assert dropped > 0
    # One thread per established association (at most 8), nothing per waiting one.
    assert max(threads) <= idle_threads + 8
    assert "event=connections_refused" in rx.log()


def test_each_phase_has_a_deadline_however_slowly_the_peer_trickles(receiver):
    rx = receiver(
        limits=Limits(associate_timeout=1, pdu_timeout=1, idle_timeout=1.5),
    )
    request = associate_rq([(1, CT_IMAGE, [EXPLICIT_LE])])
    command = p_data(1, COMMAND | LAST, c_store_rq(CT_IMAGE, "1.2.3"))
    outcomes: dict[str, str] = {}

    def trickle(name: str, peer: RawPeer, data: bytes) -> None:
        try:
            peer.drip(data, every=0.1)
            outcomes[name] = "sent everything"
        except OSError:
            outcomes[name] = "dropped"

    slow_request = RawPeer(rx.port)
    slow_pdu = RawPeer(rx.port)
    assert slow_pdu.associate()[0] == 0x02
    idle = RawPeer(rx.port)
    assert idle.associate()[0] == 0x02
    workers = [
        threading.Thread(target=trickle, args=("request", slow_request, request)),
        threading.Thread(target=trickle, args=("pdu", slow_pdu, command * 4)),
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)

    assert outcomes == {"request": "dropped", "pdu": "dropped"}
    # An association that sends nothing is released (A-RELEASE-RQ); a peer that
    # does not answer that either is aborted (A-ABORT, then closed).
    ended = idle.wait_closed(timeout=60)
    assert ended[:10] == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert ended[10:11] == b"\x07"
    for peer in (slow_request, slow_pdu, idle):
        peer.close()


def test_only_established_associations_count_and_each_peer_has_its_share(receiver):
    rx = receiver(limits=Limits(max_associations=3, max_per_peer=2))
    waiting = [RawPeer(rx.port, source=f"127.0.0.{n}") for n in (10, 11, 12, 13)]
    open_ = []
    try:
        # Four connections that never send a request do not take the three slots.
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3"):
            peer = RawPeer(rx.port, source=source)
            assert peer.associate()[0] == 0x02, source
            open_.append(peer)
        # A third connection from the same host is closed at once.
        third = RawPeer(rx.port, source="127.0.0.2")
        with pytest.raises((Closed, OSError)):
            third.associate()
        third.close()
        # A fourth association from elsewhere: "too many", transient (2, 3, 2).
        with RawPeer(rx.port, source="127.0.0.4") as fourth:
            pdu_type, body = fourth.associate()
        assert (pdu_type, body[1:]) == (0x03, b"\x02\x03\x02")
        # One released: a slot is free again.
        open_.pop().release()
        with RawPeer(rx.port, source="127.0.0.4") as fifth:
            assert fifth.associate()[0] == 0x02
            fifth.release()
    finally:
        for peer in waiting + open_:
            peer.close()


def test_thousands_of_presentation_contexts_are_refused_with_ten_bytes(receiver):
    rx = receiver()
    many = [((2 * i + 1) % 256, "1.2", ["1.2"]) for i in range(5000)]
    too_many = [((2 * i + 1) % 256, CT_IMAGE, [EXPLICIT_LE]) for i in range(129)]

    for contexts in (many, too_many):
        with RawPeer(rx.port) as peer:
            peer.send(associate_rq(contexts))
            answer = peer.wait_closed(timeout=60)
        assert answer == struct.pack(">BBIBBBB", 0x03, 0, 4, 0, 1, 1, 1)
    assert echoscu(rx.port).returncode == 0


# -- what the dataset says about itself -----------------------------------------------


def test_a_dataset_not_matching_its_c_store_request_is_refused_like_storescp(
    receiver, storescp
):
    rx = receiver()
    ds = ct_dataset()
    raw = encode_dataset(ds)
    results = {}
    for name, port, called in (("courier", rx.port, "COURIER"),
                               ("storescp", storescp.port, storescp.aet)):  # fmt: skip
        with RawPeer(port) as peer:
            assert (
                peer.associate(
                    [(1, CT_IMAGE, [EXPLICIT_LE]), (3, MR_IMAGE, [EXPLICIT_LE])],
                    called=called,
                )[0]
                == 0x02
            )
            results[name] = [
                peer.store(raw, sop_instance=generate_uid()),
                peer.store(
                    raw,
                    sop_instance=ds.SOPInstanceUID,
                    sop_class=MR_IMAGE,
                    context_id=3,
                ),  # fmt: skip
                peer.store(raw, sop_instance=ds.SOPInstanceUID),
            ]
            peer.release()

    assert results["courier"] == [DOES_NOT_MATCH, DOES_NOT_MATCH, 0x0000]
    assert results["storescp"] == results["courier"]
    assert [f.stem for f in stored_files(rx)] == [ds.SOPInstanceUID]


def test_two_invalid_uids_that_clean_alike_are_both_kept(receiver):
    rx = receiver()
    first = ct_dataset(SOPInstanceUID="1.2.826.0.1/7")
    second = ct_dataset(SOPInstanceUID="1.2.826.0.1_7")

    with RawPeer(rx.port) as peer:
        assert peer.associate()[0] == 0x02
        statuses = [
            peer.store(encode_dataset(ds), sop_instance=ds.SOPInstanceUID)
            for ds in (first, second)
        ]
        peer.release()

    assert statuses == [0x0000, 0x0000]
    files = stored_files(rx)
    assert len(files) == 2
    assert sorted(pydicom.dcmread(f).SOPInstanceUID for f in files) == sorted(
        ["1.2.826.0.1/7", "1.2.826.0.1_7"]
    )
    assert rx.open_series()[0].instance_count == 2


def test_control_characters_in_uids_and_ae_titles_are_refused_and_never_logged_raw(
    receiver, caplog
):
    rx = receiver()
    nul_series = ct_dataset(SeriesInstanceUID="1.2.3\x00.4")
    forged = ct_dataset(SOPInstanceUID="1.2.3\nlevel=INFO event=forged")

    with caplog.at_level(logging.INFO, logger="courier.receiver"):
        with RawPeer(rx.port) as peer:
            assert peer.associate()[0] == 0x02
            statuses = [
                peer.store(
                    encode_dataset(nul_series), sop_instance=nul_series.SOPInstanceUID
                ),
                peer.store(encode_dataset(forged), sop_instance=forged.SOPInstanceUID),
            ]
            peer.release()
        with RawPeer(rx.port) as peer:
            rejected = peer.associate(calling=b"EVIL\nevent=x")
        good = ct_dataset()
        with RawPeer(rx.port) as peer:
            assert peer.associate(calling="CT 1 event=x")[0] == 0x02
            spaced = peer.store(encode_dataset(good), sop_instance=good.SOPInstanceUID)
            peer.release()

    assert statuses == [0xC210, 0xC210]
    assert rejected[0] == 0x03 and rejected[1][2:] == b"\x01\x03"
    assert spaced == 0x0000
    assert [f.stem for f in stored_files(rx)] == [good.SOPInstanceUID]
    assert any('calling_aet="CT 1 event=x"' in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert "\n" not in record.getMessage() and "\x00" not in record.getMessage()
    assert any(
        'sop_instance="1.2.3\\nlevel=INFO event=forged"' in r.getMessage()
        for r in caplog.records
    )
