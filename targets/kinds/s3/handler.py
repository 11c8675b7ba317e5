"""S3 targets (boto3): AWS or any S3-compatible store, one object per instance.

Keys are `<prefix>/<layout>/<SOPInstanceUID>.dcm` (layout as for Folder, by default
`<StudyInstanceUID>/<SeriesInstanceUID>`) with `Content-Type: application/dicom`; the
series folder's other files (reports, previews, results) go beside them under their
own names with the content type their name suggests, minus the exclusion filter.
Uploads run on `UPLOAD_THREADS` threads over one client (boto3 clients are
thread-safe; one is kept per set of settings, so a worker's next send reuses it and its
connections); files above the multipart threshold go through boto3's transfer manager.
An object the store refuses for itself (a key too long) fails by name and the rest
goes on; any other refusal stops the send with the object's key in the message. Objects
already there with the same bytes are reported PRESENT, so a retry sends only the rest:
the size must match, and so must the MD5 where the listed ETag is one (a single-part
upload without SSE-KMS); a multipart object is judged by its size alone.
"""

# Why this module is long: the upload pool, the comparison with what is already in
# the bucket and the translation of S3's error codes into words change together.

from __future__ import annotations

import hashlib
import logging
import mimetypes
import queue
import socket
import ssl
import threading
import uuid
from collections.abc import Callable

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.utils import determine_content_length

from targets.kinds.base import (
    FAILED,
    PRESENT,
    SENT,
    CheckReport,
    Handler,
    Outcome,
    ProgressCallback,
    SendContext,
    SendResult,
    TargetError,
    instance_outcome,
)
from targets.paths import UnsafePath, remote_inside
from targets.series import Instance, OtherFile, Series

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/dicom"
# Enough parallel requests to hide per-request latency; more mostly adds GIL contention.
UPLOAD_THREADS = 16
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024
SMALL_OBJECT = 1024 * 1024
READ_TIMEOUT = 120.0

_PERMANENT_CODES = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "AccessDenied",
    "NoSuchBucket",
    "InvalidBucketName",
    "AuthorizationHeaderMalformed",
    "PermanentRedirect",
    "InvalidStorageClass",
    "InvalidArgument",
    "InvalidRequest",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidToken",
    "ExpiredToken",
    "KMS.NotFoundException",
}

# Refusals of one object, not of the target: that object fails, the rest goes on.
_OBJECT_CODES = {
    "KeyTooLongError",
    "EntityTooLarge",
    "MetadataTooLarge",
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
}


_session_lock = threading.Lock()
_session: boto3.session.Session | None = None


_clients: dict[tuple, object] = {}
_CLIENTS_KEPT = 8


def _make_client(key: tuple, **kwargs):
    """The client for `key` (every setting it is made from), built once from one
    shared session: a new session reloads botocore's service models (0.1-0.3 s), a
    new client costs 20-40 ms of CPU and a new connection pool; a worker sending
    series after series to one target reuses them. Clients are thread-safe;
    sessions are not safe to share unlocked."""
    global _session
    with _session_lock:
        client = _clients.get(key)
        if client is not None:
            return client
        if _session is None:
            _session = boto3.session.Session()
        client = _session.client("s3", **kwargs)
        client.meta.events.register_last("before-call.s3", _no_expect_for_small_puts)
        while len(_clients) >= _CLIENTS_KEPT:
            _clients.pop(next(iter(_clients)))
        _clients[key] = client
        return client


def _no_expect_for_small_puts(model=None, params=None, **kwargs) -> None:
    """Drop botocore's "Expect: 100-continue" from small PutObjects: it waits a round
    trip for the server's go-ahead before every body, which for a 40 KB object costs
    more than sending it."""
    if model is None or model.name != "PutObject" or params is None:
        return
    size = determine_content_length(params.get("body"))
    if size is not None and size <= SMALL_OBJECT:
        params.get("headers", {}).pop("Expect", None)


class S3Handler(Handler):
    # -- client -------------------------------------------------------------------------
    @property
    def secret_missing(self) -> bool:
        """An access key id without its secret (e.g. cleared when re-pointed)."""
        return bool(self.target.access_key_id) and not self.target.secret_key

    def client(
        self, *, attempts: int = 3, pool: int = UPLOAD_THREADS, unsigned: bool = False
    ):
        """A boto3 client; `unsigned` sends anonymous requests (to reach the
        endpoint when the secret is missing)."""
        from botocore import UNSIGNED

        target = self.target
        if self.secret_missing and not unsigned:
            raise TargetError(
                f"the secret access key of {target.access_key_id} is not set: enter "
                "it in the target's settings",
                permanent=True,
            )
        config = Config(
            signature_version=UNSIGNED if unsigned else "s3v4",
            s3={"addressing_style": target.addressing_style or "auto"},
            connect_timeout=target.connect_timeout,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": attempts, "mode": "standard"},
            max_pool_connections=pool,
            # boto3's newer default CRC checksums are not understood by every
            # S3-compatible store, and cost CPU; send them only where required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Courier builds the parameters itself; validating them costs CPU per
            # request.
            parameter_validation=False,
        )
        key_id = None if unsigned else target.access_key_id or None
        secret = None if unsigned else str(target.secret_key) or None
        # The secret enters the key as a digest: the same client for the same
        # credentials, and no second copy of the secret in the process.
        digest = hashlib.sha256(secret.encode()).digest() if secret else None
        settings = (target.endpoint_url, target.region, target.addressing_style,
                    target.connect_timeout, attempts, pool, unsigned, key_id, digest)  # fmt: skip
        return _make_client(
            settings,
            endpoint_url=target.endpoint_url or None,
            region_name=target.region or None,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=config,
        )

    @property
    def key_prefix(self) -> str:
        return "/".join(p for p in (self.target.prefix or "").split("/") if p)

    def key_for(self, rel: str, name: str) -> str:
        """`<prefix>/<rel>/<name>`; raise `TargetError` if a part is not clean (a
        consumer syncing the bucket to disk must not meet `..` or `//`)."""
        parts = [p for p in (rel, name) if p]
        if not parts:
            return self.key_prefix
        try:
            return remote_inside(self.key_prefix, *parts)
        except UnsafePath as exc:
            raise TargetError(str(exc), permanent=True) from None

    def extra_args(self) -> dict[str, str]:
        args = {"ContentType": CONTENT_TYPE}
        if self.target.storage_class:
            args["StorageClass"] = self.target.storage_class
        if self.target.server_side_encryption:
            args["ServerSideEncryption"] = self.target.server_side_encryption
        return args

    # -- send -------------------------------------------------------------------------
    def send(
        self,
        series: Series,
        *,
        progress: ProgressCallback | None = None,
        context: SendContext | None = None,
        connections: int | None = None,
    ) -> SendResult:
        result, report, groups = self.start_grouped(series, progress)
        if not groups:
            return result

        client = self.client()
        bucket = self.target.bucket
        todo: list[tuple[Instance | OtherFile, str]] = []
        for rel, files in groups.items():
            existing = self._existing(client, self.key_for(rel, ""), result)
            seen: set[str] = set()
            for inst, name in files:
                key = self.key_for(rel, name)
                if key in seen:
                    report(
                        instance_outcome(inst, PRESENT, "duplicate SOP Instance UID")
                    )
                elif self._same_object(inst, existing.get(key)):
                    report(instance_outcome(inst, PRESENT))
                else:
                    todo.append((inst, key))
                seen.add(key)

        extra = self.extra_args()
        transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNK,
            max_concurrency=4,
        )

        def upload(inst: Instance | OtherFile, key: str) -> None:
            args = extra
            if isinstance(inst, OtherFile):
                kind = mimetypes.guess_type(inst.path.name)[0]
                args = {**extra, "ContentType": kind or "application/octet-stream"}
            if inst.size >= MULTIPART_THRESHOLD:
                client.upload_file(
                    str(inst.path), bucket, key, ExtraArgs=args, Config=transfer
                )
            elif inst.size <= SMALL_OBJECT:
                body = inst.path.read_bytes()
                client.put_object(Bucket=bucket, Key=key, Body=body, **args)
            else:
                with open(inst.path, "rb") as f:
                    client.put_object(Bucket=bucket, Key=key, Body=f, **args)

        self._run_parallel(todo, upload, report)
        return result

    def _same_object(
        self, inst: Instance | OtherFile, listed: tuple[int, str] | None
    ) -> bool:
        """Whether a listed object (size, ETag) already holds `inst`'s bytes.

        A corrected re-send often keeps the size, so a matching size is not enough
        where the ETag is the MD5 of the object: a single-part upload without
        SSE-KMS/SSE-C (no dash in it). Hashing the local file is one read of it. A
        multipart ETag is the MD5 of the part MD5s: there the size alone decides.
        """
        if listed is None or listed[0] != inst.size:
            return False
        etag = listed[1].strip('"')
        if (
            not etag
            or "-" in etag
            or "kms" in (self.target.server_side_encryption or "")
        ):
            return True
        with open(inst.path, "rb") as f:
            md5 = hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False))
        return md5.hexdigest() == etag.lower()

    def _existing(
        self, client, prefix: str, result: SendResult
    ) -> dict[str, tuple[int, str]]:
        """Key -> (size, ETag) of the objects under a series prefix (for retries)."""
        found: dict[str, tuple[int, str]] = {}
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.target.bucket, Prefix=prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found[obj["Key"]] = (obj["Size"], obj.get("ETag", ""))
        except ClientError as exc:
            if _code(exc) != "AccessDenied":
                raise self.error(exc, "listing the bucket") from None
            # Write-only credentials are a valid set-up: upload everything.
            note = "listing the bucket is denied: objects already there are sent again"
            if note not in result.notes:
                result.notes.append(note)
        except BotoCoreError as exc:
            raise self.error(exc, "listing the bucket") from None
        return found

    def _run_parallel(
        self,
        todo: list[tuple[Instance | OtherFile, str]],
        upload: Callable[[Instance | OtherFile, str], None],
        report: Callable[[Outcome], None],
    ) -> None:
        """Upload `todo` on `UPLOAD_THREADS` threads; report each outcome here, on
        the calling thread, as it comes.

        An object the store refuses for itself (`_OBJECT_CODES`: a key too long, a
        body that changed while it was read) or a local file that cannot be read is
        FAILED by name and the rest goes on. Any other error means the target is
        unusable now: no new upload starts, those under way finish and are
        reported, and a `TargetError` naming the object is raised (a retry then
        sends only what is missing).
        """
        if not todo:
            return
        waiting: queue.SimpleQueue = queue.SimpleQueue()
        for item in todo:
            waiting.put(item)
        done: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            try:
                while not stop.is_set():
                    try:
                        inst, key = waiting.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        upload(inst, key)
                    except BaseException as exc:  # reported on the calling thread
                        done.put((inst, key, exc))
                    else:
                        done.put((inst, key, None))
            finally:
                done.put(None)

        workers = [
            threading.Thread(target=work, name=f"s3-upload-{n}", daemon=True)
            for n in range(min(UPLOAD_THREADS, len(todo)))
        ]
        error: TargetError | None = None
        try:
            for thread in workers:
                thread.start()
            running = len(workers)
            while running:
                item = done.get()
                if item is None:
                    running -= 1
                    continue
                inst, key, exc = item
                if exc is None:
                    report(instance_outcome(inst, SENT))
                elif isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                    # The local file went away or cannot be read.
                    why = exc.strerror or str(exc)
                    report(
                        instance_outcome(
                            inst, FAILED, f"cannot read {inst.path}: {why}"
                        )
                    )
                elif isinstance(exc, ClientError) and _code(exc) in _OBJECT_CODES:
                    refused = self.error(exc, f"uploading {key}")
                    report(instance_outcome(inst, FAILED, refused.message))
                elif error is None:
                    error = self.error(exc, f"uploading {key}")
                    stop.set()
        finally:
            stop.set()
            for thread in workers:
                thread.join()
        if error is not None:
            raise error from None

    # -- errors -------------------------------------------------------------------------
    def error(self, exc: BaseException, doing: str) -> TargetError:
        """A TargetError in words for a boto3 error; never contains the secret."""
        bucket = self.target.bucket
        where = self.target.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            server_says = exc.response.get("Error", {}).get("Message", "")
            if code == "SignatureDoesNotMatch":
                message = (
                    "authentication failed (signature does not match): check "
                    "the secret access key"
                )
            elif code == "InvalidAccessKeyId":
                message = (
                    "authentication failed (the access key id is not known to "
                    f"{where}): check the access key id"
                )
            elif code in ("AccessDenied", "AllAccessDisabled") or (
                status == 403 and code in ("403", "Forbidden")
            ):
                message = (
                    f"access denied while {doing} in bucket {bucket!r}: the "
                    "credentials are valid but lack the permission"
                )
            elif code == "NoSuchBucket" or (
                status == 404 and code in ("404", "NotFound")
            ):
                message = f"no such bucket {bucket!r} at {where}"
            elif code == "AuthorizationHeaderMalformed":
                message = f"wrong region {self.target.region!r}: {server_says}"
            elif code in ("PermanentRedirect", "301"):
                message = (
                    f"bucket {bucket!r} is in another region or at another "
                    "endpoint: set the region"
                )
            else:
                message = f"S3 error {code} ({status}) while {doing}: {server_says}"
            permanent = code in _PERMANENT_CODES or status in (400, 403, 404)
            return TargetError(self._scrub(message), permanent=permanent)
        if isinstance(exc, BotoConnectionError):
            return TargetError(
                f"endpoint unreachable: cannot connect to {where} while {doing} "
                f"({self._connection_words(exc)})"
            )
        if isinstance(exc, ConnectionClosedError):
            return TargetError(
                f"{where} closed the connection without an answer while {doing}"
            )
        if isinstance(exc, ReadTimeoutError):
            return TargetError(
                f"{where} did not answer within {READ_TIMEOUT:g} s while {doing}"
            )
        if isinstance(exc, NoCredentialsError):
            return TargetError(
                "no credentials: set the access key id and secret", permanent=True
            )
        if isinstance(exc, ParamValidationError):
            return TargetError(
                f"invalid request while {doing}: {self._scrub(str(exc))}",
                permanent=True,
            )
        return TargetError(
            f"{type(exc).__name__} while {doing}: {self._scrub(str(exc))}"
        )

    def _scrub(self, text: str) -> str:
        secret = str(self.target.secret_key or "")
        return text.replace(secret, "********") if secret else text

    # -- test ---------------------------------------------------------------------------
    def _connection_words(self, exc: BaseException) -> str:
        """Why a connection failed, in words (botocore's own text is a request URL)."""
        seen: BaseException | None = exc
        chain = []
        while seen is not None and len(chain) < 10:
            chain.append(seen)
            kwargs = getattr(seen, "kwargs", None) or {}
            seen = kwargs.get("error") or seen.__cause__ or seen.__context__
        for err in chain:
            if isinstance(err, ConnectionRefusedError):
                return "connection refused: nothing listens on that port"
            if isinstance(err, socket.gaierror):
                return "the host name does not resolve"
            if isinstance(err, ssl.SSLCertVerificationError):
                return f"TLS failed: the certificate is not trusted ({err.reason})"
            if isinstance(err, ssl.SSLError):
                return "TLS failed (is it an https:// endpoint?)"
            if isinstance(err, TimeoutError | socket.timeout):
                return f"no answer within {self.target.connect_timeout:g} s"
            if isinstance(err, OSError) and err.strerror:
                return err.strerror
        if "timeout" in type(exc).__name__.lower():
            return f"no answer within {self.target.connect_timeout:g} s"
        return "the connection failed"

    def test(self) -> CheckReport:
        result = CheckReport()
        bucket = self.target.bucket
        unsigned = self.secret_missing
        client = self.client(attempts=1, pool=2, unsigned=unsigned)
        listing: BaseException | None = None
        where = self.target.endpoint_url or "AWS S3"
        # One request answers three questions; it is timed as the first check.
        with result.check("endpoint reachable") as check:
            try:
                client.list_objects_v2(Bucket=bucket, Prefix=self.key_prefix, MaxKeys=1)
            except (ClientError, BotoCoreError) as exc:
                listing = exc
            if isinstance(
                listing, BotoConnectionError | ConnectionClosedError | ReadTimeoutError
            ):
                raise self.error(listing, "listing the bucket")
            check.message = f"{where} answered"
        if result.stopped:
            return result

        with result.check("credentials") as check:
            if unsigned:
                self.client()  # raises: the secret access key is not set
            code = _code(listing) if isinstance(listing, ClientError) else ""
            if listing is not None and (
                code
                in (
                    "SignatureDoesNotMatch",
                    "InvalidAccessKeyId",
                    "InvalidToken",
                    "ExpiredToken",
                )
                or not isinstance(listing, ClientError)
            ):
                raise self.error(listing, "checking the credentials")
            who = (
                f"the credentials of {self.target.access_key_id}"
                if self.target.access_key_id
                else "the default credentials"
            )
            check.message = (
                f"{who} cannot be verified until the bucket exists"
                if code == "NoSuchBucket"
                else f"{who} are accepted"
            )
        if result.stopped:
            return result

        with result.check("bucket reachable") as check:
            if listing is not None:
                raise self.error(listing, "listing the bucket")
            check.message = f"bucket {bucket!r} exists and can be listed"
        if result.stopped or not self.target.can_store:
            return result

        with result.check("write probe") as check:
            key = self.key_for("", f".courier-probe-{uuid.uuid4().hex[:12]}")
            try:
                client.put_object(
                    Bucket=bucket,
                    Key=key,
                    Body=b"courier write test\n",
                    **self.extra_args(),
                )
            except (ClientError, BotoCoreError) as exc:
                raise self.error(exc, "writing a probe object") from None
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except (ClientError, BotoCoreError) as exc:
                error = self.error(exc, "deleting the probe object")
                raise TargetError(
                    f"the probe object {key} was written but not deleted: "
                    f"{error.message}"
                ) from None
            check.message = f"probe object {key} written and deleted"
        return result


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
