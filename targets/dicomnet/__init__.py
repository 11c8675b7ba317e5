"""Courier's DICOM on the wire: every hand-written DICOM byte path lives here.

`scu` is the sending association (C-STORE on a blocking socket), `scp` the accepting
one (the receiver's associations), `check` the structural walk of a dataset, `vr` the
VR table both share, `sockets` the TCP tuning. Nothing here imports a Django model.
"""

from __future__ import annotations

import importlib
import threading

# What converting a file and naming a UID use of pydicom (targets.dicomnet.transcode).
PYDICOM_MODULES = (
    "pydicom",
    "pydicom.uid",
    "pydicom.datadict",
    "pydicom.dataelem",
    "pydicom.dataset",
    "pydicom.filebase",
    "pydicom.filereader",
    "pydicom.filewriter",
    "pydicom.pixels",
)

_lock = threading.Lock()
_loaded = False


def load_pydicom() -> None:
    """Import pydicom's modules the send path uses, once, holding one lock.

    The send path imports no pydicom up front (with numpy it is ~0.4 s of a
    one-instance `send_series`); only converting a file or naming a UID in a
    message needs it, and that may happen first in two sender threads at once.
    pydicom's first import from two threads at once can wedge the import system
    (config.preload) when a thread's first import is a submodule: `from pydicom.uid
    import UID` takes the import lock of `pydicom.uid` before the package's, while
    another thread inside the package's `__init__` waits for `pydicom.uid`. This
    imports the package first, so threads only wait for each other (the import
    system makes them take turns; the lock only keeps the list from being walked by
    two at once). Call it before any `from pydicom... import` in code that threads
    run (tests/targets/test_pydicom_loader.py).
    """
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            for name in PYDICOM_MODULES:
                importlib.import_module(name)
            _loaded = True
