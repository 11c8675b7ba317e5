"""A NUL byte on PostgreSQL (issue 11): receiving and routing go on.

PostgreSQL refuses a NUL in text (and `\\u0000` in JSON), failing the whole
statement. Before the fix, one SeriesInstanceUID with a NUL broke the receiver's
bookkeeping for every later series, a NUL in a text tag broke completing the
series (and with it the routing sweep each minute), and a description file with one
kept the receiver from starting. Real processes: `manage.py receive` on a
PostgreSQL database, raw-socket and dcmtk senders.
"""

from __future__ import annotations

import json
import uuid

from pydicom import examples
from pydicom.uid import generate_uid

from tests.dicomgen import make_series
from tests.fixtures.receive_peers import ReceiverProcess, storescu
from tests.peers import port_open
from tests.rawdicom import RawPeer, encode_dataset


def received(site) -> dict[str, tuple[str, str]]:
    rows = site.query(
        "SELECT series_uid, state, note FROM dispatch_receivedseries ORDER BY id"
    )
    return {uid: (state, note) for uid, state, note in rows}


def test_a_nul_byte_cannot_stop_receiving_or_routing_on_postgresql(
    courier_site, postgres_server, tmp_path
):
    url = postgres_server.create_database(f"nul_{uuid.uuid4().hex[:8]}")
    site = courier_site(
        database_url=url,
        pg=postgres_server,
        env={"COURIER_SERIES_QUIET_SECONDS": "1", "COURIER_MIN_FREE_BYTES": "0"},
    ).migrate()
    out = tmp_path / "out"
    out.mkdir()
    # The target and its rule in one site process (one Django start-up).
    site.python(
        "from dispatch.routing.models import Rule, RuleCondition\n"
        "from targets.models import Target\n"
        f"t = Target(name='out', kind='folder', path={str(out)!r})\n"
        "t.save()\n"
        "r = Rule.objects.create(name='CT')\n"
        "r.targets.set([t])\n"
        "RuleCondition.objects.create(rule=r, field='tag', keyword='Modality', "
        "value='CT')\nprint(r.pk)\n"
    )
    study = generate_uid()
    nul_uid = examples.ct.copy()
    nul_uid.SOPInstanceUID = generate_uid()
    nul_uid.SeriesInstanceUID = "1.2.3\x00.4"
    nul_tag = make_series(tmp_path / "nul-tag", 2, study_uid=study,
                          tags={"SeriesDescription": "Lung\x00 B70f"})  # fmt: skip
    plain = make_series(tmp_path / "plain", 3, study_uid=study)

    rx = ReceiverProcess(site).start()
    try:
        with RawPeer(rx.port) as peer:
            assert peer.associate()[0] == 0x02
            status = peer.store(
                encode_dataset(nul_uid), sop_instance=nul_uid.SOPInstanceUID
            )
            peer.release()
        for series in (nul_tag, plain):
            sent = storescu(rx.port, [series.folder], extra=["+sd"])
            assert sent.returncode == 0, sent.stderr
        # The receiver completes both series itself after the quiet period.
        site.wait_for(
            lambda: [s for s, _ in received(site).values()] == ["complete"] * 2,
            timeout=60,
            what=f"both series complete; receiver log:\n{rx.log()}",
        )
    finally:
        rx.stop()
    assert status == 0xC210  # the NUL UID refused at the door
    assert "has control or non-ASCII characters" in rx.log()

    # A description file with NULs, left by an older version or copied in by hand.
    incoming = site.spool / "incoming"
    leftover = make_series(incoming / "leftover", 1, study_uid=study)
    (incoming / "leftover.series.json").write_text(json.dumps({
        "series_uid": leftover.series_uid + "\x00", "calling_aet": "CT\x00",
        "called_aet": "COURIER", "peer_address": "10.1.2.3:104",
    }))  # fmt: skip
    again = ReceiverProcess(site).start()  # before the fix: crashed on the NUL
    try:
        assert port_open(again.port)
        site.wait_for(lambda: len(received(site)) == 3, timeout=60,
                      what=f"the leftover adopted:\n{again.log()}")  # fmt: skip
    finally:
        again.stop()

    # The routing sweep (what the worker runs each minute) routes both.
    site.python("from dispatch.routing import services\nservices.sweep()\nprint(1)")
    rows = received(site)
    assert rows[nul_tag.series_uid][0] == "routed", rows
    assert rows[plain.series_uid][0] == "routed"
    assert rows[leftover.series_uid][0] == "receiving"
    assert len(site.jobs()) == 2
    (description,) = site.query(
        "SELECT tags->>'SeriesDescription' FROM dispatch_receivedseries "
        "WHERE series_uid = %s",
        (nul_tag.series_uid,),
    )[0]
    assert description == "Lung B70f"
