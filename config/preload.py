"""Import, before any thread starts, what Courier's threads would import lazily.

pydicom's import is not thread-safe: two threads importing different pydicom modules
for the first time at once (a job reading headers, the routing sweep loading the
receiver and with it pynetdicom) can deadlock inside the import system, which then
hands one of them a half-initialised module ("cannot import name 'UID' from partially
initialized module 'pydicom.uid'") and leaves it broken in `sys.modules` for the life
of the process. Web requests, worker tasks and receiver threads import pydicom,
pynetdicom and the kinds' handlers lazily (so that `manage.py` commands that need none
of them start quickly), so every process that runs those threads calls
`preload_for_threads()` from its main thread first: `run_huey`, `receive`, and the
WSGI application (runserver, gunicorn).
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger("courier")

# pydicom and pynetdicom, module by module: a thread may start with any of them.
LIBRARY_MODULES = (
    "pydicom",
    "pydicom.uid",
    "pydicom.valuerep",
    "pydicom.datadict",
    "pydicom.dataset",
    "pydicom.errors",
    "pydicom.filereader",
    "pydicom.filewriter",
    "pydicom.multival",
    "pydicom.charset",
    "pydicom.encaps",
    "pydicom.pixels",
    "pynetdicom",
    "pynetdicom.dsutils",
    "pynetdicom.pdu",
    "pynetdicom.presentation",
    "pynetdicom.sop_class",
    "pynetdicom.status",
)

# Courier's own modules that threads import on first use (they pull in boto3,
# paramiko, requests). The kinds' handlers and query sources come from the proxies.
COURIER_MODULES = (
    "targets.series",
    "targets.dicomnet.scp",
    "dispatch.jobs.engine",
    "dispatch.jobs.tasks",
    "dispatch.jobs.direct",
    "dispatch.routing.services",
    "dispatch.routing.tasks",
    "dispatch.receiving.receiver",
    "dispatch.receiving.bookkeeping",
    "querytool.services",
    "querytool.tasks",
)

_lock = threading.Lock()
_done = False


def modules() -> list[str]:
    """Every module `preload_for_threads()` imports, the kinds' handlers and query
    sources included (every dotted path a proxy names)."""
    from targets.models import PROXIES

    paths = [
        path
        for proxy in PROXIES.values()
        for name, path in vars(proxy).items()
        if name.endswith("_path") and isinstance(path, str)
    ]
    kinds = [path.rpartition(".")[0] for path in paths]
    return [*LIBRARY_MODULES, *COURIER_MODULES, *dict.fromkeys(kinds)]


def preload_for_threads() -> None:
    """Import everything Courier's threads use; call it before starting them.

    Idempotent. A module that cannot be imported (an optional library missing) is
    logged and skipped: the feature that needs it fails when used, as it would have.
    """
    global _done
    with _lock:
        if _done:
            return
        for name in modules():
            try:
                importlib.import_module(name)
            except ImportError as exc:
                log.warning("preload: cannot import %s (%s)", name, exc)
        _done = True
