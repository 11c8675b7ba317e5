"""`manage.py check --deploy` is clean with the README's production settings.

Each case is a real `manage.py` process given only environment variables, as a
systemd unit's EnvironmentFile would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

MANAGE = Path(settings.BASE_DIR) / "manage.py"

# The README's "Security" section: behind a TLS proxy.
PRODUCTION = {
    "COURIER_HTTPS": "true",
    "COURIER_PROXY_SSL_HEADER": "X-Forwarded-Proto",
    "ALLOWED_HOSTS": "courier.example.org,testserver",
    "DEBUG": "false",
}


def manage(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COURIER_HTTPS", "COURIER_PROXY", "COURIER_HSTS"))
    }
    return subprocess.run(
        [sys.executable, str(MANAGE), *args],
        env={**clean, "COURIER_DATA_DIR": str(tmp_path / "data"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_the_documented_production_settings(tmp_path):
    done = manage(
        tmp_path, "check", "--deploy", "--fail-level", "WARNING", **PRODUCTION
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_check_deploy_names_what_is_missing_without_them(tmp_path):
    done = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode != 0
    out = done.stdout + done.stderr
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in out


SCRIPT = """
import json
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.test import Client
c = Client()
plain = c.get("/admin/login/")
health = c.get("/health/")
proxied = c.get("/admin/login/", headers={"X-Forwarded-Proto": "https"})
print(json.dumps({
    "plain": [plain.status_code, plain.get("Location", "")],
    "health": health.status_code,
    "proxied": proxied.status_code,
    "hsts": proxied.get("Strict-Transport-Security", ""),
    "csrf_cookie_secure": bool(proxied.cookies["csrftoken"]["secure"]),
}))
"""


def test_behind_the_proxy_http_is_redirected_https_gets_hsts_and_secure_cookies(
    tmp_path,
):
    done = manage(tmp_path, "shell", "-c", SCRIPT, **PRODUCTION)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    assert seen["plain"] == [301, "https://testserver/admin/login/"]
    assert seen["health"] in (200, 503)  # monitoring polls plain HTTP on loopback
    assert seen["proxied"] == 200
    assert seen["hsts"] == "max-age=31536000; includeSubDomains; preload"
    assert seen["csrf_cookie_secure"] is True
