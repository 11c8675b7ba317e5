"""A DICOM peer on a raw socket, byte by byte, for attacking the receiver.

Everything is built by hand (PS3.8 PDUs, PS3.7 implicit VR command sets), so a test
can send what no well-behaved library would: thousands of presentation contexts, AE
titles with control characters, PDUs trickling one byte at a time, fragments without
their last bit, datasets whose UIDs differ from the C-STORE request's.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

COMMAND, LAST = 0x01, 0x02


def _even(value: bytes) -> bytes:
    return value + b"\x00" if len(value) % 2 else value


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(
    contexts: Sequence[tuple[int, str, Sequence[str]]],
    *,
    calling: bytes | str = "RAWSCU",
    called: bytes | str = "COURIER",
    max_pdu: int = 1 << 20,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU: `contexts` are (id, abstract syntax, syntaxes)."""

    def ae(value: bytes | str) -> bytes:
        raw = value.encode() if isinstance(value, str) else value
        return raw[:16].ljust(16, b" ")

    items = [_item(0x10, APPLICATION_CONTEXT)]
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(
            _item(0x40, ts.encode()) for ts in syntaxes
        )
        items.append(_item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4.5")
    items.append(_item(0x50, user))
    body = (
        struct.pack(">HH", 1, 0)
        + ae(called)
        + ae(calling)
        + b"\x00" * 32
        + b"".join(items)
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, control: int, value: bytes) -> bytes:
    """One P-DATA-TF PDU carrying one PDV."""
    pdv = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set with its group length."""
    body = b"".join(
        struct.pack("<HHI", 0, tag, len(_even(v))) + _even(v) for tag, v in elements
    )
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def c_store_rq(sop_class: str, sop_instance: str | bytes, msg_id: int = 1) -> bytes:
    instance = (
        sop_instance if isinstance(sop_instance, bytes) else sop_instance.encode()
    )
    return command_set(
        [
            (0x0002, sop_class.encode()),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", msg_id)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, instance),
        ]
    )


def c_echo_rq(msg_id: int = 1) -> bytes:
    return command_set(
        [
            (0x0002, VERIFICATION.encode()),
            (0x0100, struct.pack("<H", 0x0030)),
            (0x0110, struct.pack("<H", msg_id)),
            (0x0800, struct.pack("<H", 0x0101)),
        ]
    )


def encode_dataset(ds: Dataset, *, implicit: bool = False) -> bytes:
    """A dataset's bytes in (explicit or implicit) VR little endian, no file meta."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def parse_command(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 8 <= len(data):
        _group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


class Closed(Exception):
    """The receiver closed the connection (or aborted)."""


class RawPeer:
    """One TCP connection to the receiver, spoken to byte by byte."""

    def __init__(
        self, port: int, *, source: str = "127.0.0.1", host: str = "127.0.0.1"
    ):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind((source, 0))
        self.sock.settimeout(60)
        self.sock.connect((host, port))
        self.buffer = b""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int, timeout: float) -> bytes:
        self.sock.settimeout(timeout)
        while len(self.buffer) < n:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise Closed(f"closed after {len(self.buffer)} bytes")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def read_pdu(self, timeout: float = 60) -> tuple[int, bytes]:
        """The next PDU: (type, body without the 6-byte header)."""
        pdu_type, _, length = struct.unpack(">BBI", self._recv_exact(6, timeout))
        return pdu_type, self._recv_exact(length, timeout)

    def associate(self, contexts=None, **kwargs) -> tuple[int, bytes]:
        """Send an A-ASSOCIATE-RQ; return the answer PDU (type 2 = AC, 3 = RJ)."""
        contexts = contexts or [(1, CT_IMAGE, [EXPLICIT_LE]), (3, VERIFICATION,
                                                               [IMPLICIT_LE])]  # fmt: skip
        self.send(associate_rq(contexts, **kwargs))
        return self.read_pdu()

    def accepted_max_pdu(self, ac_body: bytes) -> int:
        """The maximum PDU length the receiver announced in its A-ASSOCIATE-AC."""
        pos = 68
        while pos + 4 <= len(ac_body):
            item_type, _, length = struct.unpack_from(">BBH", ac_body, pos)
            if item_type == 0x50:
                sub = pos + 4
                while sub < pos + 4 + length:
                    st, _, sl = struct.unpack_from(">BBH", ac_body, sub)
                    if st == 0x51:
                        return struct.unpack_from(">I", ac_body, sub + 4)[0]
                    sub += 4 + sl
            pos += 4 + length
        return 0

    def read_status(self, timeout: float = 60) -> int:
        """Read P-DATA PDUs up to the end of a command; return its Status."""
        command = b""
        while True:
            pdu_type, body = self.read_pdu(timeout)
            if pdu_type != 0x04:
                raise Closed(f"PDU type {pdu_type} instead of a response")
            pos = 0
            while pos < len(body):
                length, _cid, control = struct.unpack_from(">IBB", body, pos)
                command += body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & LAST:
                    return struct.unpack("<H", parse_command(command)[0x0900])[0]

    def store(
        self,
        dataset: bytes,
        *,
        sop_class: str = CT_IMAGE,
        sop_instance: str | bytes,
        context_id: int = 1,
        fragment: int = 1 << 16,
    ) -> int:
        """C-STORE `dataset` (its encoded bytes) in PDUs of `fragment` bytes."""
        self.send(p_data(context_id, COMMAND | LAST, c_store_rq(sop_class,
                                                                sop_instance)))  # fmt: skip
        for start in range(0, len(dataset), fragment):
            chunk = dataset[start : start + fragment]
            last = LAST if start + fragment >= len(dataset) else 0
            self.send(p_data(context_id, last, chunk))
        return self.read_status()

    def release(self) -> None:
        self.send(struct.pack(">BBIxxxx", 0x05, 0, 4))
        pdu_type, _ = self.read_pdu()
        assert pdu_type == 0x06, pdu_type

    def drip(self, data: bytes, *, every: float) -> None:
        """Send `data` one byte at a time, `every` seconds apart."""
        for i in range(len(data)):
            self.sock.sendall(data[i : i + 1])
            time.sleep(every)

    def wait_closed(self, timeout: float = 60) -> bytes:
        """Wait until the receiver closes; return what it sent before closing."""
        self.sock.settimeout(timeout)
        got = self.buffer
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return got
            if not data:
                return got
            got += data
