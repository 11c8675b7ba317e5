"""A DICOM node as a query source: C-FIND (Study Root), then C-GET or C-MOVE.

Shaped like pynetdicom's findscu/getscu/movescu apps: one association per operation,
explicit timeouts from the target, every status checked, and the association always
released (or aborted when something went wrong part-way).
"""

# Why this module is long: C-FIND, C-GET and C-MOVE share one association
# set-up and one way of putting a refusal, a silent peer or a status in words.

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, Association, build_role, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from targets.dicomnet.scu import LinkError, connect
from targets.dicomnet.sockets import enable_tcp_nodelay
from targets.paths import UnsafePath
from targets.query import (
    Cancelled,
    Criteria,
    FoundSeries,
    FoundStudy,
    QuerySource,
    RetrieveProgress,
    RetrieveRequest,
    RetrieveResult,
    SeriesFolders,
    SourceError,
    StudySearch,
)

# Offered for every storage SOP class on a C-GET: uncompressed first, then the common
# compressed syntaxes so the source can send what it stores without transcoding.
GET_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

PENDING = (0xFF00, 0xFF01)

STATUS_WORDS = {
    0x0122: "SOP class not supported",
    0xA700: "out of resources",
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown (the source does not know that AE title)",
    0xA900: "identifier does not match the SOP class",
    0xAA00: "none of the frames requested were found",
    0xFE00: "cancelled",
}


def status_words(status: Dataset) -> str:
    code = int(status.Status)
    words = STATUS_WORDS.get(code)
    if words is None and 0xC000 <= code <= 0xCFFF:
        words = "unable to process"
    words = words or "failed"
    comment = str(status.get("ErrorComment", "") or "").strip()
    return f"{words} (0x{code:04X})" + (f": {comment}" if comment else "")


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


class DicomQuery(QuerySource):
    # -- association ---------------------------------------------------------------
    @contextmanager
    def associate(
        self, contexts: list, *, roles: list | None = None, handlers: list | None = None
    ) -> Iterator[Association]:
        """Open an association proposing `contexts`; release or abort it afterwards."""
        enable_tcp_nodelay()
        t = self.target
        ae = AE(ae_title=t.calling_aet or settings.COURIER_AE_TITLE)
        ae.connection_timeout = t.connect_timeout
        ae.acse_timeout = t.acse_timeout
        ae.dimse_timeout = t.dimse_timeout
        # Idle time on the socket: a retrieve may wait while the source fetches data.
        ae.network_timeout = max(t.dimse_timeout, 60.0)
        ae.maximum_pdu_size = t.max_pdu
        for context in contexts:
            if isinstance(context, tuple):
                ae.add_requested_context(*context)
            else:
                ae.add_requested_context(context)
        received: list = []
        opened: list = []
        evt_handlers = [
            (evt.EVT_ACSE_RECV, lambda e: received.append(e.primitive)),
            (evt.EVT_CONN_OPEN, lambda e: opened.append(True)),
        ]
        self._resolve()
        started = time.monotonic()
        try:
            assoc = ae.associate(
                t.host,
                t.port,
                ae_title=t.called_aet,
                ext_neg=roles or None,
                evt_handlers=evt_handlers + (handlers or []),
            )
        except (OSError, ValueError) as exc:  # pynetdicom checks some input itself
            raise SourceError(
                f"Cannot open an association with {t.host}:{t.port}: {exc}."
            ) from exc
        if not assoc.is_established:
            waited = time.monotonic() - started
            raise SourceError(self._why_not(assoc, received, bool(opened), waited))
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        else:
            if assoc.is_established:
                assoc.release()
            if assoc.is_established:  # pragma: no cover - a peer that never answers
                assoc.abort()

    def _resolve(self) -> None:
        """Fail in words when the host name does not resolve (pynetdicom raises)."""
        t = self.target
        if not t.host:
            raise SourceError("No host is configured for this source.")
        try:
            socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise SourceError(
                f"Source unreachable: the host name {t.host!r} does not resolve "
                f"({exc.strerror}). Check the host in the target's settings, and "
                "the name server."
            ) from exc
        except (UnicodeError, ValueError) as exc:
            raise SourceError(f"{t.host!r} is not a valid host name.") from exc

    def _why_not(
        self, assoc: Association, received: list, connected: bool, waited: float
    ) -> str:
        t = self.target
        where = f"{t.host}:{t.port}"
        answer = next((p for p in received if hasattr(p, "result")), None)
        if assoc.is_rejected and answer is not None:
            reason = answer.reason_str
            hint = ""
            if "called ae title" in reason.lower():
                hint = f" (check the target AET, {t.called_aet!r})"
            elif "calling ae title" in reason.lower():
                hint = f" (the source does not know Courier's AET {t.calling_aet!r})"
            return f"Association rejected by {where}: {reason}{hint}."
        if answer is not None:
            return (
                f"{where} accepted the association but none of the query/retrieve "
                "services Courier proposed."
            )
        if not connected:
            if waited >= t.connect_timeout * 0.9:
                return (
                    f"Source unreachable: no answer from {where} within "
                    f"{t.connect_timeout:g} s (connection timeout): check the host, "
                    "the port and firewalls."
                )
            # pynetdicom logs why the connection failed but does not say: ask the
            # network once more, only now that something is wrong.
            try:
                connect(t.host, t.port, t.connect_timeout).close()
            except LinkError as exc:
                return f"Source unreachable: {exc}."
            return f"Source unreachable: Courier could not connect to {where}."
        if received:
            return (
                f"{where} accepted the connection but aborted the association: is "
                f"it a DICOM port, and does it accept Courier's AE title "
                f"{t.calling_aet!r}?"
            )
        return (
            f"{where} accepted the connection but did not answer the association "
            f"request within {t.acse_timeout:g} s: is it a DICOM port?"
        )

    def _lost(self, assoc: Association, what: str, started: float) -> str:
        waited = time.monotonic() - started
        if waited < self.target.dimse_timeout * 0.9:
            # No timeout: the peer dropped the association. Orthanc, for one, does
            # that rather than answer a service it does not allow to this AE title.
            return (
                f"{what} refused: the source closed the association (does it allow "
                f"{what} from Courier's AE title {self.target.calling_aet!r}?)."
            )
        return (
            f"The source stopped answering the {what} within "
            f"{self.target.dimse_timeout:g} s."
        )

    # -- C-FIND --------------------------------------------------------------------
    def _c_find(
        self,
        identifier: Dataset,
        limit: int | None = None,
        assoc: Association | None = None,
    ) -> tuple[list, bool]:
        """Return (matches, truncated), on `assoc` or on an association of its own.

        More than `limit` matches end an own association at once; on a shared one
        the rest of the answers are read and dropped.
        """
        if assoc is None:
            with self.associate([StudyRootQueryRetrieveInformationModelFind]) as own:
                matches, truncated = self._c_find_on(own, identifier, limit, True)
                if truncated:
                    own.abort()  # no use waiting for the rest
            return matches, truncated
        return self._c_find_on(assoc, identifier, limit, False)

    def _c_find_on(
        self, assoc: Association, identifier: Dataset, limit: int | None, stop: bool
    ) -> tuple[list, bool]:
        matches: list[Dataset] = []
        truncated = False
        started = time.monotonic()
        responses = assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        )
        for status, found in responses:
            if not status:
                raise SourceError(self._lost(assoc, "C-FIND", started))
            started = time.monotonic()
            code = int(status.Status)
            if code in PENDING:
                if limit is not None and len(matches) >= limit:
                    truncated = True
                    if stop:
                        break
                    continue
                matches.append(found)
            elif code in (0x0000, 0xFE00):
                break
            else:
                raise SourceError(
                    f"C-FIND refused by the source: {status_words(status)}."
                )
        return matches, truncated

    def find_studies(self, criteria: Criteria, limit: int) -> StudySearch:
        if len(criteria.accessions) <= 1:
            return self.search_accession_list(criteria, limit, self._find_studies)
        # A list of accessions: one C-FIND each, all on one association.
        with self.associate([StudyRootQueryRetrieveInformationModelFind]) as assoc:
            return self.search_accession_list(
                criteria, limit, lambda c, n: self._find_studies(c, n, assoc)
            )

    def _find_studies(
        self, criteria: Criteria, limit: int, assoc: Association | None = None
    ) -> StudySearch:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = criteria.study_uid
        ds.PatientID = criteria.patient_id
        ds.PatientName = criteria.patient_name
        ds.PatientBirthDate = ""
        ds.StudyDate = criteria.date_range
        ds.StudyTime = ""
        ds.AccessionNumber = criteria.accessions[0] if criteria.accessions else ""
        ds.StudyDescription = criteria.study_description
        ds.ModalitiesInStudy = criteria.modality.upper()
        ds.NumberOfStudyRelatedSeries = None
        ds.NumberOfStudyRelatedInstances = None
        found, truncated = self._c_find(ds, limit, assoc)
        studies = [
            FoundStudy(
                study_uid=_text(r, "StudyInstanceUID"),
                patient_id=_text(r, "PatientID"),
                patient_name=_text(r, "PatientName"),
                birth_date=_text(r, "PatientBirthDate"),
                study_date=_text(r, "StudyDate"),
                study_time=_text(r, "StudyTime"),
                accession=_text(r, "AccessionNumber"),
                description=_text(r, "StudyDescription"),
                modalities=[m for m in _text(r, "ModalitiesInStudy").split("\\") if m],
                series_count=_int(r.get("NumberOfStudyRelatedSeries")),
                instance_count=_int(r.get("NumberOfStudyRelatedInstances")),
            )
            for r in found
            if r is not None
        ]
        studies.sort(key=lambda s: (s.study_date, s.study_time), reverse=True)
        return StudySearch(studies=studies, truncated=truncated)

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.SeriesNumber = None
        ds.Modality = ""
        ds.SeriesDescription = ""
        ds.NumberOfSeriesRelatedInstances = None
        found, _ = self._c_find(ds)
        series = [
            FoundSeries(
                series_uid=_text(r, "SeriesInstanceUID"),
                study_uid=study_uid,
                number=_int(r.get("SeriesNumber")),
                modality=_text(r, "Modality"),
                description=_text(r, "SeriesDescription"),
                instance_count=_int(r.get("NumberOfSeriesRelatedInstances")),
            )
            for r in found
            if r is not None
        ]
        series.sort(key=lambda s: (s.number is None, s.number or 0, s.series_uid))
        return series

    # -- C-GET / C-MOVE ------------------------------------------------------------
    def _identifiers(self, request: RetrieveRequest) -> list[Dataset]:
        """One identifier per series asked for, or one for the whole study."""
        out = []
        for series_uid in request.series_uids or [None]:
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
            ds.StudyInstanceUID = request.study_uid
            if series_uid:
                ds.SeriesInstanceUID = series_uid
            out.append(ds)
        return out

    def retrieve(
        self, request: RetrieveRequest, dest: Path, progress: RetrieveProgress
    ) -> RetrieveResult:
        if request.move_aet:
            return self._move(request, progress)
        return self._get(request, dest, progress)

    def _get(
        self, request: RetrieveRequest, dest: Path, progress: RetrieveProgress
    ) -> RetrieveResult:
        result = RetrieveResult()
        folders = SeriesFolders(dest)
        lock = threading.Lock()
        write_errors: list[str] = []
        # A whole study is fetched series by series: the total is known from the
        # start, and each instance's series need not be decoded from its dataset.
        known_total = None
        if not request.series_uids:
            series = self.find_series(request.study_uid)
            if series:
                request = RetrieveRequest(
                    request.study_uid, [s.series_uid for s in series], request.move_aet
                )
                counts = [s.instance_count for s in series]
                if None not in counts:
                    known_total = sum(counts)
                    progress(0, known_total, 0)
        current: list[str | None] = [None]

        def on_store(event) -> int:
            try:
                sop_uid = str(event.request.AffectedSOPInstanceUID)
                series_uid = current[0] or str(event.dataset.SeriesInstanceUID)
                with lock:
                    path = folders.path_for(series_uid, sop_uid)
                path.write_bytes(event.encoded_dataset(include_meta=True))
            except UnsafePath as exc:
                write_errors.append(f"refused: {exc}")
                return 0xC210
            except OSError as exc:
                write_errors.append(f"cannot write the instance: {exc.strerror or exc}")
                return 0xA700  # out of resources: the source counts it as failed
            except Exception as exc:
                write_errors.append(f"cannot store the instance: {exc}")
                return 0xC210
            return 0x0000

        contexts: list = [StudyRootQueryRetrieveInformationModelGet]
        roles = []
        for cx in StoragePresentationContexts:
            contexts.append((cx.abstract_syntax, GET_TRANSFER_SYNTAXES))
            roles.append(build_role(cx.abstract_syntax, scp_role=True))
        with self.associate(
            contexts, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)]
        ) as assoc:
            for identifier in self._identifiers(request):
                current[0] = identifier.get("SeriesInstanceUID")
                self._run_retrieve(
                    assoc.send_c_get(
                        identifier, StudyRootQueryRetrieveInformationModelGet
                    ),
                    "C-GET",
                    result,
                    progress,
                    assoc=assoc,
                    known_total=known_total,
                )
        result.series_folders = folders.written()
        if write_errors and not result.message:
            result.message = write_errors[0]
        return result

    def _move(
        self, request: RetrieveRequest, progress: RetrieveProgress
    ) -> RetrieveResult:
        result = RetrieveResult()
        with self.associate([StudyRootQueryRetrieveInformationModelMove]) as assoc:
            for identifier in self._identifiers(request):
                self._run_retrieve(
                    assoc.send_c_move(
                        identifier,
                        request.move_aet,
                        StudyRootQueryRetrieveInformationModelMove,
                    ),
                    "C-MOVE",
                    result,
                    progress,
                    assoc=assoc,
                    hint=f" Check that the source knows the move destination "
                    f"{request.move_aet!r} (its AE title, host and port).",
                )
        return result

    def _run_retrieve(
        self,
        responses,
        what: str,
        result: RetrieveResult,
        progress: RetrieveProgress,
        hint: str = "",
        *,
        assoc: Association,
        known_total: int | None = None,
    ) -> None:
        """Follow one C-GET/C-MOVE's responses, adding its counts to `result`."""
        base = (result.completed, result.failed, result.warnings)
        started = time.monotonic()
        total: int | None = None
        for status, _identifier in responses:
            if not status:
                raise SourceError(self._lost(assoc, what, started))
            started = time.monotonic()
            code = int(status.Status)
            done = _int(status.get("NumberOfCompletedSuboperations"))
            failed = _int(status.get("NumberOfFailedSuboperations"))
            warned = _int(status.get("NumberOfWarningSuboperations"))
            remaining = _int(status.get("NumberOfRemainingSuboperations"))
            if done is not None:
                result.completed = base[0] + done
            if failed is not None:
                result.failed = base[1] + failed
            if warned is not None:
                result.warnings = base[2] + warned
            if code in PENDING:
                if known_total is not None:
                    total = known_total - sum(base)
                elif remaining is not None:
                    total = (done or 0) + (failed or 0) + (warned or 0) + remaining
                # Raises Cancelled when the user cancelled: the association is aborted.
                progress(
                    result.completed + result.warnings,
                    None if total is None else sum(base) + total,
                    result.failed,
                )
                continue
            if code == 0x0000:
                progress(result.completed + result.warnings, None, result.failed)
                return
            if code == 0xB000 or (0xB000 <= code <= 0xBFFF):
                result.message = (
                    f"{what} partly failed: {result.failed} sub-operation(s) failed, "
                    f"{result.warnings} with warnings ({status_words(status)})."
                )
                if not result.failed:
                    # Some sources report 0xB000 with no counts: at least one failed.
                    result.failed = max(result.failed, 1)
                progress(result.completed + result.warnings, None, result.failed)
                return
            if code in (0xA701, 0xA702) and failed:
                # Every sub-operation of this request failed (e.g. one series of a
                # study): counted as failures, the other requests still run.
                result.message = (
                    f"{what} partly failed: {result.failed} sub-operation(s) failed "
                    f"({status_words(status)})."
                )
                progress(result.completed + result.warnings, None, result.failed)
                return
            if code == 0xFE00:
                raise Cancelled()
            raise SourceError(
                f"{what} refused by the source: {status_words(status)}.{hint}"
            )
