"""The data directory is 0700 and every file Courier keeps there 0600.

Checked on real files: a `manage.py shell` process with a fresh data directory
migrates, writes to the database and the huey queue and builds folder indexes, then
reports every file's mode while its connections (and so the -wal and -shm files)
are still open.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from targets.checks import check_data_dir

MANAGE = Path(settings.BASE_DIR) / "manage.py"

SCRIPT = """
import json, os, stat
from pathlib import Path
from django.conf import settings
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth.models import User
User.objects.get_or_create(username="someone")
from huey.contrib.djhuey import HUEY
HUEY.put("probe", "1")
from targets.kinds.dicomweb import index
watched = Path(os.environ["WATCHED"])
index.FolderIndex(watched)
index.folder_is_writable = lambda folder: False
index.FolderIndex(watched)
paths = [settings.DATA_DIR, *settings.DATA_DIR.rglob("*"), *watched.iterdir()]
print(json.dumps({str(p): stat.S_IMODE(os.stat(p).st_mode) for p in paths}))
"""


def run(data: Path, watched: Path, code: str = SCRIPT) -> dict[str, int]:
    env = {**os.environ, "COURIER_DATA_DIR": str(data), "WATCHED": str(watched)}
    done = subprocess.run(
        [sys.executable, str(MANAGE), "shell", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]) if code == SCRIPT else {}


def private(modes: dict[str, int], data: Path) -> None:
    static = data / "static"
    for path, mode in modes.items():
        if Path(path).is_relative_to(static):
            continue  # the admin's public CSS and JavaScript
        want = 0o700 if Path(path).is_dir() else 0o600
        assert mode == want, f"{path} is {oct(mode)}"


def test_every_file_in_a_new_data_dir_is_private(tmp_path):
    data, watched = tmp_path / "data", tmp_path / "watched"
    watched.mkdir()
    watched.chmod(0o755)

    modes = run(data, watched)

    names = {Path(p).name for p in modes}
    # The files this is about were all there to be checked.
    for name in (
        "courier.sqlite3",
        "courier.sqlite3-wal",
        "courier.sqlite3-shm",
        "huey.sqlite3",
        "secret_key",
        "encryption_key",
        ".courier-index.sqlite3",
    ):
        assert name in names, name
    assert any(Path(p).parent.name == "indexes" for p in modes)
    private({p: m for p, m in modes.items() if Path(p).is_relative_to(data)}, data)
    assert modes[str(watched / ".courier-index.sqlite3")] == 0o600


def test_an_old_data_dir_is_made_private_at_start(tmp_path):
    data, watched = tmp_path / "data", tmp_path / "watched"
    watched.mkdir()
    run(data, watched)
    # As an earlier version left it: readable by every local user.
    data.chmod(0o755)
    for path in data.rglob("*"):
        if path.is_file():
            path.chmod(0o644)

    modes = run(data, watched)

    private({p: m for p, m in modes.items() if Path(p).is_relative_to(data)}, data)


def test_a_data_dir_others_can_read_is_a_system_check_warning(tmp_path, settings):
    settings.DATA_DIR = tmp_path
    (tmp_path / "courier.sqlite3").write_text("")
    tmp_path.chmod(0o700)
    (tmp_path / "courier.sqlite3").chmod(0o600)
    assert check_data_dir(None) == []

    (tmp_path / "courier.sqlite3").chmod(0o644)
    [warning] = check_data_dir(None)
    assert warning.id == "courier.W010" and "courier.sqlite3" in warning.msg
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
