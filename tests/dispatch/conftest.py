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


def _in_child(call, timeout: float = 120):
    """Run `call()` in a forked child; return its (picklable) result.

    For what may hang inside C code that holds the GIL (Python's `re` on a
    catastrophic pattern), where a thread cannot be waited for: the child is killed
    after `timeout` seconds and the test fails instead of hanging the suite.
    """
    import os
    import pickle
    import signal
    import time

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            from django.db import connections

            connections.close_all()  # its own connections, not the parent's
            os.write(write, pickle.dumps(call()))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        raise AssertionError(f"still running after {timeout:g} s: it hangs")
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child failed"
    return pickle.loads(data)


@pytest.fixture
def in_child():
    return _in_child
