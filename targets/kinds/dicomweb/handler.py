"""DICOMweb targets: STOW-RS in batches streamed from disk, QIDO-RS for the Test.

A series is never read into memory: each STOW-RS request body is a
`multipart/related` stream assembled from the files as the socket takes it, with
its length known up front (no chunked encoding, which some servers refuse). Memory
is therefore bounded by one read buffer, not by the batch or the series. Each
response is checked instance by instance (PS3.18 10.5.3): referenced instances are
sent (with their warning kept), failed ones are recorded with the failure reason in
words. Requests go through the HTTP seam (`targets.http`).

A `file://` URL names a local folder: the proxy hands out `local.py`'s classes for
it instead of these.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from targets import http
from targets.dicomnet.status import in_words
from targets.kinds.base import (
    FAILED,
    SENT,
    WARNING,
    CheckReport,
    Handler,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    instance_outcome,
)
from targets.series import Instance, Series

# DICOM JSON tags of a STOW-RS response (PS3.18 Table 10.5.3-1).
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

READ_BLOCK = 256 * 1024


def status_in_words(code: int) -> str:
    """Return a STOW-RS failure or warning reason as words with its code."""
    return in_words(code, "stow")


class MultipartBody:
    """A `multipart/related; type="application/dicom"` body read from files lazily.

    `requests` sends it with a Content-Length (from `len()`) and pulls it through
    `read()`, so only one block of one file is in memory at a time.
    """

    def __init__(self, paths: list[Path], boundary: str | None = None):
        self.boundary = boundary or f"courier-{uuid.uuid4().hex}"
        self._head = (
            f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        )
        self._sep = b"\r\n"
        self._tail = f"--{self.boundary}--\r\n".encode()
        self._paths = list(paths)
        self._length = sum(
            len(self._head) + p.stat().st_size + len(self._sep) for p in self._paths
        ) + len(self._tail)
        self._parts = self._generate()
        self._chunk = memoryview(b"")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(READ_BLOCK):
            yield chunk

    def _generate(self) -> Iterator[bytes]:
        for path in self._paths:
            yield self._head
            with open(path, "rb") as fh:
                while block := fh.read(READ_BLOCK):
                    yield block
            yield self._sep
        yield self._tail

    def read(self, size: int = -1) -> bytes:
        """Return up to `size` bytes (fewer at a part boundary; b"" at the end)."""
        if size is None or size < 0:
            size = READ_BLOCK
        while not self._chunk:
            try:
                self._chunk = memoryview(next(self._parts))
            except StopIteration:
                return b""
        chunk, self._chunk = self._chunk[:size], self._chunk[size:]
        return bytes(chunk)


def _sequence_uids(payload: dict, tag: str, reason_tag: str) -> dict[str, int | None]:
    """Map SOP Instance UID -> reason code (or None) for one response sequence."""
    found: dict[str, int | None] = {}
    for item in (payload.get(tag) or {}).get("Value") or []:
        uids = (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []
        reasons = (item.get(reason_tag) or {}).get("Value") or []
        for uid in uids:
            found[str(uid)] = int(reasons[0]) if reasons else None
    return found


def _http_reason(resp: requests.Response) -> str:
    return f"HTTP {resp.status_code} {resp.reason or ''}".strip()


class DicomWebHandler(Handler):
    @property
    def base_url(self) -> str:
        return (self.target.url or "").rstrip("/")

    def service_url(self, service: str) -> str:
        """Base URL plus the QIDO or STOW prefix (as dicomweb-client joins them)."""
        prefix = (getattr(self.target, f"{service}_prefix") or "").strip("/")
        return f"{self.base_url}/{prefix}" if prefix else self.base_url

    def http_session(self) -> http.HttpSession:
        """A session with the target's authentication, TLS and timeout."""
        return http.session_for(self.target, credentials=True)

    # -- errors in words -----------------------------------------------------------
    def _auth_error(self, resp: requests.Response) -> TargetError:
        if resp.status_code == 401:
            hint = {
                "basic": "check the username and password",
                "bearer": "check the bearer token (it may have expired)",
            }.get(self.target.auth, "the server requires authentication: set it here")
            return TargetError(
                f"authentication failed: the server answered {_http_reason(resp)} "
                f"— {hint}",
                permanent=True,
            )
        if self.target.auth not in ("basic", "bearer"):
            why = "it refuses anonymous access: set the authentication"
        else:
            why = "the credentials are valid but not allowed to do this"
        return TargetError(
            f"forbidden: the server answered {_http_reason(resp)} — {why}",
            permanent=True,
        )

    def _request(self, session: requests.Session, method: str, url: str, **kwargs):
        """Send one request; turn transport failures into TargetErrors in words."""
        where = http.netloc(url)
        try:
            return http.send(session, method, url, **kwargs)
        except http.NoAnswer as exc:
            if exc.cause == http.TLS:
                raise TargetError(
                    f"TLS failed with {where}: {exc.words} — check the CA bundle or "
                    "the server's certificate",
                    permanent=True,
                ) from None
            if exc.cause == http.TIMEOUT:
                raise TargetError(
                    f"no answer from {where} within "
                    f"{self.target.request_timeout:g} s (request timeout)"
                ) from None
            if exc.cause == http.CONNECT:
                raise TargetError(f"cannot connect to {where}: {exc.words}") from None
            raise TargetError(f"the request to {where} failed: {exc.words}") from None
        except OSError as exc:
            # Reading a file of the body failed: the series changed under us.
            raise TargetError(f"cannot read a file of the series: {exc}") from None

    # -- send -------------------------------------------------------------------------
    def send(
        self,
        series: Series,
        *,
        progress: ProgressCallback | None = None,
        context: SendContext | None = None,
        connections: int | None = None,
    ) -> SendResult:
        result, report = self.start(progress)
        batches = list(self._batches(series.instances))
        workers = self.connection_count(connections, len(batches))
        order = {str(inst.path): i for i, inst in enumerate(series.instances)}
        try:
            if workers == 1:
                self._stow_batches(
                    iter(batches), threading.Lock(), None, report, result
                )
            else:
                self._send_parallel(batches, workers, report, result)
        finally:
            result.outcomes.sort(key=lambda o: order.get(o.path, 0))
        return result

    def _stow_batches(self, batches, lock, stop, report, result) -> None:
        """Send batches taken from a shared iterator until it is empty or `stop`."""
        session = self.http_session()
        try:
            while stop is None or not stop.is_set():
                with lock:
                    batch = next(batches, None)
                if batch is None:
                    return
                self._stow(session, batch, report, result)
        except BaseException:
            if stop is not None:
                stop.set()
            raise
        finally:
            session.close()

    def _send_parallel(self, batches, workers: int, report, result) -> None:
        # Several requests at once, one connection each (the connections this send
        # may use). A server that spends its time storing rather than receiving
        # gains most from this.
        shared, lock, stop = iter(batches), threading.Lock(), threading.Event()
        with ThreadPoolExecutor(workers, thread_name_prefix="stow") as pool:
            futures = [
                pool.submit(self._stow_batches, shared, lock, stop, report, result)
                for _ in range(workers)
            ]
        errors = [f.exception() for f in futures if f.exception()]
        if errors:
            raise errors[0]

    def _batches(self, instances: list[Instance]) -> Iterator[list[Instance]]:
        limit = max(1, self.target.stow_batch_size)
        max_bytes = self.target.stow_max_bytes
        batch: list[Instance] = []
        size = 0
        for inst in instances:
            if batch and (len(batch) >= limit or size + inst.size > max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(inst)
            size += inst.size
        if batch:
            yield batch

    def _stow(self, session, batch: list[Instance], report, result: SendResult) -> None:
        url = f"{self.service_url('stow')}/studies"
        readable = []
        for inst in batch:
            if os.access(inst.path, os.R_OK):
                readable.append(inst)
            else:
                report(instance_outcome(inst, FAILED, "the file is gone or unreadable"))
        batch = readable
        if not batch:
            return
        try:
            body = MultipartBody([i.path for i in batch])
        except OSError as exc:
            raise TargetError(f"cannot read a file of the series: {exc}") from None
        resp = self._request(
            session,
            "POST",
            url,
            data=body,
            headers={
                "Content-Type": body.content_type,
                "Accept": "application/dicom+json",
            },
        )
        status = resp.status_code
        if status in (401, 403):
            raise self._auth_error(resp)
        if status == 413 and len(batch) > 1:
            # The server's limit is below ours: halve the batch until it fits.
            half = len(batch) // 2
            result.notes.append(
                f"the server refused {len(batch)} instances in one request "
                f"({_http_reason(resp)}); sent in smaller requests — lower "
                "'max STOW request size'"
            )
            self._stow(session, batch[:half], report, result)
            self._stow(session, batch[half:], report, result)
            return
        if status in (404, 405):
            raise TargetError(
                f"no STOW-RS endpoint at {url}: the server answered "
                f"{_http_reason(resp)} — check the URL and the STOW prefix",
                permanent=True,
            )
        if status == 415:
            raise TargetError(
                f"the server does not accept DICOM files by STOW-RS ({_http_reason(resp)})",
                permanent=True,
            )
        if status >= 500 or status in (408, 429):
            raise TargetError(
                f"the server failed the STOW-RS request: {_http_reason(resp)}"
            )
        try:
            payload = resp.json() if resp.content else {}
        except ValueError:
            payload = {}
        if isinstance(payload, list):
            payload = payload[0] if payload else {}
        referenced = _sequence_uids(payload, REFERENCED_SOP_SEQUENCE, WARNING_REASON)
        failed = _sequence_uids(payload, FAILED_SOP_SEQUENCE, FAILURE_REASON)
        if status >= 300 and not (referenced or failed):
            if 400 <= status < 500 and status not in (400, 409, 413):
                raise TargetError(
                    f"the server refused the STOW-RS request: {_http_reason(resp)}",
                    permanent=True,
                )
        for inst in batch:
            uid = inst.sop_instance_uid
            if uid in failed:
                reason = failed[uid]
                words = (
                    status_in_words(reason) if reason is not None else "no reason given"
                )
                report(
                    instance_outcome(inst, FAILED, f"refused by the server: {words}")
                )
            elif uid in referenced:
                reason = referenced[uid]
                if reason is not None:
                    report(
                        instance_outcome(
                            inst,
                            WARNING,
                            f"stored with a warning: {status_in_words(reason)}",
                        )
                    )
                else:
                    report(instance_outcome(inst, SENT))
            elif status in (200, 202) and not referenced and not failed:
                # A server that answers success without listing instances (allowed
                # for 200 by some implementations) stored the whole request.
                report(
                    instance_outcome(
                        inst, SENT, f"{_http_reason(resp)}, no instance list"
                    )
                )
            elif status == 413:
                report(
                    instance_outcome(
                        inst, FAILED, f"too large for the server ({_http_reason(resp)})"
                    )
                )
            else:
                report(
                    instance_outcome(
                        inst,
                        FAILED,
                        f"not acknowledged by the server ({_http_reason(resp)})",
                    )
                )

    # -- test --------------------------------------------------------------------------
    def test(self) -> CheckReport:
        result = CheckReport()
        session = self.http_session()
        try:
            self._test_http(session, result)
        finally:
            session.close()
        return result

    def _test_http(self, session: requests.Session, result: CheckReport) -> None:
        t = self.target
        qido = f"{self.service_url('qido')}/studies"
        resp = None
        with result.check("Reachable") as c:
            start = time.perf_counter()
            resp = self._request(
                session,
                "GET",
                qido,
                params={"limit": 1},
                headers={"Accept": "application/dicom+json"},
            )
            c.message = (
                f"{http.netloc(qido)} answered {_http_reason(resp)} in "
                f"{(time.perf_counter() - start) * 1000:.0f} ms"
            )
        if result.stopped or resp is None:
            return
        with result.check("Authentication") as c:
            if resp.status_code in (401, 403):
                raise self._auth_error(resp)
            c.message = {
                "basic": f"user {t.username} accepted",
                "bearer": "bearer token accepted",
            }.get(t.auth, "no authentication configured, none required")
        if result.stopped:
            return
        with result.check(
            "QIDO-RS studies?limit=1", informational=not t.is_query_source
        ) as c:
            if resp.status_code == 204:
                c.message = "answered: no studies (204 No Content)"
            elif resp.status_code != 200:
                raise TargetError(
                    f"{qido} answered {_http_reason(resp)} — check the URL and the "
                    "QIDO prefix"
                )
            else:
                try:
                    found = resp.json()
                except ValueError:
                    raise TargetError(
                        f"{qido} answered 200 but not with DICOM JSON "
                        f"(Content-Type {resp.headers.get('Content-Type', 'none')}) — "
                        "is this a DICOMweb endpoint?"
                    ) from None
                if not isinstance(found, list):
                    raise TargetError("the QIDO-RS answer is not a list of studies")
                c.message = f"answered with {len(found)} stud{'y' if len(found) == 1 else 'ies'}"
        if t.can_store:
            with result.check("STOW-RS") as c:
                c.message = self._probe_stow(session)

    def _probe_stow(self, session: requests.Session) -> str:
        """POST a multipart body with no instances: nothing is stored, but the answer
        shows whether the endpoint exists and lets these credentials store."""
        url = f"{self.service_url('stow')}/studies"
        body = MultipartBody([])
        resp = self._request(
            session,
            "POST",
            url,
            data=body,
            headers={
                "Content-Type": body.content_type,
                "Accept": "application/dicom+json",
            },
        )
        if resp.status_code in (401, 403):
            raise self._auth_error(resp)
        if resp.status_code in (404, 405, 501):
            raise TargetError(
                f"no STOW-RS endpoint at {url}: {_http_reason(resp)} — check the URL "
                "and the STOW prefix"
            )
        if resp.status_code >= 500:
            raise TargetError(f"the STOW-RS endpoint failed: {_http_reason(resp)}")
        return (
            f"{url} answered {_http_reason(resp)} to an empty STOW-RS request "
            "(nothing stored)"
        )
