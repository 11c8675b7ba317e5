"""pytest plugin (registered as an entry point): isolate a test run's data directory.

It runs before pytest-django loads the settings, so a test run never touches the
project's real `./data` (its database, its huey queue, its keys): every run gets a
fresh temporary data directory (or COURIER_TEST_DATA_DIR when that is set).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_created: list[str] = []


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    path = os.environ.get("COURIER_TEST_DATA_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="courier-test-data-")
        _created.append(path)
    # Subprocesses the tests start (workers, receivers) inherit it.
    os.environ["COURIER_DATA_DIR"] = path


def pytest_unconfigure(config) -> None:
    for path in _created:
        shutil.rmtree(path, ignore_errors=True)
