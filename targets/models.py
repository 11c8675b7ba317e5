"""Targets: one concrete table, one proxy model per kind; the proxies are the registry.

Per-kind settings are nullable columns on `Target`, shared where the meaning is shared
(host, port, username, path, url, ...). Each proxy pins its kind, filters its manager
and declares everything else Courier knows about the kind: its handler, its query
source (where it can be queried) and its settings validation as dotted paths into
`targets/kinds/<kind>/` (imported only when used, so importing this module loads no
boto3, paramiko or pydicom), whether it can C-MOVE, its hint on the kind chooser, its
admin fields and their rules. Everything else derives from `PROXIES`; nothing
outside the proxies branches on a kind.
"""

# Why this module is long: one table holds every kind's columns and each kind's
# proxy is its registry entry; one place to read all of them is the point.

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models.functions import Lower
from django.utils.module_loading import import_string

from .kinds.xnat.labels import DEFAULT_SESSION_TEMPLATE, DEFAULT_SUBJECT_TEMPLATE
from .secrets import EncryptedTextField
from .series import DEFAULT_LAYOUT
from .validators import validate_ae_title, validate_globs, validate_host

if TYPE_CHECKING:
    from .kinds.base import Handler
    from .query import QuerySource


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
    request_commitment = models.BooleanField(
        "request storage commitment",
        default=False,
        help_text="After each series, ask the target to commit (take responsibility "
        "for) what it received (Storage Commitment, N-ACTION). A job is done only "
        "when the target reports every instance committed; what it does not commit "
        "is sent again. The target sends its report on the same association or to "
        "Courier's receiver: register Courier's Source AET with the receiver's "
        "host and port on the PACS.",
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
    max_connections = models.PositiveSmallIntegerField(
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

    # -- the kind's facts: each proxy declares every one of these itself -----------
    KIND: ClassVar[str | None] = None
    # Dotted path of the kind's `Handler` (send, Test).
    handler_path: ClassVar[str] = ""
    # Dotted path of its `QuerySource`; None: the kind cannot be queried.
    query_source_path: ClassVar[str | None] = None
    # Dotted path of `clean(target)`, its settings rules beyond the required fields
    # and the columns' own validators; None: it has none.
    validation_path: ClassVar[str | None] = None
    # Whether a search's results can be C-MOVEd from it to another AE title.
    can_move: ClassVar[bool] = False
    # One line about the kind on the "Add target" chooser.
    hint: ClassVar[str] = ""
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
    # Whether the kind can ask for Storage Commitment (its handler implements
    # `request_commitment`, and its form shows the option).
    can_commit: ClassVar[bool] = False

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
        proxy = self.as_kind()
        return import_string(proxy.handler_path_for_settings())(proxy)

    def query_source(self) -> QuerySource:
        """The source that answers searches on this target; `SourceError` if none."""
        proxy = self.as_kind()
        path = proxy.query_source_path_for_settings()
        if path is None:
            # The query contracts load with the first search, not with the models.
            from .query import SourceError

            raise SourceError(f"{self.get_kind_display()} targets cannot be queried.")
        return import_string(path)(proxy)

    def handler_path_for_settings(self) -> str:
        """The handler for this target as it is set up (a proxy may choose)."""
        return self.handler_path

    def query_source_path_for_settings(self) -> str | None:
        """The query source for this target as it is set up (a proxy may choose)."""
        return self.query_source_path

    @property
    def can_query(self) -> bool:
        return PROXIES[self.kind].query_source_path is not None

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
        if self.validation_path:
            import_string(self.validation_path)(self)


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
    handler_path = "targets.kinds.dicom.handler.DicomHandler"
    query_source_path = "targets.kinds.dicom.query.DicomQuery"
    validation_path = "targets.kinds.dicom.validation.clean"
    can_move = True
    hint = "C-STORE to a PACS, modality or workstation (DIMSE)."
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
        "username",
        "password",
        "request_commitment",
    )
    required_fields = ("host", "port", "called_aet")
    can_commit = True
    help_texts = {
        "username": "User Identity (PS3.7 D.3.3.7): for an archive that requires a "
        "login on the association. Sent on sends, Tests and queries; leave empty "
        "otherwise.",
        "password": "Sent with the username (User Identity); kept encrypted.",
    }

    class Meta:
        proxy = True
        verbose_name = "DICOM target"

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{host}:{self.port} {self.called_aet}"


class DicomTlsTarget(DicomTarget):
    KIND = Kind.DICOM_TLS
    handler_path = "targets.kinds.dicom_tls.handler.DicomTlsHandler"
    # Pushing only (the product page's "Pull" column says N for DICOM+TLS).
    query_source_path = None
    validation_path = "targets.kinds.dicom_tls.validation.clean"
    can_move = False
    hint = "DICOM over TLS, with certificates."
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


class DicomWebTarget(Target):
    KIND = Kind.DICOMWEB
    handler_path = "targets.kinds.dicomweb.handler.DicomWebHandler"
    query_source_path = "targets.kinds.dicomweb.query.DicomWebQuery"
    validation_path = "targets.kinds.dicomweb.validation.clean"
    can_move = False
    hint = (
        "STOW-RS / QIDO-RS / WADO-RS over HTTP(S). With a file:// URL instead, a "
        "local folder of DICOM files becomes a query source."
    )
    # A file:// URL names a local folder: these stand in for the HTTP ones.
    local_handler_path = "targets.kinds.dicomweb.local.LocalFolderHandler"
    local_query_source_path = "targets.kinds.dicomweb.local.LocalFolderQuery"
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
        # Every connection setting but the URL (the first).
        ShowIf(connection_fields[1:], when="url", not_prefix="file://"),
        ShowIf(("username", "password"), when="auth", equals=("basic",)),
        ShowIf(("token",), when="auth", equals=("bearer",)),
    )

    class Meta:
        proxy = True
        verbose_name = "DICOMweb target"

    @property
    def address(self) -> str:
        return self.url

    @property
    def is_local_folder(self) -> bool:
        return (self.url or "").lower().startswith("file://")

    def handler_path_for_settings(self) -> str:
        return self.local_handler_path if self.is_local_folder else self.handler_path

    def query_source_path_for_settings(self) -> str | None:
        if self.is_local_folder:
            return self.local_query_source_path
        return self.query_source_path


class FolderTarget(Target):
    KIND = Kind.FOLDER
    handler_path = "targets.kinds.folder.handler.FolderHandler"
    query_source_path = None
    validation_path = "targets.kinds.folder.validation.clean"
    can_move = False
    hint = (
        "Files in a local or mounted folder, one folder per series (to query a "
        "folder, add a DICOMweb target with a file:// URL)."
    )
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


class RsyncTarget(Target):
    KIND = Kind.RSYNC
    handler_path = "targets.kinds.rsync.handler.RsyncHandler"
    query_source_path = None
    validation_path = "targets.kinds.rsync.validation.clean"
    can_move = False
    hint = "rsync over SSH to a remote folder."
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


class S3Target(Target):
    KIND = Kind.S3
    handler_path = "targets.kinds.s3.handler.S3Handler"
    query_source_path = None
    validation_path = "targets.kinds.s3.validation.clean"
    can_move = False
    hint = "Objects in an S3 bucket (AWS or any S3-compatible store)."
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


class SftpTarget(Target):
    KIND = Kind.SFTP
    handler_path = "targets.kinds.sftp.handler.SftpHandler"
    query_source_path = None
    validation_path = "targets.kinds.sftp.validation.clean"
    can_move = False
    hint = "Files over SFTP to a remote folder."
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


class XnatTarget(Target):
    KIND = Kind.XNAT
    handler_path = "targets.kinds.xnat.handler.XnatHandler"
    query_source_path = None
    validation_path = "targets.kinds.xnat.validation.clean"
    can_move = False
    hint = "Sessions in an XNAT project."
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
        "ca_bundle",
        "request_timeout",
    )
    required_fields = ("url", "project", "username")

    class Meta:
        proxy = True
        verbose_name = "XNAT target"

    @property
    def address(self) -> str:
        return f"{self.url} project {self.project}"


# The one map from a kind to its proxy: every list of kinds derives from it.
PROXIES: dict[str, type[Target]] = {
    proxy.KIND: proxy
    for proxy in (
        DicomTarget,
        DicomTlsTarget,
        DicomWebTarget,
        FolderTarget,
        RsyncTarget,
        S3Target,
        SftpTarget,
        XnatTarget,
    )
}
