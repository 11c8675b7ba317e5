"""The WSGI application (runserver, gunicorn)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()

# Requests run in threads (runserver, gunicorn's threaded workers) and import pydicom
# and the kinds' handlers on first use: import them now, before any request thread.
from config.preload import preload_for_threads  # noqa: E402

preload_for_threads()

# The URLconf, and with it every admin module (not loaded by django.setup(),
# config.admin_site), also before the first request thread.
from django.urls import get_resolver  # noqa: E402

get_resolver().url_patterns  # noqa: B018
