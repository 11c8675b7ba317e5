"""Storage Commitment on the receiver: answering a modality's request (SCP), and
delivering the answer on a new association when the request's association is gone.

A referenced instance is committed when its file is in the spool under a series
folder with the referenced SOP Class: a file gets there only by a rename after it
was made durable (its journal record flushed, which a starting receiver replays, or
the file and its folder fsynced), so what is found survives a crash. Anything else fails: 0x0112
(no such object) when no file has that SOP Instance UID, 0x0119 (class/instance
conflict) when the file holds another SOP class. The spool is what is looked at:
an instance already delivered to every target and removed from the spool is no
longer committed (modalities ask within seconds of sending; the spool keeps a
series until all its jobs are done).

The report goes back on the request's association while it is open (`scp`); if the
requester released or dropped it first, `ReportSender` opens a new association to
the address configured for its AE title (`COURIER_RECEIVER_COMMITMENT_PEERS`,
`AET=host:port`), trying again for a while if it cannot.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from config.safetext import log_fields
from targets.dicomnet.check import CorruptDataset, read_file_meta
from targets.dicomnet.commitment import (
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_OBJECT,
    Reference,
    Report,
    Request,
    send_report,
)
from targets.dicomnet.scu import LinkError

from .files import instance_file_name

log = logging.getLogger("courier.receiver")

# Seconds between tries to deliver a report on a new association (then given up).
RETRY_DELAYS = (0.0, 5.0, 30.0, 120.0)
# Reports waiting to be delivered on a new association; more are dropped (logged).
MAX_WAITING = 1000


def evaluate(
    request: Request, incoming: Path, open_instances: dict[str, Path]
) -> Report:
    """Decide each referenced instance of `request` from what the spool holds.

    `open_instances`: SOP Instance UID -> series folder, for the series the
    receiver has open (looked at first); the other series folders are listed only
    if a reference is not found there.
    """
    report = Report(request.transaction_uid)
    index: dict[str, Path] | None = None
    for ref in request.references:
        name = instance_file_name(ref.sop_instance)
        folder = open_instances.get(ref.sop_instance)
        path = folder / name if folder is not None else None
        if path is None or not path.is_file():
            if index is None:
                index = _spool_index(incoming)
            path = index.get(name)
        stored_class = _stored_sop_class(path) if path is not None else None
        if stored_class is None:
            failure: int | None = NO_SUCH_OBJECT
        elif stored_class != ref.sop_class:
            failure = CLASS_INSTANCE_CONFLICT
        else:
            failure = None
        if failure is None:
            report.committed.append(Reference(ref.sop_class, ref.sop_instance))
        else:
            report.failed.append(Reference(ref.sop_class, ref.sop_instance, failure))
    return report


def _spool_index(incoming: Path) -> dict[str, Path]:
    """Every instance file in the spool's series folders, by file name."""
    found: dict[str, Path] = {}
    try:
        folders = [e for e in os.scandir(incoming) if e.is_dir()]
    except OSError:
        return found
    for folder in folders:
        if folder.name.startswith("."):  # .partial: not yet acknowledged
            continue
        try:
            with os.scandir(folder.path) as it:
                for entry in it:
                    if entry.name.endswith(".dcm"):
                        found.setdefault(entry.name, Path(entry.path))
        except OSError:
            continue
    return found


def _stored_sop_class(path: Path) -> str | None:
    """The Media Storage SOP Class UID in a stored file's meta, or None."""
    try:
        raw = read_file_meta(path).get(0x00020002)
    except (OSError, CorruptDataset):
        return None
    return raw.rstrip(b"\x00 ").decode("ascii", "replace") if raw else None


def parse_peers(entries: Iterable[str]) -> dict[str, tuple[str, int]]:
    """`AET=host:port` entries as {AE title: (host, port)}; ValueError in words."""
    peers = {}
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        aet, eq, address = entry.partition("=")
        host, colon, port = address.strip().rpartition(":")
        aet, host = aet.strip(), host.strip().strip("[]")
        if not (eq and colon and aet and host and port.isdigit()):
            raise ValueError(f"{entry!r} is not AET=host:port")
        if len(aet) > 16 or not all(" " <= c <= "~" and c != "\\" for c in aet):
            raise ValueError(f"{aet!r} is not an AE title (16 characters at most)")
        if not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r}: the port must be 1-65535")
        peers[aet] = (host, int(port))
    return peers


class ReportSender:
    """Delivers reports on new associations, from one thread, retrying a while.

    `peers`: {requester's AE title: (host, port)}. `calling_aet` is what Courier
    calls itself on these associations when the request did not name it.
    """

    def __init__(
        self,
        peers: dict[str, tuple[str, int]],
        calling_aet: str,
        *,
        delays: tuple[float, ...] = RETRY_DELAYS,
        timeout: float = 30.0,
    ):
        self.peers = peers
        self.calling_aet = calling_aet
        self.delays = delays
        self.timeout = timeout
        self._due: list[tuple[float, int, int, Request, Report]] = []
        self._count = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def deliver(self, request: Request, report: Report) -> None:
        """Queue `report` for `request`'s requester (or log why it cannot go)."""
        fields = {
            "calling_aet": request.calling_aet,
            "transaction": report.transaction_uid,
        }
        if request.calling_aet not in self.peers:
            log.error(
                "event=commitment_report_undeliverable %s",
                log_fields(
                    **fields,
                    reason="the requester left before the report and its AE title "
                    "has no address in COURIER_RECEIVER_COMMITMENT_PEERS",
                ),
            )
            return
        with self._cond:
            if len(self._due) >= MAX_WAITING:
                log.error(
                    "event=commitment_report_dropped %s",
                    log_fields(**fields, reason=f"{MAX_WAITING} reports waiting"),
                )
                return
            self._count += 1
            heapq.heappush(self._due, (time.monotonic(), self._count, 0,
                                       request, report))  # fmt: skip
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="commitment-reports", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (
                    not self._due or self._due[0][0] > time.monotonic()
                ):
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(wait)
                if self._stopping:
                    return
                _, count, tried, request, report = heapq.heappop(self._due)
            try:
                self._send(request, report)
            except LinkError as exc:
                tried += 1
                final = tried >= len(self.delays)
                log.log(
                    logging.ERROR if final else logging.WARNING,
                    "event=commitment_report_failed %s",
                    log_fields(
                        calling_aet=request.calling_aet,
                        transaction=report.transaction_uid,
                        attempt=tried,
                        reason=exc,
                        next="none (given up)" if final else f"{self.delays[tried]} s",
                    ),
                )
                if not final:
                    with self._cond:
                        heapq.heappush(
                            self._due,
                            (time.monotonic() + self.delays[tried], count, tried,
                             request, report),
                        )  # fmt: skip
            except Exception:
                log.exception("event=commitment_report_failed")

    def _send(self, request: Request, report: Report) -> None:
        host, port = self.peers[request.calling_aet]
        send_report(
            host,
            port,
            calling_aet=request.called_aet or self.calling_aet,
            called_aet=request.calling_aet,
            report=report,
            timeout=self.timeout,
        )
        log.info(
            "event=commitment_reported %s",
            log_fields(
                calling_aet=request.calling_aet,
                peer=f"{host}:{port}",
                transaction=report.transaction_uid,
                committed=len(report.committed),
                failed=len(report.failed),
                association="new",
            ),
        )
