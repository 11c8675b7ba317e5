"""Courier settings: everything comes from the environment or an optional `.env`.

With no configuration at all Courier runs embedded: SQLite and SqliteHuey in a data
directory under the project. `DATABASE_URL` and `REDIS_URL` switch to PostgreSQL and
RedisHuey for sites that outgrow one box.
"""

from __future__ import annotations

import logging.config
import os
import secrets
import time
from datetime import timedelta
from pathlib import Path

import environ

from targets.paths import private_dir, private_file, private_sqlite

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DATA_DIR = Path(env.str("COURIER_DATA_DIR", default=str(BASE_DIR / "data"))).resolve()
# 0700, and 0600 for every file Courier keeps there (checked by courier.W010).
try:
    private_dir(DATA_DIR)
except PermissionError:  # owned by another user: the system check says so
    DATA_DIR.mkdir(parents=True, exist_ok=True)


def _persistent_secret(name: str) -> str:
    """Return a random secret kept in the data directory, created on first use.

    The embedded mode must run without configuration, yet a secret must survive a
    restart (sessions, encrypted target secrets), so it is generated once and kept.
    """
    path = DATA_DIR / name
    try:
        # O_EXCL: of two processes starting at once, exactly one writes it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        private_file(path)  # one from before 0600 was the rule
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
            f.flush()
            os.fsync(f.fileno())
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.1)  # the process that created it is writing it now
    raise RuntimeError(f"{path} is empty: delete it to have a new one generated.")


SECRET_KEY = env.str("SECRET_KEY", default="") or _persistent_secret("secret_key")
# Key for target secrets at rest (passwords, tokens, S3 secret keys, passphrases).
# Losing it makes stored secrets unreadable; check `courier.E001` reports a wrong one.
COURIER_ENCRYPTION_KEY = env.str("COURIER_ENCRYPTION_KEY", default="") or (
    _persistent_secret("encryption_key")
)
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "config.admin_site.CourierAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "targets",
    # Dispatch is three apps, each importing only those above it in this list:
    # jobs, routing (turns received series into jobs), receiving (the DICOM node).
    "dispatch.jobs",
    "dispatch.routing",
    "dispatch.receiving",
    "querytool",
    # Not huey.contrib.djhuey: the queue is imported by what sends a message or runs
    # one (dispatch's run_huey is huey's command after a preload), never by
    # django.setup(), so a command that queues nothing does not load huey and redis-py.
    # Last: its ready() ends the start-up (the garbage collector, config/apps.py).
    "config.apps.StartupConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's CSS/JS) from the app itself, also under gunicorn.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db(
        "DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'courier.sqlite3'}"
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    if DATABASES["default"]["NAME"] not in ("", ":memory:"):
        private_sqlite(DATABASES["default"]["NAME"])
    # The web server and the worker share the file: wait for locks instead of
    # failing, and let readers run beside the writer.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Kept between worker tasks (huey closes them after every task otherwise):
    # a new SQLite connection runs the pragmas above and registers Django's
    # functions again, a few percent of a small job's time.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=300)
    # The test database is a file too (in the run's own data dir), not Django's
    # shared-cache in-memory default: that one answers "table is locked" at once
    # instead of waiting when the receiver's thread writes beside a test.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-courier.sqlite3")}
else:
    # Keep server connections open between worker tasks (huey closes them after
    # every task otherwise): a new PostgreSQL connection costs a process fork.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=300)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="")
HUEY_IMMEDIATE = env.bool("HUEY_IMMEDIATE", default=False)
if REDIS_URL:
    HUEY = {
        "huey_class": "huey.PriorityRedisHuey",
        "name": env.str("HUEY_NAME", default="courier"),
        "url": REDIS_URL,
        "immediate": HUEY_IMMEDIATE,
        "consumer": {
            "workers": env.int("COURIER_WORKERS", default=4),
            "worker_type": "thread",
        },
    }
else:
    HUEY = {
        # SqliteHuey whose commits do not wait for the disk (config/queue.py).
        "huey_class": "config.queue.CourierSqliteHuey",
        "name": "courier",
        "filename": str(private_sqlite(DATA_DIR / "huey.sqlite3")),
        "immediate": HUEY_IMMEDIATE,
        "consumer": {
            "workers": env.int("COURIER_WORKERS", default=4),
            "worker_type": "thread",
            # An idle thread polls the queue's file; huey backs off to once every
            # 10 s, which the first job after a quiet spell waited. 1 s at most.
            "max_delay": 1.0,
        },
    }

AUTH_PASSWORD_VALIDATORS = [
    {
        "NAME": "django.contrib.auth.password_validation."
        "UserAttributeSimilarityValidator"
    },
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": env.int("COURIER_PASSWORD_MIN_LENGTH", default=12)},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# -- login throttling (django-axes) ----------------------------------------------------
# Failed logins are counted in the database (so across every web process and
# machine) per username and client address; after COURIER_LOGIN_FAILURE_LIMIT
# failures that pair is locked out for COURIER_LOGIN_LOCKOUT_MINUTES. Another address
# can still log in as that user, so a guesser cannot lock the real admin out.
# `manage.py axes_reset` unlocks everyone; the admin lists attempts and lockouts.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("COURIER_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(
    minutes=env.float("COURIER_LOGIN_LOCKOUT_MINUTES", default=15)
)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_ENABLE_ACCESS_FAILURE_LOG = True

# -- sessions --------------------------------------------------------------------------
# A session ends after COURIER_SESSION_IDLE_MINUTES without a request (each request
# moves the deadline), and with the browser.
SESSION_COOKIE_AGE = int(env.float("COURIER_SESSION_IDLE_MINUTES", default=30) * 60)
SESSION_SAVE_EVERY_REQUEST = True
SESSION_EXPIRE_AT_BROWSER_CLOSE = True

# -- HTTPS (production: behind a TLS proxy, see the README's "Security") ---------------
# COURIER_HTTPS=true: cookies only over HTTPS, plain HTTP redirected (except the
# monitoring URL, polled on the loopback port), HSTS. COURIER_PROXY_SSL_HEADER names
# the header the proxy sets to "https" (e.g. X-Forwarded-Proto); set it only when
# a proxy that always sets that header is the sole way in. Behind it, the client
# address for login throttling is the last X-Forwarded-For entry (the proxy's view).
COURIER_HTTPS = env.bool("COURIER_HTTPS", default=False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = COURIER_HTTPS
SECURE_SSL_REDIRECT = COURIER_HTTPS
SECURE_REDIRECT_EXEMPT = [r"^health/$"]
SECURE_HSTS_SECONDS = env.int(
    "COURIER_HSTS_SECONDS", default=365 * 24 * 3600 if COURIER_HTTPS else 0
)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool(
    "COURIER_HSTS_INCLUDE_SUBDOMAINS", default=True
)
SECURE_HSTS_PRELOAD = env.bool("COURIER_HSTS_PRELOAD", default=True)
_PROXY_SSL_HEADER = env.str("COURIER_PROXY_SSL_HEADER", default="").strip()
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _PROXY_SSL_HEADER.upper().replace("-", "_"), "https")
    if _PROXY_SSL_HEADER
    else None
)


def _client_ip(request) -> str | None:
    """The client's address for login throttling (see above)."""
    if SECURE_PROXY_SSL_HEADER:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        if forwarded.strip():
            return forwarded.split(",")[-1].strip()
    return request.META.get("REMOTE_ADDR")


def _client_str(username, ip_address, user_agent, path_info, request) -> str:
    """How axes names a client in its log lines: quoted, so a username holding a
    line break cannot forge a log line."""
    path = path_info[0] if isinstance(path_info, tuple | list) else path_info
    return f"user={username!r} ip={ip_address!r} path={path!r}"


AXES_CLIENT_IP_CALLABLE = _client_ip
AXES_CLIENT_STR_CALLABLE = _client_str
AXES_VERBOSE = False  # no banner on every manage.py command

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True
# One date format on every page (2025-03-14, 2025-03-14 09:26:53): config/formats/.
FORMAT_MODULE_PATH = ["config.formats"]

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(DATA_DIR / "static")))
# Serve straight from the apps' static folders when `collectstatic` was not run
# (./courier run); production runs `collectstatic` once per release.
WHITENOISE_USE_FINDERS = True
try:  # whitenoise warns at every start-up when the folder is missing
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
except OSError:
    pass

LOGIN_URL = "admin:login"

# Courier's own identity on the DICOM network.
COURIER_AE_TITLE = env.str("COURIER_AE_TITLE", default="COURIER")
# Where received and queued series wait until every job for them is done.
COURIER_SPOOL_DIR = Path(env.str("COURIER_SPOOL_DIR", default=str(DATA_DIR / "spool")))
# New targets' DIMSE timeout: short, so a peer that stops answering (PEERS.md: Orthanc
# sometimes never answers a C-STORE) frees the worker soon; each target can change it.
COURIER_DIMSE_TIMEOUT = env.float("COURIER_DIMSE_TIMEOUT", default=10.0)
# Dispatch: a worker's claim on a job lasts this long unless renewed (it renews every
# fifth of it, from a thread of its own, while it holds the job); after a worker dies
# any live worker resumes its jobs once the lease runs out. Short, so a crash costs
# seconds; the machines' clocks must agree to well within it (NTP).
COURIER_JOB_LEASE = env.float("COURIER_JOB_LEASE", default=15.0)
# Storage Commitment (DICOM targets with "request storage commitment"): how long an
# attempt waits for the target's N-EVENT-REPORT after its N-ACTION before it fails and
# is retried like any other failure. The worker keeps the job (and renews its lease)
# meanwhile, holding one of the target's connections.
COURIER_COMMITMENT_WAIT = env.float("COURIER_COMMITMENT_WAIT", default=120.0)
# Storage Commitment transactions (what each target reported) are kept this many
# days, then deleted by the workers' sweep.
COURIER_COMMITMENT_RETENTION_DAYS = env.float(
    "COURIER_COMMITMENT_RETENTION_DAYS", default=30.0
)
# Spool folders of failed or cancelled jobs are kept this many days, then deleted.
COURIER_FAILED_RETENTION_DAYS = env.float("COURIER_FAILED_RETENTION_DAYS", default=14.0)
# Receiver (manage.py receive, started by runcourier): its port, the calling AE titles
# it accepts (empty: any), the quiet period after which a series is complete, the free
# space it keeps on the spool disk (below it: "out of resources"), the target for
# series no rule matches (a target name; empty keeps them as "unrouted"), and how many
# days failed and unrouted received series are kept for re-routing.
COURIER_RECEIVER_PORT = env.int("COURIER_RECEIVER_PORT", default=11112)
COURIER_RECEIVER_ACCEPTED_CALLING_AETS = env.list(
    "COURIER_RECEIVER_ACCEPTED_CALLING_AETS", default=[]
)
COURIER_SERIES_QUIET_SECONDS = env.float("COURIER_SERIES_QUIET_SECONDS", default=60.0)
COURIER_MIN_FREE_BYTES = env.int("COURIER_MIN_FREE_BYTES", default=2 * 1024**3)
# Receiver limits (README, "Receiving and routing"): the largest instance it takes
# (streamed to disk, so memory does not depend on it), established associations at
# once, connections from one address, and the deadlines that keep slow or silent
# peers from holding the intake: a complete association request within N s of
# connecting, each PDU within M s of its first byte, silence in an association.
COURIER_RECEIVER_MAX_INSTANCE_BYTES = env.int(
    "COURIER_RECEIVER_MAX_INSTANCE_BYTES", default=4 * 1024**3
)
COURIER_RECEIVER_MAX_ASSOCIATIONS = env.int(
    "COURIER_RECEIVER_MAX_ASSOCIATIONS", default=64
)
COURIER_RECEIVER_MAX_ASSOCIATIONS_PER_PEER = env.int(
    "COURIER_RECEIVER_MAX_ASSOCIATIONS_PER_PEER", default=16
)
COURIER_RECEIVER_ASSOCIATE_TIMEOUT = env.float(
    "COURIER_RECEIVER_ASSOCIATE_TIMEOUT", default=10.0
)
COURIER_RECEIVER_PDU_TIMEOUT = env.float("COURIER_RECEIVER_PDU_TIMEOUT", default=30.0)
COURIER_RECEIVER_IDLE_TIMEOUT = env.float("COURIER_RECEIVER_IDLE_TIMEOUT", default=60.0)
COURIER_RECEIVER_LISTEN_BACKLOG = env.int(
    "COURIER_RECEIVER_LISTEN_BACKLOG", default=256
)
# Storage Commitment: where to deliver a report when the modality that asked has
# already closed its association: comma-separated AET=host:port (README).
COURIER_RECEIVER_COMMITMENT_PEERS = env.list(
    "COURIER_RECEIVER_COMMITMENT_PEERS", default=[]
)
COURIER_UNROUTED_DEFAULT_TARGET = env.str("COURIER_UNROUTED_DEFAULT_TARGET", default="")
COURIER_UNROUTED_RETENTION_DAYS = env.float(
    "COURIER_UNROUTED_RETENTION_DAYS", default=COURIER_FAILED_RETENTION_DAYS
)
# Query tool: a local folder's index is rescanned before a query when older than this.
COURIER_INDEX_MAX_AGE = env.float("COURIER_INDEX_MAX_AGE", default=60.0)
# Query tool: where "local download folder" retrievals go.
COURIER_DOWNLOAD_DIR = Path(
    env.str("COURIER_DOWNLOAD_DIR", default=str(DATA_DIR / "downloads"))
)
# Query tool: at most this many studies per source and search.
COURIER_QUERY_LIMIT = env.int("COURIER_QUERY_LIMIT", default=200)

# Logging is configured here, once, from LOGGING alone (LOGGING_CONFIG = None, as
# Django documents): Django would first apply its DEFAULT_LOGGING, whose effects are
# the "django" loggers below (kept) and an AdminEmailHandler that sends nothing
# (Courier sets no ADMINS) but loads the debug page's template engine, ~5 ms of
# every process's start-up.
LOGGING_CONFIG = None
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"require_debug_true": {"()": "django.utils.log.RequireDebugTrue"}},
    "formatters": {
        # key=value lines a log collector can parse
        # (config.safetext: control characters escaped, so no value from the network
        # can start a line of its own)
        "plain": {
            "()": "config.safetext.SafeFormatter",
            "format": "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        },
        # Django's own, for runserver's request lines.
        "django.server": {
            "()": "django.utils.log.ServerFormatter",
            "format": "[{server_time}] {message}",
            "style": "{",
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        # Django's defaults: its records also unformatted on stderr when DEBUG is on,
        # and runserver's request lines.
        "django.console": {
            "level": "INFO",
            "filters": ["require_debug_true"],
            "class": "logging.StreamHandler",
        },
        "django.server": {
            "level": "INFO",
            "class": "logging.StreamHandler",
            "formatter": "django.server",
        },
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "pynetdicom": {"level": "WARNING"},
        "paramiko": {"level": "WARNING"},
        "botocore": {"level": "WARNING"},
        "urllib3": {"level": "WARNING"},
        # A handler here stops run_huey from adding its own (no doubled lines).
        "huey": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "django": {"level": "INFO", "handlers": ["django.console"]},
        "django.server": {
            "level": "INFO",
            "handlers": ["django.server"],
            "propagate": False,
        },
    },
}
logging.config.dictConfig(LOGGING)
