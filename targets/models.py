"""Targets: one concrete table, one proxy model per kind.

Per-kind settings are nullable columns on `Target`, shared where the meaning is shared
(host, port, username, path, url, ...). Each proxy pins its kind, filters its manager,
validates in `clean()` and declares the admin fieldsets for its settings.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models.functions import Lower

from .secrets import EncryptedTextField
from .validators import validate_ae_title, validate_globs, validate_host

if TYPE_CHECKING:
    from .kinds.base import Handler


class Kind(models.TextChoices):
    DICOM = "dicom", "DICOM"
    DICOM_TLS = "dicom_tls", "DICOM+TLS"
    DICOMWEB = "dicomweb", "DICOMweb"
    FOLDER = "folder", "Folder"
    RSYNC = "rsync", "rsync"
    S3 = "s3", "S3"
    SFTP = "sftp", "SFTP"
    XNAT = "xnat", "XNAT"


class Direction(models.TextChoices):
    STORE = "store", "Store"
    QUERY = "query", "Query"
    BOTH = "both", "Both"


# Handler classes by kind, imported lazily so `import targets` stays light
# (no boto3, paramiko or xnat until a target of that kind is used).
HANDLERS: dict[str, str] = {
    Kind.DICOM: "targets.kinds.dicom.DicomHandler",
    Kind.DICOM_TLS: "targets.kinds.dicom_tls.DicomTlsHandler",
    Kind.DICOMWEB: "targets.kinds.dicomweb.DicomWebHandler",
    Kind.FOLDER: "targets.kinds.folder.FolderHandler",
    Kind.RSYNC: "targets.kinds.rsync.RsyncHandler",
    Kind.S3: "targets.kinds.s3.S3Handler",
    Kind.SFTP: "targets.kinds.sftp.SftpHandler",
    Kind.XNAT: "targets.kinds.xnat.XnatHandler",
}

# The kinds that can be a query source (the product page's "Pull" column).
QUERYABLE_KINDS = {Kind.DICOM, Kind.DICOMWEB}

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}"
# XNAT labels. StudyUIDHash (8 hex digits of the StudyInstanceUID's SHA-1) keeps two
# studies of one patient on one day apart, even without an AccessionNumber.
DEFAULT_SUBJECT_TEMPLATE = "{PatientID}"
DEFAULT_SESSION_TEMPLATE = "{PatientID}_{StudyDate}_{StudyUIDHash}"


@dataclass(frozen=True)
class ShowIf:
    """Show `fields` in the admin form only while the field `when` matches: its value
    is one of `equals`, does not start with `not_prefix` (case-insensitive), or the
    checkbox is ticked (`checked`). A field is shown when every rule naming it holds."""

    fields: tuple[str, ...]
    when: str
    equals: tuple[str, ...] = ()
    not_prefix: str = ""
    checked: bool = False


def _default_calling_aet() -> str:
    return settings.COURIER_AE_TITLE


def _default_dimse_timeout() -> float:
    return settings.COURIER_DIMSE_TIMEOUT


class Target(models.Model):
    # -- common ----------------------------------------------------------------
    name = models.CharField(max_length=64, help_text="Unique, case-insensitive.")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    direction = models.CharField(
        max_length=8,
        choices=Direction.choices,
        default=Direction.STORE,
        help_text="Store: a routing target. Query: a query-tool source only. Both.",
    )
    enabled = models.BooleanField(default=True)
    contact_email = models.EmailField("contact e-mail", blank=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    last_test_at = models.DateTimeField(
        "last tested", null=True, blank=True, editable=False
    )
    last_test_ok = models.BooleanField("last test passed", null=True, editable=False)
    last_test_message = models.TextField(blank=True, editable=False)
    last_test_result = models.JSONField(null=True, blank=True, editable=False)

    # -- network (DICOM, DICOM+TLS, SFTP, rsync) -----------------------------------
    host = models.CharField(max_length=255, blank=True, validators=[validate_host])
    port = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(65535)],
    )
    connect_timeout = models.FloatField(
        "connection timeout (s)", default=10.0, validators=[MinValueValidator(0.1)]
    )

    # -- DICOM -----------------------------------------------------------------
    called_aet = models.CharField(
        "Target AET",
        max_length=16,
        blank=True,
        validators=[validate_ae_title],
        help_text="The AE title of the receiver (called AE title).",
    )
    calling_aet = models.CharField(
        "Source AET",
        max_length=16,
        blank=True,
        default=_default_calling_aet,
        validators=[validate_ae_title],
        help_text="Courier's AE title towards this target (calling AE title).",
    )
    pass_calling_aet = models.BooleanField(
        "pass incoming Source AET",
        default=False,
        help_text="Send with the calling AE title the series arrived with.",
    )
    pass_called_aet = models.BooleanField(
        "pass incoming Target AET",
        default=False,
        help_text="Send with the called AE title the series arrived with.",
    )
    acse_timeout = models.FloatField(
        "association timeout (s)", default=30.0, validators=[MinValueValidator(0.1)]
    )
    dimse_timeout = models.FloatField(
        "DIMSE timeout (s)",
        default=_default_dimse_timeout,
        validators=[MinValueValidator(0.1)],
        help_text="How long to wait for each response before aborting.",
    )
    max_pdu = models.PositiveIntegerField(
        "max PDU (bytes)",
        default=131072,
        validators=[MinValueValidator(0), MaxValueValidator(2**32 - 1)],
        help_text="Largest PDU Courier accepts; 0 means unlimited.",
    )

    # -- DICOM+TLS ---------------------------------------------------------------
    tls_client_key = models.CharField(
        "client key", max_length=500, blank=True, help_text="Path on the server."
    )
    tls_client_cert = models.CharField(
        "client certificate",
        max_length=500,
        blank=True,
        help_text="Path on the server.",
    )
    tls_ca_cert = models.CharField(
        "CA certificate", max_length=500, blank=True, help_text="Path on the server."
    )
    tls_verify_hostname = models.BooleanField("verify server host name", default=True)
    key_passphrase = EncryptedTextField("key passphrase")

    # -- files (Folder, SFTP, rsync) ----------------------------------------------
    path = models.CharField("folder", max_length=1000, blank=True)
    exclude = models.CharField(
        "exclusion filter",
        max_length=500,
        blank=True,
        validators=[validate_globs],
        help_text="Comma-separated globs of files not to send, e.g. *.png, *.json",
    )
    layout = models.CharField(
        max_length=300,
        blank=True,
        default=DEFAULT_LAYOUT,
        help_text="Folders under the path, from DICOM tags in braces.",
    )
    write_complete_marker = models.BooleanField(
        "write .complete marker",
        default=False,
        help_text="Create a .complete file in each series folder when it is complete.",
    )

    # -- HTTP (DICOMweb, XNAT) -----------------------------------------------------
    url = models.CharField("URL", max_length=1000, blank=True)
    qido_prefix = models.CharField("QIDO prefix", max_length=100, blank=True)
    wado_prefix = models.CharField("WADO prefix", max_length=100, blank=True)
    stow_prefix = models.CharField("STOW prefix", max_length=100, blank=True)
    auth = models.CharField(
        "authentication",
        max_length=8,
        blank=True,
        default="none",
        choices=[("none", "None"), ("basic", "Basic"), ("bearer", "Bearer token")],
    )
    token = EncryptedTextField("bearer token")
    verify_tls = models.BooleanField("verify TLS certificates", default=True)
    ca_bundle = models.CharField(
        "CA bundle",
        max_length=500,
        blank=True,
        help_text="Path on the server; empty uses the system's.",
    )
    request_timeout = models.FloatField(
        "request timeout (s)", default=60.0, validators=[MinValueValidator(0.1)]
    )
    stow_batch_size = models.PositiveIntegerField(
        "instances per STOW request", default=50, validators=[MinValueValidator(1)]
    )
    stow_max_bytes = models.PositiveBigIntegerField(
        "max STOW request size (bytes)",
        default=100 * 1024 * 1024,
        validators=[MinValueValidator(1024)],
    )

    # -- login (SFTP, rsync, DICOMweb basic, XNAT) -------------------------------------
    username = models.CharField(max_length=150, blank=True)
    password = EncryptedTextField()

    # -- SSH (SFTP, rsync) -----------------------------------------------------------
    host_key = models.CharField(
        "pinned host key",
        max_length=200,
        blank=True,
        help_text="SHA256 fingerprint of the server's host key, pinned from a Test.",
    )
    host_key_type = models.CharField(max_length=40, blank=True, editable=False)
    host_key_data = models.TextField(blank=True, editable=False)
    private_key_path = models.CharField(
        "private key file", max_length=500, blank=True, help_text="Path on the server."
    )
    private_key = EncryptedTextField("private key (pasted)")
    run_on_complete = models.BooleanField(
        "execute shell command after transfer", default=False
    )
    complete_script = models.CharField(
        "completion script",
        max_length=200,
        blank=True,
        default="mercure_complete.sh",
        help_text="Run from the target folder as <script> <destination_folder> <target_name>.",
    )

    # -- S3 ------------------------------------------------------------------------
    bucket = models.CharField(max_length=63, blank=True)
    region = models.CharField(max_length=40, blank=True)
    prefix = models.CharField(max_length=500, blank=True)
    endpoint_url = models.CharField(
        "endpoint URL",
        max_length=500,
        blank=True,
        help_text="Empty for AWS; any S3-compatible endpoint otherwise.",
    )
    addressing_style = models.CharField(
        max_length=8,
        blank=True,
        default="auto",
        choices=[("auto", "Auto"), ("path", "Path"), ("virtual", "Virtual host")],
    )
    access_key_id = models.CharField("access key id", max_length=128, blank=True)
    secret_key = EncryptedTextField("secret access key")
    storage_class = models.CharField(max_length=40, blank=True)
    server_side_encryption = models.CharField(max_length=40, blank=True)

    # -- XNAT ------------------------------------------------------------------------
    project = models.CharField("project id", max_length=100, blank=True)
    import_handler = models.CharField(
        max_length=20,
        blank=True,
        default="DICOM-zip",
        choices=[("DICOM-zip", "DICOM-zip"), ("gradual-DICOM", "gradual-DICOM")],
    )
    subject_template = models.CharField(
        max_length=200,
        blank=True,
        default=DEFAULT_SUBJECT_TEMPLATE,
        help_text="DICOM keywords in braces, e.g. {PatientID}.",
    )
    session_template = models.CharField(
        max_length=200,
        blank=True,
        default=DEFAULT_SESSION_TEMPLATE,
        help_text="DICOM keywords in braces; {StudyUIDHash} is a short hash of the "
        "StudyInstanceUID.",
    )
    overwrite = models.CharField(
        max_length=8,
        blank=True,
        default="none",
        choices=[("none", "None"), ("append", "Append"), ("delete", "Delete")],
    )
    destination = models.CharField(
        max_length=12,
        blank=True,
        default="prearchive",
        choices=[("prearchive", "Prearchive"), ("archive", "Archive")],
    )

    # -- dispatch policy -------------------------------------------------------------
    max_associations = models.PositiveSmallIntegerField(
        "parallel connections",
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(32)],
        help_text="Jobs (and DICOM associations) sent to this target at once.",
    )
    retry_max_attempts = models.PositiveSmallIntegerField(
        "max attempts", default=10, validators=[MinValueValidator(1)]
    )
    retry_base_delay = models.PositiveIntegerField(
        "first retry after (s)", default=30, validators=[MinValueValidator(1)]
    )
    retry_max_delay = models.PositiveIntegerField(
        "longest retry delay (s)", default=3600, validators=[MinValueValidator(1)]
    )
    paused = models.BooleanField(
        default=False, help_text="Jobs for a paused target wait until it is resumed."
    )

    # -- query tool ------------------------------------------------------------------
    export_groups = models.ManyToManyField(
        "auth.Group",
        blank=True,
        related_name="export_targets",
        verbose_name="groups that may export here",
        help_text="Members of these groups (with the permission to retrieve "
        "studies) may send query results to this target. Users with 'Can export "
        "retrieved studies to any target' may always.",
    )

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                Lower("name"),
                name="target_name_unique_ci",
                violation_error_message="A target with this name already exists.",
            ),
        ]

    # Set by each proxy.
    KIND: ClassVar[str | None] = None
    # Admin fieldsets for the kind's own settings (the "connection" part).
    connection_fields: ClassVar[tuple[str, ...]] = ()
    # Fields whose emptiness is a form error for this kind.
    required_fields: ClassVar[tuple[str, ...]] = ()
    # Whether the kind delivers a series folder's other files (reports, previews,
    # results) beside its DICOM instances; the DICOM kinds send DICOM only.
    delivers_other_files: ClassVar[bool] = False
    # Connection fields the admin form hides while they do not apply.
    show_if: ClassVar[tuple[ShowIf, ...]] = ()
    # Help texts for this kind's form, where a shared column means more here.
    help_texts: ClassVar[dict[str, str]] = {}

    def __str__(self) -> str:
        return self.name

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.KIND and not self.kind:
            self.kind = self.KIND

    # -- kind dispatch ---------------------------------------------------------------
    def as_kind(self) -> Target:
        """Return this row as the proxy instance of its kind."""
        proxy = PROXIES[self.kind]
        if type(self) is proxy:
            return self
        obj = proxy.__new__(proxy)
        obj.__dict__ = self.__dict__.copy()
        obj._state = self._state
        return obj

    @property
    def handler(self) -> Handler:
        return get_handler_class(self.kind)(self.as_kind())

    @property
    def can_query(self) -> bool:
        return self.kind in QUERYABLE_KINDS

    @property
    def can_store(self) -> bool:
        return self.direction in (Direction.STORE, Direction.BOTH)

    @property
    def is_query_source(self) -> bool:
        return self.can_query and self.direction in (Direction.QUERY, Direction.BOTH)

    @property
    def address(self) -> str:
        """A one-line address for overviews; never contains a secret."""
        proxy = self.as_kind()
        if type(proxy).address is not Target.address:
            return proxy.address
        return ""

    # -- validation ---------------------------------------------------------------------
    def clean(self) -> None:
        super().clean()
        errors: dict[str, list[str]] = {}
        if self.direction in (Direction.QUERY, Direction.BOTH) and not self.can_query:
            errors.setdefault("direction", []).append(
                f"{self.get_kind_display()} targets can only be stored to; "
                "choose direction Store."
            )
        for field in self.required_fields:
            value = getattr(self, field)
            if value in (None, ""):
                label = self._meta.get_field(field).verbose_name
                errors.setdefault(field, []).append(
                    f"A {self.get_kind_display()} target needs a {label}."
                )
        if errors:
            raise ValidationError(errors)


class KindManager(models.Manager):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def get_queryset(self):
        return super().get_queryset().filter(kind=self.kind)


def _kind_manager(kind: str) -> KindManager:
    return KindManager(kind)


class DicomTarget(Target):
    KIND = Kind.DICOM
    objects = _kind_manager(Kind.DICOM)
    connection_fields = (
        "host",
        "port",
        "called_aet",
        "calling_aet",
        "pass_calling_aet",
        "pass_called_aet",
        "connect_timeout",
        "acse_timeout",
        "dimse_timeout",
        "max_pdu",
    )
    required_fields = ("host", "port", "called_aet")

    class Meta:
        proxy = True
        verbose_name = "DICOM target"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{host}:{self.port} {self.called_aet}"


class DicomTlsTarget(DicomTarget):
    KIND = Kind.DICOM_TLS
    objects = _kind_manager(Kind.DICOM_TLS)
    connection_fields = DicomTarget.connection_fields + (
        "tls_client_key",
        "tls_client_cert",
        "tls_ca_cert",
        "key_passphrase",
        "tls_verify_hostname",
    )
    required_fields = DicomTarget.required_fields + ("tls_ca_cert",)

    class Meta:
        proxy = True
        verbose_name = "DICOM+TLS target"

    def clean(self) -> None:
        super().clean()
        from .kinds.dicom_tls import TlsConfigError, build_ssl_context

        if not self.tls_ca_cert:
            return
        for field in ("tls_ca_cert", "tls_client_cert", "tls_client_key"):
            setattr(self, field, (getattr(self, field) or "").strip())
        try:
            build_ssl_context(
                ca_cert=self.tls_ca_cert,
                client_cert=self.tls_client_cert,
                client_key=self.tls_client_key,
                passphrase=str(self.key_passphrase or ""),
                verify_hostname=self.tls_verify_hostname,
            )
        except TlsConfigError as exc:
            text = str(exc)
            field = (
                "tls_ca_cert"
                if "CA certificate" in text
                else "key_passphrase"
                if "passphrase" in text
                else "tls_client_key"
                if "client key" in text
                else "tls_client_cert"
            )
            raise ValidationError({field: text[0].upper() + text[1:] + "."}) from None


class DicomWebTarget(Target):
    KIND = Kind.DICOMWEB
    objects = _kind_manager(Kind.DICOMWEB)
    connection_fields = (
        "url",
        "qido_prefix",
        "wado_prefix",
        "stow_prefix",
        "auth",
        "username",
        "password",
        "token",
        "verify_tls",
        "ca_bundle",
        "request_timeout",
        "stow_batch_size",
        "stow_max_bytes",
    )
    required_fields = ("url",)
    help_texts = {
        "url": "The DICOMweb root, e.g. https://pacs.example.org/dicom-web; or "
        "file:///path/to/folder to make a local folder of DICOM files a query "
        "source (direction Query)."
    }
    show_if = (
        # A file:// URL is a local folder (a query source): no HTTP settings.
        ShowIf(
            (
                "qido_prefix",
                "wado_prefix",
                "stow_prefix",
                "auth",
                "username",
                "password",
                "token",
                "verify_tls",
                "ca_bundle",
                "request_timeout",
                "stow_batch_size",
                "stow_max_bytes",
            ),
            when="url",
            not_prefix="file://",
        ),
        ShowIf(("username", "password"), when="auth", equals=("basic",)),
        ShowIf(("token",), when="auth", equals=("bearer",)),
    )

    class Meta:
        proxy = True
        verbose_name = "DICOMweb target"

    @property
    def address(self) -> str:
        return self.url

    def clean(self) -> None:
        super().clean()
        errors: dict[str, list[str]] = {}
        url_error = _http_or_file_url_error(self.url, allow_file=True)
        if url_error:
            errors.setdefault("url", []).append(url_error)
        for field in ("qido_prefix", "wado_prefix", "stow_prefix"):
            value = (getattr(self, field) or "").strip().strip("/")
            if any(c in value for c in "?#") or " " in value:
                errors.setdefault(field, []).append(
                    "A prefix is a path such as dicom-web or rs (no spaces, ? or #)."
                )
            setattr(self, field, value)
        local = (self.url or "").lower().startswith("file://")
        if not local and self.auth in ("", "none"):
            # Credentials with authentication left at None would silently not be
            # sent: pick the method they mean, or say (at the authentication
            # choice, which is always shown) why not.
            login = bool(self.username or self.password)
            if login and self.token:
                errors.setdefault("auth", []).append(
                    "Both a login and a bearer token are set: choose Basic or "
                    "Bearer token (and clear the other)."
                )
            elif self.username and self.password:
                self.auth = "basic"
            elif self.username:
                errors.setdefault("auth", []).append(
                    f"The username {self.username!r} has no password, so no "
                    "credentials would be sent: choose Basic and enter the password, "
                    "or clear the username."
                )
            elif self.password:
                errors.setdefault("auth", []).append(
                    "A password is set without a username, so no credentials would "
                    "be sent: choose Basic and enter the username, or clear the "
                    "password."
                )
            elif self.token:
                self.auth = "bearer"
        if not local:
            if self.auth == "basic":
                if not self.username:
                    errors.setdefault("username", []).append(
                        "Basic authentication needs a username."
                    )
                if not self.password:
                    errors.setdefault("password", []).append(
                        "Basic authentication needs a password."
                    )
            elif self.auth == "bearer" and not self.token:
                errors.setdefault("token", []).append(
                    "Bearer authentication needs a token."
                )
            ca_error = _ca_bundle_error(self.ca_bundle)
            if ca_error:
                errors.setdefault("ca_bundle", []).append(ca_error)
        if errors:
            raise ValidationError(errors)


def _http_or_file_url_error(url: str, *, allow_file: bool) -> str | None:
    """Return why `url` is not a usable http(s) (or file://) URL, or None."""
    from pathlib import Path
    from urllib.parse import unquote, urlsplit

    if not url:
        return None
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "file" and allow_file:
        if parts.netloc not in ("", "localhost"):
            return "A file:// URL names a local folder: file:///path/to/folder."
        folder = Path(unquote(parts.path))
        if not folder.is_absolute() or not folder.is_dir():
            return f"The folder {folder} does not exist on this server."
        return None
    if scheme not in ("http", "https"):
        kinds = "http://, https:// or file://" if allow_file else "http:// or https://"
        return f"Enter a URL starting with {kinds}."
    if not parts.hostname:
        return "The URL has no host name."
    if parts.username or parts.password:
        return "Put the username and password in their own fields, not in the URL."
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "The URL's port is not a number between 1 and 65535."
    return None


def _ca_bundle_error(path: str) -> str | None:
    """Return why `path` is not a readable PEM CA bundle, or None."""
    import ssl

    if not path:
        return None
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        return f"{path} does not exist on this server."
    except PermissionError:
        return f"{path} is not readable by Courier."
    except (ssl.SSLError, OSError, ValueError):
        return f"{path} holds no PEM certificate."
    return None


class FolderTarget(Target):
    KIND = Kind.FOLDER
    objects = _kind_manager(Kind.FOLDER)
    connection_fields = ("path", "layout", "exclude", "write_complete_marker")
    required_fields = ("path",)
    delivers_other_files = True

    class Meta:
        proxy = True
        verbose_name = "Folder target"

    @property
    def address(self) -> str:
        return self.path

    def clean(self) -> None:
        super().clean()
        from .kinds.folder import layout_error

        errors = {}
        if self.path and not self.path.startswith("/"):
            errors["path"] = "Enter an absolute path (starting with /)."
        self.layout = (self.layout or "").strip()
        if self.layout and (problem := layout_error(self.layout)):
            errors["layout"] = problem
        if errors:
            raise ValidationError(errors)


class RsyncTarget(Target):
    KIND = Kind.RSYNC
    objects = _kind_manager(Kind.RSYNC)
    connection_fields = (
        "host",
        "port",
        "username",
        "password",
        "private_key_path",
        "private_key",
        "key_passphrase",
        "host_key",
        "path",
        "layout",
        "exclude",
        "run_on_complete",
        "complete_script",
        "connect_timeout",
    )
    required_fields = ("host", "username", "path")
    delivers_other_files = True
    show_if = (ShowIf(("complete_script",), when="run_on_complete", checked=True),)

    class Meta:
        proxy = True
        verbose_name = "rsync target"

    @property
    def address(self) -> str:
        return f"{self.username}@{self.host}:{self.path}"

    def clean(self) -> None:
        super().clean()
        _clean_ssh(self)
        if self.run_on_complete:
            script = (self.complete_script or "").strip()
            self.complete_script = script
            if not script:
                raise ValidationError(
                    {"complete_script": "Name the script to run after the transfer."}
                )
            if any(c in script for c in "\n\r\0\t "):
                raise ValidationError(
                    {
                        "complete_script": (
                            "Give only the script's file name or path: no spaces; Courier "
                            "adds the destination folder and target name as arguments."
                        )
                    }
                )


class S3Target(Target):
    KIND = Kind.S3
    objects = _kind_manager(Kind.S3)
    connection_fields = (
        "bucket",
        "region",
        "prefix",
        "endpoint_url",
        "addressing_style",
        "access_key_id",
        "secret_key",
        "storage_class",
        "server_side_encryption",
        "exclude",
    )
    required_fields = ("bucket", "access_key_id")
    delivers_other_files = True

    class Meta:
        proxy = True
        verbose_name = "S3 target"

    @property
    def address(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} ({self.endpoint_url})" if self.endpoint_url else where

    def clean(self) -> None:
        super().clean()
        errors: dict[str, str] = {}
        self.endpoint_url = (self.endpoint_url or "").strip().rstrip("/")
        if self.endpoint_url:
            error = _endpoint_url_error(self.endpoint_url)
            if error:
                errors["endpoint_url"] = error
        self.bucket = (self.bucket or "").strip()
        if self.bucket and not _S3_BUCKET.match(self.bucket):
            errors["bucket"] = (
                "Enter a bucket name of 3-63 lowercase letters, digits, dots and "
                "hyphens, starting and ending with a letter or digit."
            )
        self.region = (self.region or "").strip()
        if self.region and not _S3_REGION.match(self.region):
            errors["region"] = (
                "Enter a region such as eu-central-1 (letters, digits, -)."
            )
        self.prefix = "/".join(p for p in (self.prefix or "").strip().split("/") if p)
        if any(p in (".", "..") for p in self.prefix.split("/")):
            errors["prefix"] = "The prefix cannot contain . or .. parts."
        if self.access_key_id and not self.secret_key:
            errors["secret_key"] = "Enter the secret access key for this access key id."
        for field in ("storage_class", "server_side_encryption"):
            value = getattr(self, field).strip()
            setattr(self, field, value)
            if value and not _S3_TOKEN.match(value):
                errors[field] = (
                    "Use the value as S3 spells it, e.g. STANDARD_IA, AES256."
                )
        if errors:
            raise ValidationError(errors)


class SftpTarget(Target):
    KIND = Kind.SFTP
    objects = _kind_manager(Kind.SFTP)
    connection_fields = (
        "host",
        "port",
        "username",
        "password",
        "private_key_path",
        "private_key",
        "key_passphrase",
        "host_key",
        "path",
        "layout",
        "exclude",
        "write_complete_marker",
        "connect_timeout",
    )
    required_fields = ("host", "username", "path")
    delivers_other_files = True

    class Meta:
        proxy = True
        verbose_name = "SFTP target"

    @property
    def address(self) -> str:
        return f"{self.username}@{self.host}:{self.path}"

    def clean(self) -> None:
        super().clean()
        _clean_ssh(self)


_S3_BUCKET = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_REGION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
_S3_TOKEN = re.compile(r"^[A-Za-z0-9_:.-]{1,40}$")


def _endpoint_url_error(url: str) -> str:
    """Why `url` is not a usable S3 endpoint URL, or "" (any S3-compatible host)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "Enter a URL such as https://s3.example.org:9000."
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "Enter an http:// or https:// URL such as https://s3.example.org:9000."
    if parts.username or parts.password:
        return (
            "Do not put credentials in the URL: use the access key id and secret "
            "fields."
        )
    if parts.query or parts.fragment:
        return "The endpoint URL cannot have a query or fragment."
    try:
        validate_host(parts.hostname)
    except ValidationError:
        return "The endpoint URL's host is not a valid host name or IP address."
    return ""


def _clean_ssh(target: Target) -> None:
    """Shared rules for the SSH kinds (SFTP, rsync)."""
    from targets.kinds.ssh import is_valid_fingerprint, normalise_fingerprint

    errors: dict[str, str] = {}
    if not target.port:
        target.port = 22
    if target.host_key:
        target.host_key = normalise_fingerprint(target.host_key)
        if not is_valid_fingerprint(target.host_key):
            errors["host_key"] = (
                "Enter a SHA256 fingerprint as ssh-keygen -l shows it "
                "(SHA256:...), or leave it empty and pin the key from a Test."
            )
    if target.private_key_path and not target.private_key_path.startswith("/"):
        errors["private_key_path"] = "Enter an absolute path (starting with /)."
    if target.private_key and target.private_key_path:
        errors["private_key_path"] = "Give either a key file or a pasted key, not both."
    if target.path and any(c in target.path for c in "\n\r\0"):
        errors["path"] = "The folder cannot contain line breaks."
    if target.private_key or target.private_key_path:
        from targets.kinds.base import TargetError
        from targets.kinds.ssh import load_private_key

        try:
            load_private_key(target)
        except TargetError as exc:
            field = "private_key" if target.private_key else "private_key_path"
            errors.setdefault(field, exc.message)
    if errors:
        raise ValidationError(errors)


class XnatTarget(Target):
    KIND = Kind.XNAT
    objects = _kind_manager(Kind.XNAT)
    connection_fields = (
        "url",
        "project",
        "username",
        "password",
        "import_handler",
        "subject_template",
        "session_template",
        "overwrite",
        "destination",
        "verify_tls",
        "request_timeout",
    )
    required_fields = ("url", "project", "username")

    class Meta:
        proxy = True
        verbose_name = "XNAT target"

    @property
    def address(self) -> str:
        return f"{self.url} project {self.project}"

    def clean(self) -> None:
        super().clean()
        from pydicom.datadict import tag_for_keyword

        errors: dict[str, list[str]] = {}
        url_error = _http_or_file_url_error(self.url, allow_file=False)
        if url_error:
            errors.setdefault("url", []).append(url_error)
        if self.username and not self.password:
            errors.setdefault("password", []).append("XNAT needs the user's password.")
        self.project = (self.project or "").strip()
        if self.project and not re.fullmatch(r"[A-Za-z0-9_-]+", self.project):
            errors.setdefault("project", []).append(
                "Enter the project ID (letters, digits, _ and -), not its title."
            )
        for field in ("subject_template", "session_template"):
            template = (getattr(self, field) or "").strip()
            setattr(self, field, template)
            if not template:
                continue
            keys = re.findall(r"\{(\w*)\}", template)
            if not keys:
                errors.setdefault(field, []).append(
                    "Use at least one DICOM keyword in braces, e.g. {PatientID}."
                )
            unknown = [
                k
                for k in keys
                if k not in ("StudyUIDHash", "SeriesUIDHash")
                and tag_for_keyword(k) is None
            ]
            if unknown:
                errors.setdefault(field, []).append(
                    "Not DICOM keywords: "
                    + ", ".join(f"{{{k}}}" for k in unknown)
                    + "."
                )
            if template.count("{") != template.count("}"):
                errors.setdefault(field, []).append("Unbalanced braces.")
        if errors:
            raise ValidationError(errors)


PROXIES: dict[str, type[Target]] = {
    Kind.DICOM: DicomTarget,
    Kind.DICOM_TLS: DicomTlsTarget,
    Kind.DICOMWEB: DicomWebTarget,
    Kind.FOLDER: FolderTarget,
    Kind.RSYNC: RsyncTarget,
    Kind.S3: S3Target,
    Kind.SFTP: SftpTarget,
    Kind.XNAT: XnatTarget,
}


def get_handler_class(kind: str) -> type[Handler]:
    module_name, _, class_name = HANDLERS[kind].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)
