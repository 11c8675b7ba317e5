"""Query tool test helpers: huey in immediate mode, spool/download/data dirs in tmp."""

from __future__ import annotations

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
