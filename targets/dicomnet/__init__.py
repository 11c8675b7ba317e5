"""Courier's DICOM on the wire: every hand-written DICOM byte path lives here.

`scu` is the sending association (C-STORE on a blocking socket), `scp` the accepting
one (the receiver's associations), `check` the structural walk of a dataset, `vr` the
VR table both share, `sockets` the TCP tuning. Nothing here imports a Django model.
"""
