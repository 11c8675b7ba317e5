"""A raw-socket storage SCP whose A-ASSOCIATE-AC and framing are chosen by the test:
unusual maximum PDU lengths, extra user information sub-items, PDUs written one byte
at a time or several in one write, an A-ASSOCIATE-RJ or A-ABORT at a chosen point.
It records the PDUs the sender sent and the datasets it received."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def items(data: bytes, pos: int):
    while pos + 4 <= len(data):
        kind, _, length = struct.unpack_from(">BBH", data, pos)
        yield kind, data[pos + 4 : pos + 4 + length]
        pos += 4 + length


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def associate_ac(rq: bytes, *, max_pdu: int | None, extra: bytes = b"") -> bytes:
    """Accept every proposed context with its first transfer syntax; announce
    `max_pdu` (None: no Maximum Length sub-item) and the `extra` sub-items."""
    out = [item(0x10, b"1.2.840.10008.3.1.1.1")]
    for kind, body in items(rq, 6 + 68):
        if kind == 0x20:
            first = next(v for k, v in items(body, 4) if k == 0x40)
            out.append(item(0x21, bytes([body[0], 0, 0, 0]) + item(0x40, first)))
    user = b"" if max_pdu is None else item(0x51, struct.pack(">I", max_pdu))
    user += item(0x52, b"1.2.3.4") + extra
    out.append(item(0x50, user))
    return pdu(0x02, rq[6 : 6 + 68] + b"".join(out))


def store_rsp(context_id: int, command: bytes, status: int = 0) -> bytes:
    """A C-STORE-RSP to the C-STORE-RQ `command` (implicit VR LE command set)."""
    fields, pos = {}, 0
    while pos + 8 <= len(command):
        _g, elem, length = struct.unpack_from("<HHI", command, pos)
        fields[elem] = command[pos + 8 : pos + 8 + length]
        pos += 8 + length

    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, elem, len(value)) + value

    body = (
        element(0x0002, fields[0x0002])
        + element(0x0100, struct.pack("<H", 0x8001))
        + element(0x0120, fields[0x0110])
        + element(0x0800, struct.pack("<H", 0x0101))
        + element(0x0900, struct.pack("<H", status))
        + element(0x1000, fields[0x1000])
    )
    cmd = element(0x0000, struct.pack("<I", len(body))) + body
    return pdu(0x04, struct.pack(">IBB", len(cmd) + 2, context_id, 0x03) + cmd)


class OddPeer:
    """Serves one association. `answer(rq) -> bytes` makes the association answer
    (default: an AC per `max_pdu`/`extra`); `write(conn, data)` sends (default: all
    at once); `coalesce_release`: the A-RELEASE-RP goes out with the last response."""

    def __init__(
        self,
        *,
        max_pdu: int | None = 16384,
        extra: bytes = b"",
        answer: Callable[[bytes], bytes] | None = None,
        write: Callable[[socket.socket, bytes], None] | None = None,
        abort_after_stores: int | None = None,
        silent: bool = False,
        before_response: Callable[[socket.socket, int], None] | None = None,
        on_release: Callable[[socket.socket], None] | None = None,
    ):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer = answer or (lambda rq: associate_ac(rq, max_pdu=max_pdu,
                                                         extra=extra))  # fmt: skip
        self.write = write or (lambda conn, data: conn.sendall(data))
        self.abort_after_stores = abort_after_stores
        # After its answer, only read until the sender closes (a peer that sent an
        # A-ABORT waits for the transport to close, PS3.8 Sta13).
        self.silent = silent
        # Called with the connection and the context id before each response.
        self.before_response = before_response
        # Called with the connection when the sender asks to release, before the
        # A-RELEASE-RP; then whatever the sender still sends is recorded.
        self.on_release = on_release
        self.pdata_lengths: list[int] = []
        self.datasets: list[bytes] = []
        self.received: list[int] = []  # PDU types
        self.done = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    @staticmethod
    def exactly(conn: socket.socket, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = conn.recv(min(n - len(data), 1 << 20))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return bytes(data)

    def read_pdu(self, conn: socket.socket) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self.exactly(conn, 6))
        self.received.append(kind)
        return kind, self.exactly(conn, length)

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(30)
        try:
            _, rq = self.read_pdu(conn)
            answer = self.answer(pdu(0x01, rq))
            self.write(conn, answer)
            if answer[:1] != b"\x02":
                return
            if self.silent:
                while True:
                    self.read_pdu(conn)
            command, dataset = bytearray(), bytearray()
            while True:
                kind, body = self.read_pdu(conn)
                if kind == 0x05:
                    if self.on_release is not None:
                        self.on_release(conn)
                    self.write(conn, pdu(0x06, bytes(4)))
                    conn.settimeout(5)
                    while True:
                        self.read_pdu(conn)
                if kind != 0x04:
                    return
                self.pdata_lengths.append(len(body))
                pos = 0
                while pos + 6 <= len(body):
                    (length,) = struct.unpack_from(">I", body, pos)
                    cid, control = body[pos + 4], body[pos + 5]
                    value = body[pos + 6 : pos + 4 + length]
                    pos += 4 + length
                    (command if control & 1 else dataset).extend(value)
                    if control & 2 and not control & 1:
                        self.datasets.append(bytes(dataset))
                        dataset.clear()
                        if self.abort_after_stores == len(self.datasets):
                            self.write(conn, pdu(0x07, bytes(4)))
                            return
                        if self.before_response is not None:
                            self.before_response(conn, cid)
                        self.write(conn, store_rsp(cid, bytes(command)))
                        command.clear()
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            self.listener.close()
            self.done.set()


def bytewise(conn: socket.socket, data: bytes) -> None:
    """Every byte in its own TCP segment (TCP_NODELAY)."""
    for i in range(len(data)):
        conn.sendall(data[i : i + 1])


def command_fragment(context_id: int, data: bytes) -> bytes:
    """A P-DATA-TF with one command PDV that is not the command's last."""
    return pdu(0x04, struct.pack(">IBB", len(data) + 2, context_id, 0x01) + data)
