"""Run code as user nobody: the tests run as root, who reads every file and folder;
Courier's service account does not."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable

NOBODY = 65534


def as_nobody(fn: Callable[[], object]) -> tuple[str, object]:
    """Run `fn` in a forked child that has become user nobody; return its result as
    ("ok", value) or ("error", "<type>: <message>")."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result: tuple[str, object] = ("ok", fn())
        except BaseException as exc:
            result = ("error", f"{type(exc).__name__}: {exc}")
        with os.fdopen(write, "wb") as out:
            pickle.dump(result, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)
