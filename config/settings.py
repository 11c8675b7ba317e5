"""Courier settings: everything comes from the environment or an optional `.env`.

With no configuration at all Courier runs embedded: SQLite and SqliteHuey in a data
directory under the project. `DATABASE_URL` and `REDIS_URL` switch to PostgreSQL and
RedisHuey for sites that outgrow one box.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DATA_DIR = Path(env.str("COURIER_DATA_DIR", default=str(BASE_DIR / "data"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _persistent_secret(name: str) -> str:
    """Return a random secret kept in the data directory, created on first use.

    The embedded mode must run without configuration, yet a secret must survive a
    restart (sessions, encrypted target secrets), so it is generated once and kept.
    """
    path = DATA_DIR / name
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


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
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "targets",
    "dispatch",
    "querytool",
    # After dispatch: its run_huey (preload, then huey's consumer) replaces huey's.
    "huey.contrib.djhuey",
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
    # The web server and the worker share the file: wait for locks instead of
    # failing, and let readers run beside the writer.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
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
        "huey_class": "huey.SqliteHuey",
        "name": "courier",
        "filename": str(DATA_DIR / "huey.sqlite3"),
        "immediate": HUEY_IMMEDIATE,
        "consumer": {
            "workers": env.int("COURIER_WORKERS", default=4),
            "worker_type": "thread",
        },
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

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

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        # key=value lines a log collector can parse
        "plain": {
            "format": "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "pynetdicom": {"level": "WARNING"},
        "paramiko": {"level": "WARNING"},
        "botocore": {"level": "WARNING"},
        "urllib3": {"level": "WARNING"},
        # A handler here stops run_huey from adding its own (no doubled lines).
        "huey": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}
