"""Socket tuning for pynetdicom, shared by every DICOM sender, query and receiver.

pynetdicom (like dcmtk) leaves Nagle's algorithm on. With the peer's delayed ACK that
costs ~40 ms per write-write-read exchange: about 90 ms per C-STORE on loopback. It has
no option for TCP_NODELAY, so the two places that make its sockets are wrapped here.
"""

from __future__ import annotations

import socket
import threading

_lock = threading.Lock()
_done = False


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket (tests may use socketpairs)


def enable_tcp_nodelay() -> None:
    """Make every pynetdicom requestor and acceptor socket use TCP_NODELAY (idempotent)."""
    global _done
    with _lock:
        if _done:
            return
        # Here, not at the top: Courier's own sender (targets.dicomnet.scu) uses
        # `_nodelay` without importing pynetdicom (and with it pydicom and numpy).
        from pynetdicom import transport

        create = transport.AssociationSocket._create_socket
        accept = transport.AssociationServer.get_request

        def _create_socket(self, address):
            sock = create(self, address)
            _nodelay(sock)
            return sock

        def get_request(self):
            sock, address = accept(self)
            _nodelay(sock)
            return sock, address

        transport.AssociationSocket._create_socket = _create_socket
        transport.AssociationServer.get_request = get_request
        _done = True
