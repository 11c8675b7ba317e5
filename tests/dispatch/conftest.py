"""In-process dispatch tests: huey in immediate mode, spool in a temporary folder."""

from __future__ import annotations

import pytest
from huey.contrib.djhuey import HUEY


@pytest.fixture
def immediate_huey():
    """Run enqueued tasks at once in this process (scheduled ones are kept)."""
    before = HUEY.immediate
    HUEY.immediate = True
    try:
        yield HUEY
    finally:
        HUEY.immediate = before


@pytest.fixture
def spool(tmp_path, settings):
    settings.COURIER_SPOOL_DIR = tmp_path / "spool"
    settings.COURIER_SPOOL_DIR.mkdir()
    return settings.COURIER_SPOOL_DIR
