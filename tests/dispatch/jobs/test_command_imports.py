"""What a management command loads: the import contract behind a quick start-up.

A script calls `send_series` once per series, so the command's start-up is paid per
series (README, "Performance"). A DICOM send walks files with Courier's own reader
and speaks DICOM through its own PDUs (`targets.dicomnet.scu`): it must not import
pydicom (with numpy) or pynetdicom, nor load the admin's pages; a one-file send
queues no message, so it loads neither the queue (huey, and redis-py with it) nor,
for a target without a secret, cryptography. These run the real
command in a fresh process and look at what it imported; conversion, which does need
pydicom, is covered by `tests/interop/test_corpus.py` through the same command.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.dicomgen import make_series
from tests.fixtures.dispatch_peers import PROJECT

# Loaded by none of the commands below (each is a module a heavy import brings).
HEAVY = (
    "numpy",
    "pydicom",
    "pynetdicom",
    "targets.admin",
    "dispatch.jobs.admin",
    "huey",
    "redis",
    "dispatch.jobs.tasks",
    "cryptography",
    # Django's debug page and its template engine, which Django's default logging
    # loads for a mail handler (config/settings.py configures logging itself).
    "django.views.debug",
)


def run_and_list_loaded(site, code: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run `code` in a fresh interpreter with the site's settings; return the
    process and which of HEAVY it had imported by the end (its last stdout line).

    Also prints, the line before, whether the garbage collector was on at the end
    and how many objects start-up had set aside from it (`config/apps.py`)."""
    program = (
        "import gc, json, sys\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + "finally:\n"
        "    print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))\n"
        f"    print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=site.env, cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    return done, json.loads(lines[-1])


def test_a_dicom_send_imports_neither_pydicom_nor_pynetdicom(
    courier_site, storescp, tmp_path
):
    site = courier_site().migrate()
    site.add_target(
        name="pacs", kind="dicom", host="127.0.0.1", port=storescp.port,
        called_aet=storescp.aet,
    )  # fmt: skip
    series = make_series(tmp_path / "in", 1)
    done, loaded = run_and_list_loaded(
        site,
        # manage.py as an operator runs it (its main(), which starts with the
        # garbage collector off).
        f"sys.argv = ['manage.py', 'send_series', 'pacs', {str(series.folder)!r}]\n"
        "import runpy\n"
        "runpy.run_path('manage.py', run_name='__main__')",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The collector is back on once Django is set up, with start-up's objects
    # set aside for good.
    enabled, frozen = json.loads(done.stdout.splitlines()[-2])
    assert enabled and frozen > 10_000
    assert "1 sent" in done.stdout and "0 failed of 1 instances" in done.stdout
    (received,) = [
        f for f in storescp.files() if f.name.endswith(f".{series.sop_uids[0]}.dcm")
    ]
    # The pixels as sent (storescp drops the CT example's trailing padding).
    assert series.files[0].read_bytes()[-20000:-4000] in received.read_bytes()
    assert loaded == []


def test_django_setup_loads_no_admin_page_and_the_checks_still_see_them(courier_site):
    site = courier_site()
    done, loaded = run_and_list_loaded(
        site,
        "import django\n"
        "django.setup()\n"
        "print(json.dumps([m for m in ('targets.admin', 'numpy', 'huey', 'redis') "
        "if m in sys.modules]))",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[0]) == []
    assert json.loads(done.stdout.splitlines()[-1]) == []

    # The admin's system checks load the pages first, so they check every one.
    done, _ = run_and_list_loaded(
        site,
        "import django\n"
        "django.setup()\n"
        "from django.contrib import admin\n"
        "from django.core import checks\n"
        "checks.run_checks(tags=[checks.Tags.admin])\n"
        "print(json.dumps(sorted(m._meta.label for m in admin.site._registry)))",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    registered = json.loads(done.stdout.splitlines()[0])
    assert {"targets.Target", "dispatch.Job"} <= set(registered)


def test_logging_is_django_s_default_and_courier_s_without_the_mail_handler(
    courier_site,
):
    """settings.py configures logging itself (LOGGING_CONFIG = None): what is logged
    and how stays Django's defaults plus Courier's lines; only the admins' mail
    handler (no ADMINS, so it never sent anything) is gone."""
    done, loaded = run_and_list_loaded(
        courier_site(),
        "import logging\n"
        "import django\n"
        "django.setup()\n"
        "def handlers(name):\n"
        "    logger = logging.getLogger(name)\n"
        "    return [logger.level, logger.propagate, [[type(h).__name__, "
        "type(h.formatter).__name__, [type(f).__name__ for f in h.filters]] "
        "for h in logger.handlers]]\n"
        "print(json.dumps({n: handlers(n) for n in "
        "('root', 'django', 'django.server', 'huey', 'pynetdicom')}))\n"
        "logging.getLogger('django.request').error('bad\\nline')\n"
        "logging.getLogger('django.server').info('GET / 200')\n",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[0]) == {
        "root": [20, True, [["StreamHandler", "SafeFormatter", []]]],
        # Django's console handler (only with DEBUG on); no AdminEmailHandler.
        "django": [20, True, [["StreamHandler", "NoneType", ["RequireDebugTrue"]]]],
        "django.server": [20, False, [["StreamHandler", "ServerFormatter", []]]],
        "huey": [20, False, [["StreamHandler", "SafeFormatter", []]]],
        "pynetdicom": [30, True, []],
    }
    # A Django error goes through Courier's line format, its line break escaped;
    # runserver's request lines keep Django's.
    assert "level=ERROR logger=django.request bad\\nline" in done.stderr
    assert "] GET / 200" in done.stderr
    assert loaded == []
