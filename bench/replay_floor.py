"""The floor of one association: pre-encoded C-STOREs sent as fast as a peer answers.

    .venv/bin/python bench/replay_floor.py HOST PORT CALLED_AET FOLDER

Reads every file of FOLDER into memory and builds each C-STORE's PDUs (command and
dataset, fragments as large as the peer accepts) before the clock starts; then times
only the association: A-ASSOCIATE, one C-STORE after another (each sent with one
`sendall`, then its response read; one operation at a time, as every peer here
negotiates), A-RELEASE. No file is opened, nothing parsed or encoded inside the
timed part: what is left is the peer's own work per instance plus the loopback
round trips, the least time any sender can take over one association. Prints one
JSON line: {"wall": s, "cpu": s of this process in the timed part, "count": n}.
bench/cmd_send.py runs it as an arm beside storescu.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from targets.dicomnet.check import walk_file  # noqa: E402
from targets.dicomnet.scu import (  # noqa: E402
    LAST,
    Association,
    _command,
    _element,
    _us,
    propose,
    status_of,
)


def main() -> None:
    host, port, called, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    files = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        walk = walk_file(path)
        data = path.read_bytes()[walk.start :]
        files.append((walk.uids["SOPClassUID"], walk.uids["SOPInstanceUID"],
                      walk.transfer_syntax, data))  # fmt: skip
    contexts = sorted({(c, ts) for c, _, ts, _ in files})
    proposed = propose([(c, [ts]) for c, ts in contexts])
    ids = {
        (c, ts): cx.context_id for (c, ts), cx in zip(contexts, proposed, strict=True)
    }

    t0 = time.perf_counter()
    assoc = Association.open(
        host, port, calling_aet="REPLAY", called_aet=called, contexts=proposed,
        connect_timeout=10, acse_timeout=30, dimse_timeout=60, max_pdu=131072,
    )  # fmt: skip
    associated = time.perf_counter() - t0
    accepted = {cx.id for cx in assoc.contexts}
    chunk = assoc.fragment_size()
    # Built after the peer said its maximum PDU length; not timed.
    messages = []
    for msg_id, (sop_class, sop_instance, ts, dataset) in enumerate(files, 1):
        context_id = ids[(sop_class, ts)]
        if context_id not in accepted:
            raise SystemExit(f"the peer refused {sop_class} in {ts}")
        cmd = _command(
            _element(0x0002, sop_class.encode()),
            _element(0x0100, _us(0x0001)),
            _element(0x0110, _us(msg_id)),
            _element(0x0700, _us(0x0000)),
            _element(0x0800, _us(0x0000)),
            _element(0x1000, sop_instance.encode()),
        )
        parts = assoc._command_pdus(context_id, cmd)
        for start in range(0, len(dataset), chunk):
            last = start + chunk >= len(dataset)
            parts += assoc._pdata(
                context_id, LAST if last else 0, dataset[start : start + chunk]
            )
        messages.append((msg_id, b"".join(parts)))
    cpu1, t1 = time.process_time(), time.perf_counter()
    sock = assoc.sock
    sock.settimeout(60)
    failed = 0
    for msg_id, pdus in messages:
        sock.sendall(pdus)
        if status_of(assoc._response(msg_id)) != 0:
            failed += 1
    assoc.release()
    cpu2, t2 = time.process_time(), time.perf_counter()
    print(json.dumps({
        "wall": associated + (t2 - t1), "cpu": cpu2 - cpu1,
        "count": len(messages), "failed": failed,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
