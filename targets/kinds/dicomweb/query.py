"""A DICOMweb server as a query source: QIDO-RS searches, WADO-RS retrieval.

WADO-RS responses are `multipart/related` streams; they are read with
`requests(stream=True)` and each part is written straight to its own file as it
arrives, so memory holds one network chunk, never a series. Requests go through the
HTTP seam (`targets.http`), with the target's TLS verification and credentials.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote, urlsplit

import pydicom
import requests

from targets import http
from targets.paths import UnsafePath
from targets.query import (
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

# DICOM JSON keys (tags) read from QIDO-RS answers.
T = {
    "PatientID": "00100020",
    "PatientName": "00100010",
    "PatientBirthDate": "00100030",
    "StudyInstanceUID": "0020000D",
    "StudyDate": "00080020",
    "StudyTime": "00080030",
    "AccessionNumber": "00080050",
    "StudyDescription": "00081030",
    "ModalitiesInStudy": "00080061",
    "NumberOfStudyRelatedSeries": "00201206",
    "NumberOfStudyRelatedInstances": "00201208",
    "SeriesInstanceUID": "0020000E",
    "SeriesNumber": "00200011",
    "Modality": "00080060",
    "SeriesDescription": "0008103E",
    "NumberOfSeriesRelatedInstances": "00201209",
}
STUDY_FIELDS = [
    "PatientBirthDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "StudyTime",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]
SERIES_FIELDS = ["SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]

ACCEPT_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
CHUNK = 256 * 1024


def _value(item: dict, keyword: str):
    values = item.get(T[keyword], {}).get("Value") or []
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):  # PN: {"Alphabetic": "..."}
        return value.get("Alphabetic", "")
    return value


def _text(item: dict, keyword: str) -> str:
    value = _value(item, keyword)
    return "" if value is None else str(value).strip()


def _int(item: dict, keyword: str) -> int | None:
    try:
        return int(_value(item, keyword))
    except (TypeError, ValueError):
        return None


def _join(base: str, prefix: str) -> str:
    base = base.rstrip("/")
    return f"{base}/{prefix.strip('/')}" if prefix.strip("/") else base


class DicomWebQuery(QuerySource):
    def __init__(self, target):
        super().__init__(target)
        self.session = http.session_for(target, credentials=True)
        self.qido = _join(target.url, target.qido_prefix)
        self.wado = _join(target.url, target.wado_prefix)

    @property
    def where(self) -> str:
        parts = urlsplit(self.target.url)
        return f"{parts.scheme}://{parts.hostname}" + (
            f":{parts.port}" if parts.port else ""
        )

    def _get(
        self,
        url: str,
        what: str,
        *,
        query: str = "",
        headers: dict | None = None,
        stream: bool = False,
    ) -> requests.Response:
        prepared = self.session.prepare_request(
            requests.Request("GET", url, headers=headers)
        )
        if query:
            # Set after preparing, so requests does not re-encode it (see qido_query).
            prepared.url = f"{prepared.url}?{query}"
        try:
            resp = http.send_prepared(self.session, prepared, stream=stream)
        except http.NoAnswer as exc:
            raise self._no_answer(exc, what) from exc
        if resp.status_code == 401:
            resp.close()
            raise SourceError(
                f"{what} answered 401: authentication failed (check the "
                "user name and password, or the token)."
            )
        if resp.status_code == 403:
            resp.close()
            raise SourceError(f"{what} answered 403: forbidden for this user.")
        return resp

    def _no_answer(self, exc: http.NoAnswer, what: str) -> SourceError:
        if exc.cause == http.TLS:
            return SourceError(
                f"TLS failed with {self.where}: {exc.words} "
                "(check the certificate or the CA bundle)."
            )
        if exc.cause == http.TIMEOUT:
            return SourceError(
                f"{what} to {self.where} timed out after "
                f"{self.target.request_timeout:g} s."
            )
        if exc.cause == http.CONNECT:
            return SourceError(f"Source unreachable: {self.where}: {exc.words}.")
        return SourceError(f"{what} to {self.where} failed: {exc.words}.")

    def _check(self, resp: requests.Response, what: str) -> None:
        if resp.status_code >= 400:
            text = " ".join(resp.text[:200].split())
            resp.close()
            if resp.status_code == 404:
                hint = " (check the URL and the QIDO/WADO prefixes)"
            elif resp.status_code >= 500:
                hint = " (the server failed: see its log)"
            else:
                hint = ""
            raise SourceError(
                f"{what} answered {resp.status_code} {resp.reason}{hint}"
                + (f": {text}" if text else "")
                + "."
            )

    def _qido(self, path: str, query: str) -> list[dict]:
        resp = self._get(
            f"{self.qido}/{path}",
            "QIDO-RS",
            query=query,
            headers={"Accept": "application/dicom+json"},
        )
        if resp.status_code in (204, 404) and path != "studies":
            return []
        if resp.status_code == 204:
            return []
        self._check(resp, "QIDO-RS")
        try:
            data = resp.json()
        except ValueError as exc:
            raise SourceError(
                "QIDO-RS answered something that is not DICOM JSON "
                "(check the URL and QIDO prefix)."
            ) from exc
        if not isinstance(data, list):
            raise SourceError("QIDO-RS answered JSON that is not a list of matches.")
        return data

    # -- search --------------------------------------------------------------------
    def find_studies(self, criteria: Criteria, limit: int) -> StudySearch:
        return self.search_accession_list(criteria, limit, self._find_studies)

    def _find_studies(self, criteria: Criteria, limit: int) -> StudySearch:
        accession = criteria.accessions[0] if criteria.accessions else ""
        query, checks = qido_query(
            [
                ("PatientID", criteria.patient_id, False),
                ("PatientName", criteria.patient_name, True),
                ("AccessionNumber", accession, False),
                ("StudyDescription", criteria.study_description, True),
                ("StudyDate", criteria.date_range, False),
                ("ModalitiesInStudy", criteria.modality.upper(), False),
                ("StudyInstanceUID", criteria.study_uid, False),
            ]
        )
        query += "".join(f"&includefield={T[k]}" for k in STUDY_FIELDS)
        query += f"&limit={limit + 1}"
        found = self._qido("studies", query.lstrip("&"))
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
                modalities=[
                    str(m)
                    for m in (r.get(T["ModalitiesInStudy"], {}).get("Value") or [])
                ],
                series_count=_int(r, "NumberOfStudyRelatedSeries"),
                instance_count=_int(r, "NumberOfStudyRelatedInstances"),
            )
            for r in found
        ]
        for keyword, pattern in checks:
            attr = STUDY_ATTRS[keyword]
            studies = [s for s in studies if pattern.fullmatch(getattr(s, attr))]
        truncated = len(studies) > limit
        studies = studies[:limit]
        studies.sort(key=lambda s: (s.study_date, s.study_time), reverse=True)
        return StudySearch(studies=studies, truncated=truncated or len(found) > limit)

    def find_series(self, study_uid: str) -> list[FoundSeries]:
        query = "&".join(f"includefield={T[k]}" for k in SERIES_FIELDS)
        found = self._qido(f"studies/{_seg(study_uid)}/series", query)
        series = [
            FoundSeries(
                series_uid=_text(r, "SeriesInstanceUID"),
                study_uid=study_uid,
                number=_int(r, "SeriesNumber"),
                modality=_text(r, "Modality"),
                description=_text(r, "SeriesDescription"),
                instance_count=_int(r, "NumberOfSeriesRelatedInstances"),
            )
            for r in found
        ]
        series.sort(key=lambda s: (s.number is None, s.number or 0, s.series_uid))
        return series

    # -- retrieve ------------------------------------------------------------------
    def retrieve(
        self, request: RetrieveRequest, dest: Path, progress: RetrieveProgress
    ) -> RetrieveResult:
        if request.move_aet:
            raise SourceError(
                "A DICOMweb source cannot C-MOVE; choose another destination."
            )
        known = {s.series_uid: s for s in self.find_series(request.study_uid)}
        wanted = request.series_uids or list(known)
        if not wanted:
            raise SourceError(
                "Nothing to retrieve: the source lists no series for the study."
            )
        counts = [known[uid].instance_count for uid in wanted if uid in known]
        total = sum(c or 0 for c in counts) if counts and None not in counts else None
        result = RetrieveResult()
        folders = SeriesFolders(dest)
        progress(0, total, 0)

        def stored(path: Path) -> None:
            try:
                ds = pydicom.dcmread(
                    path,
                    stop_before_pixels=True,
                    specific_tags=["SOPInstanceUID", "SeriesInstanceUID"],
                )
                series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            except Exception as exc:
                path.unlink(missing_ok=True)
                result.failed += 1
                result.message = f"a WADO-RS part is not a DICOM instance ({exc})"
            else:
                try:
                    os.replace(path, folders.path_for(series_uid, sop_uid))
                except UnsafePath as exc:
                    path.unlink(missing_ok=True)
                    result.failed += 1
                    result.message = f"refused: {exc}"
                else:
                    result.completed += 1
            progress(result.completed, total, result.failed)

        dest.mkdir(parents=True, exist_ok=True)
        for series_uid in wanted:
            url = f"{self.wado}/studies/{_seg(request.study_uid)}/series/{_seg(series_uid)}"
            self._stream(url, dest, stored)
        result.series_folders = folders.written()
        return result

    def _stream(self, url: str, dest: Path, stored: Callable[[Path], None]) -> None:
        resp = self._get(
            url, "WADO-RS", stream=True, headers={"Accept": ACCEPT_ANY_SYNTAX}
        )
        if resp.status_code in (400, 406):
            # Older servers refuse transfer-syntax=*; take their default instead.
            resp.close()
            resp = self._get(
                url, "WADO-RS", stream=True, headers={"Accept": ACCEPT_DEFAULT}
            )
        with resp:
            self._check(resp, "WADO-RS")
            boundary = boundary_of(resp.headers.get("Content-Type", ""))
            if boundary is None:
                raise SourceError(
                    "WADO-RS did not answer with a multipart/related body."
                )
            write_parts(resp.iter_content(CHUNK), boundary, dest, stored)


def _seg(uid: str) -> str:
    """A UID as one URL path segment: a "UID" with `/` or `..` from the source (or
    a crafted form post) must not reach another endpoint."""
    segment = quote(uid, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


STUDY_ATTRS = {
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "AccessionNumber": "accession",
    "StudyDescription": "description",
}
# Sent as they are in a query value; everything else would need percent-encoding.
_PLAIN = re.compile(r"[A-Za-z0-9._~*?-]")


def qido_query(
    matches: list[tuple[str, str, bool]],
) -> tuple[str, list[tuple[str, re.Pattern]]]:
    """Build a QIDO-RS query string and the checks to apply to its answers.

    Orthanc's DICOMweb plugin (1.7) does not percent-decode query values, so
    "CT%20CHEST" or "DOE%5E*" match nothing there. Values are therefore sent
    unencoded; a character that would need encoding (a space, `%`, `&`, ...) is sent
    as the wildcard `*` instead (`?` there made Orthanc miss "ACC_5%"), and the exact value is then checked here on the
    answers. `^` is one of them: urllib3 percent-encodes it whatever we do. `matches` holds (keyword, value, case_insensitive).
    """
    parts, checks = [], []
    for keyword, value, case_insensitive in matches:
        if not value:
            continue
        sent = "".join(ch if _PLAIN.fullmatch(ch) else "*" for ch in value)
        sent = re.sub(r"\*+", "*", sent)
        parts.append(f"{keyword}={sent}")
        if sent != value:
            checks.append((keyword, wildcard_regex(value, case_insensitive)))
    return "&".join(parts), checks


def wildcard_regex(value: str, case_insensitive: bool = True) -> re.Pattern:
    """A regex for a DICOM wildcard value (`*`, `?`)."""
    body = "".join(
        ".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in value
    )
    return re.compile(body, (re.IGNORECASE if case_insensitive else 0) | re.DOTALL)


def boundary_of(content_type: str) -> bytes | None:
    if not content_type.lower().startswith("multipart/"):
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"').encode()
    return None


def write_parts(
    chunks: Iterable[bytes], boundary: bytes, dest: Path, stored: Callable[[Path], None]
) -> int:
    """Write each part of a multipart body to its own file under `dest` as it streams.

    `stored(path)` is called when a part is complete. Return the number of parts.
    Only one chunk plus a delimiter's length is ever held in memory.
    """
    delimiter = b"\r\n--" + boundary
    # A body starts with "--boundary": pretend a CRLF came before it.
    buf = b"\r\n"
    state = "preamble"
    out = None
    path: Path | None = None
    parts = 0
    done = False
    try:
        for chunk in chunks:
            buf += chunk
            while not done:
                if state == "preamble":
                    i = buf.find(delimiter)
                    if i < 0:
                        buf = buf[-len(delimiter) :]
                        break
                    buf = buf[i + len(delimiter) :]
                    state = "delimiter"
                if state == "delimiter":
                    if len(buf) < 2:
                        break
                    if buf.startswith(b"--"):
                        done = True
                        break
                    state = "headers"
                if state == "headers":
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        break
                    buf = buf[i + 4 :]
                    path = dest / f".part-{uuid.uuid4().hex}"
                    out = open(path, "wb")
                    state = "body"
                if state == "body":
                    i = buf.find(delimiter)
                    if i < 0:
                        keep = len(delimiter) - 1
                        if len(buf) > keep:
                            out.write(buf[:-keep])
                            buf = buf[-keep:]
                        break
                    out.write(buf[:i])
                    out.close()
                    out = None
                    buf = buf[i + len(delimiter) :]
                    parts += 1
                    stored(path)
                    path = None
                    state = "delimiter"
            if done:
                break
    finally:
        if out is not None:
            out.close()
        if path is not None:
            path.unlink(missing_ok=True)
    if state == "body":
        raise SourceError("The WADO-RS stream ended in the middle of an instance.")
    return parts
