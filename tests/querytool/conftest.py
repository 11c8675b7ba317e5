"""Query tool test helpers: huey in immediate mode, spool/download/data dirs in tmp."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from huey.contrib.djhuey import HUEY


@pytest.fixture
def immediate_huey():
    before = HUEY.immediate
    HUEY.immediate = True
    try:
        yield HUEY
    finally:
        HUEY.immediate = before


@pytest.fixture
def courier_dirs(settings, tmp_path):
    for name, setting in (
        ("spool", "COURIER_SPOOL_DIR"),
        ("downloads", "COURIER_DOWNLOAD_DIR"),
        ("data", "DATA_DIR"),
    ):
        path = tmp_path / name
        path.mkdir()
        setattr(settings, setting, path)
    return tmp_path


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder user nobody can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="courier-nobody-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)
