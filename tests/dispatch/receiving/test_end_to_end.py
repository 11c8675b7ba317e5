"""Courier in the middle, with real processes: storescu → `manage.py receive` →
routing in a `run_huey` worker → Orthanc and a Folder target.

The Courier site (its own database, queue and spool) comes from `courier_site`
(tests/fixtures/dispatch_peers.py); the modality is dcmtk's storescu.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom

from targets.kinds.dicom.query import DicomQuery
from targets.models import Target
from targets.query import RetrieveRequest
from tests.dicomgen import make_mixed_study, make_series
from tests.dispatch.receiving.test_receiver import dataset_bytes
from tests.fixtures.receive_peers import ReceiverProcess, echoscu, storescu
from tests.peers import Orthanc, free_port

SITE_ENV = {"COURIER_SERIES_QUIET_SECONDS": "1", "COURIER_MIN_FREE_BYTES": "0"}


def setup_site(courier_site, **env):
    site = courier_site(env={**SITE_ENV, **env}).migrate()
    return site


def add_targets_and_rules(
    site,
    targets: list[dict],
    rules: list[tuple[str, int, str]],
    streaming: tuple[str, ...] = (),
) -> list[int]:
    """Create `targets` (Target fields) and `rules` (name, index into `targets`,
    Modality; those named in `streaming` forward as instances arrive) in one site
    process, one Django start-up for all; return the target ids."""
    return site.python(
        "import json\n"
        "from dispatch.routing.models import Rule, RuleCondition\n"
        "from targets.models import Target\n"
        "ids = []\n"
        f"for fields in json.loads({json.dumps(json.dumps(targets))}):\n"
        "    t = Target(**fields)\n"
        "    t.save()\n"
        "    ids.append(t.pk)\n"
        f"for name, index, modality in {rules!r}:\n"
        "    r = Rule.objects.create(name=name)\n"
        "    r.targets.set([ids[index]])\n"
        "    RuleCondition.objects.create(rule=r, field='tag', keyword='Modality',"
        " value=modality)\n"
        f"Rule.objects.filter(name__in={list(streaming)!r}).update(stream=True)\n"
        "print(json.dumps(ids))\n"
    )


def received(site) -> list[dict]:
    cols = ["id", "state", "calling_aet", "called_aet", "instance_count", "note"]
    rows = site.query(
        f"SELECT {', '.join(cols)} FROM dispatch_receivedseries ORDER BY id"
    )
    return [dict(zip(cols, r, strict=True)) for r in rows]


def all_jobs_done(site, count: int):
    jobs = site.jobs()
    return len(jobs) == count and all(j["state"] == "done" for j in jobs) and jobs


def metadata(orthanc: Orthanc, sop_uid: str) -> dict:
    oid = orthanc.find_instance(sop_uid)
    assert oid, f"{sop_uid} is not in Orthanc"
    return orthanc.rest(f"/instances/{oid}/metadata?expand")


def sent_by_storescu(path: Path) -> bytes:
    """The dataset dcmtk's storescu sends for a file of `make_series` (explicit VR
    little endian): its encoded dataset without the trailing padding element
    (FFFC,FFFC), which storescu drops."""
    data = dataset_bytes(path)
    padding = data.rfind(b"\xfc\xff\xfc\xffOB")
    return data[:padding] if padding >= 0 else data


def dicom_target(orthanc: Orthanc, *, pass_incoming: bool) -> dict:
    return dict(
        name="orthanc", kind="dicom", host="127.0.0.1", port=orthanc.dicom_port,
        called_aet="ORTHANC", calling_aet="COURIER", pass_calling_aet=pass_incoming,
        pass_called_aet=pass_incoming,
    )  # fmt: skip


def test_a_study_is_routed_ct_to_orthanc_and_mr_to_a_folder_passing_the_aets(
    courier_site, orthanc, tmp_path
):
    site = setup_site(courier_site, COURIER_RECEIVER_ACCEPTED_CALLING_AETS="CT_1")
    folder = tmp_path / "mr-out"
    folder.mkdir()
    orthanc_id, _ = add_targets_and_rules(
        site,
        [
            dicom_target(orthanc, pass_incoming=True),
            {"name": "mr-folder", "kind": "folder", "path": str(folder)},
        ],
        [("CT to Orthanc", 0, "CT"), ("MR to folder", 1, "MR")],
    )
    ct, mr = make_mixed_study(tmp_path / "study", ct=6, mr=4)
    site.start_worker()  # starts while the receiver does
    rx = ReceiverProcess(site).start()
    try:
        assert echoscu(rx.port, calling="INTRUDER").returncode != 0
        sent = storescu(rx.port, [tmp_path / "study"], calling="CT_1",
                        called="ORTHANC_VIA", extra=["+sd", "+r"])  # fmt: skip
        assert sent.returncode == 0, sent.stderr

        site.wait_for(lambda: all_jobs_done(site, 2), what="both jobs done")

        series = {r["instance_count"]: r for r in received(site)}
        assert {r["state"] for r in series.values()} == {"routed"}
        assert series[6]["calling_aet"] == "CT_1"
        assert series[6]["called_aet"] == "ORTHANC_VIA"
        for sop in ct.sop_uids:
            meta = metadata(orthanc, sop)
            assert meta["RemoteAET"] == "CT_1"
            assert meta["CalledAET"] == "ORTHANC_VIA"
        assert not any(orthanc.find_instance(sop) for sop in mr.sop_uids)
        delivered = sorted(p.stem for p in folder.rglob("*.dcm"))
        assert len(delivered) == 4

        # Pass-incoming off: Orthanc sees Courier's own calling AE title.
        site.python(
            f"from targets.models import Target\n"
            f"Target.objects.filter(pk={orthanc_id}).update(pass_calling_aet=False,"
            " pass_called_aet=False)\nprint(1)\n"
        )
        more = make_series(tmp_path / "ct2", 3)
        sent = storescu(rx.port, [more.folder], calling="CT_1",
                        called="ORTHANC_VIA", extra=["+sd"])  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        site.wait_for(lambda: all_jobs_done(site, 3), what="the third job done")
        for sop in more.sop_uids:
            meta = metadata(orthanc, sop)
            assert meta["RemoteAET"] == "COURIER"
            assert meta["CalledAET"] == "ORTHANC"
    finally:
        rx.stop()
    assert "event=association_rejected calling_aet=INTRUDER" in rx.log()


def test_a_series_is_forwarded_while_it_arrives_through_a_killed_worker(
    courier_site, orthanc, tmp_path
):
    """Two parts with a pause shorter than the quiet period; the first part is in
    Orthanc while the series still arrives; the worker is SIGKILLed between the
    parts and a new one goes on: every instance delivered, none sent twice."""
    site = setup_site(courier_site, COURIER_SERIES_QUIET_SECONDS="5")
    folder = tmp_path / "ct-out"
    folder.mkdir()
    add_targets_and_rules(
        site,
        [
            dicom_target(orthanc, pass_incoming=True),
            {"name": "ct-folder", "kind": "folder", "path": str(folder)},
        ],
        [("CT as it arrives", 0, "CT"), ("CT when complete", 1, "CT")],
        streaming=("CT as it arrives",),
    )
    series = make_series(tmp_path / "ct", 12)
    parts = [tmp_path / "part1", tmp_path / "part2"]
    for i, part in enumerate(parts):
        part.mkdir()
        for f in series.files[i * 6 : i * 6 + 6]:
            f.rename(part / f.name)
    first, second = series.sop_uids[:6], series.sop_uids[6:]
    worker = site.start_worker()
    rx = ReceiverProcess(site).start()
    try:
        sent = storescu(rx.port, [parts[0]], calling="CT_1", called="ORTHANC_VIA",
                        extra=["+sd"])  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        site.wait_for(
            lambda: all(orthanc.find_instance(s) for s in first),
            what="the first part in Orthanc",
        )
        (row,) = received(site)
        assert row["state"] == "receiving"  # before the series is complete
        (job,) = site.jobs()
        # It waits for the rest without holding a worker or a lease.
        site.wait_for(
            lambda: site.jobs()[0]["state"] == "following", what="the job waiting"
        )
        assert site.jobs()[0]["lease_owner"] == ""
        ((spool_folder,),) = site.query("SELECT folder FROM dispatch_receivedseries")
        site.kill_worker(worker)

        sent = storescu(rx.port, [parts[1]], calling="CT_1", called="ORTHANC_VIA",
                        extra=["+sd"])  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        site.start_worker()
        site.wait_for(lambda: all_jobs_done(site, 2), what="both jobs done")
        site.wait_for(
            lambda: not Path(spool_folder).exists(), what="the spool folder removed"
        )
    finally:
        rx.stop()

    (row,) = received(site)
    assert row["state"] == "routed" and row["instance_count"] == 12
    streamed = site.jobs()[0]
    assert streamed["id"] == job["id"]
    assert (streamed["total"], streamed["sent"], streamed["failed"]) == (12, 12, 0)
    # Over several attempts (one per batch that landed), none sent twice.
    assert sum(a["sent"] for a in site.attempts(job["id"])) == 12
    for sop in first + second:
        assert metadata(orthanc, sop)["RemoteAET"] == "CT_1"
    assert len(list(folder.rglob("*.dcm"))) == 12


def test_a_streamed_series_survives_a_killed_receiver_one_job_per_target(
    courier_site, orthanc, tmp_path
):
    """The receiver is SIGKILLed while a series it forwards as it arrives is
    half in; started again on the same spool, it takes the rest: each instance at
    each target once (the Folder's byte for byte what storescu sent), one job per
    target (the restarted receiver's rules make none), done, spool removed."""
    # Quiet period: the gap (forwarding, the kill, a receiver start-up) must stay
    # shorter, or part 2 is rightly a new series; generous for a loaded machine.
    site = setup_site(courier_site, COURIER_SERIES_QUIET_SECONDS="5")
    folder = tmp_path / "ct-out"
    folder.mkdir()
    add_targets_and_rules(
        site,
        [
            dicom_target(orthanc, pass_incoming=True),
            {"name": "ct-folder", "kind": "folder", "path": str(folder)},
        ],
        [("CT to Orthanc", 0, "CT"), ("CT to folder", 1, "CT")],
        streaming=("CT to Orthanc", "CT to folder"),
    )
    series = make_series(tmp_path / "ct", 10)
    sent_bytes = dict(
        zip(series.sop_uids, map(sent_by_storescu, series.files), strict=True)
    )
    parts = [tmp_path / "part1", tmp_path / "part2"]
    for i, part in enumerate(parts):
        part.mkdir()
        for f in series.files[i * 5 : i * 5 + 5]:
            f.rename(part / f.name)
    first = series.sop_uids[:5]
    site.start_worker()
    rx = ReceiverProcess(site).start()
    try:
        sent = storescu(rx.port, [parts[0]], calling="CT_1", extra=["+sd"])
        assert sent.returncode == 0, sent.stderr
        site.wait_for(
            lambda: (
                all(orthanc.find_instance(s) for s in first)
                and len(list(folder.rglob("*.dcm"))) == 5
            ),
            what="the first part at both targets",
        )
        (row,) = received(site)
        assert row["state"] == "receiving"
        jobs = site.jobs()
        assert len(jobs) == 2 and not any(j["state"] == "done" for j in jobs)
        ((spool_folder,),) = site.query("SELECT folder FROM dispatch_receivedseries")
        rx.kill()  # SIGKILL, mid-series, its jobs open

        rx = ReceiverProcess(site, port=rx.port).start()  # the same spool
        sent = storescu(rx.port, [parts[1]], calling="CT_1", extra=["+sd"])
        assert sent.returncode == 0, sent.stderr
        # Waits for whatever jobs there are: a second job per target fails below.
        site.wait_for(
            lambda: (
                all(j["state"] == "done" for j in site.jobs())
                and not Path(spool_folder).exists()
            ),
            what="the jobs done and the spool folder removed",
        )
    finally:
        rx.stop()

    (row,) = received(site)
    assert row["state"] == "routed" and row["instance_count"] == 10
    done = site.jobs()
    assert [j["id"] for j in done] == [j["id"] for j in jobs]
    for job in done:
        assert (job["total"], job["sent"], job["failed"]) == (10, 10, 0)
        assert sum(a["sent"] for a in site.attempts(job["id"])) == 10
    for sop in series.sop_uids:
        assert metadata(orthanc, sop)["RemoteAET"] == "CT_1"
    delivered = {}
    for p in folder.rglob("*.dcm"):
        sop = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        assert sop not in delivered, f"{sop} delivered twice"
        delivered[sop] = dataset_bytes(p)
    assert delivered == sent_bytes  # the dataset storescu sent, byte for byte


def _drop_queued_messages(site) -> int:
    """What a worker killed mid-task loses: the message it had taken off the queue."""
    conn = sqlite3.connect(site.data / "huey.sqlite3", timeout=30)
    try:
        with conn:
            return conn.execute("DELETE FROM task").rowcount
    finally:
        conn.close()


def test_a_worker_killed_between_receive_and_route_routes_after_restart_once(
    courier_site, orthanc, tmp_path
):
    site = setup_site(courier_site)
    add_targets_and_rules(
        site, [dicom_target(orthanc, pass_incoming=True)], [("CT to Orthanc", 0, "CT")]
    )
    series = make_series(tmp_path / "ct", 25)
    rx = ReceiverProcess(site).start()
    worker = site.start_worker()
    try:
        site.kill_worker(worker)  # SIGKILL: the worker is gone, the receiver is not
        sent = storescu(rx.port, [series.folder], calling="CT_1", extra=["+sd"])
        assert sent.returncode == 0, sent.stderr
        site.wait_for(
            lambda: [r for r in received(site) if r["state"] == "complete"],
            what="the series complete and waiting to be routed",
        )
        assert site.jobs() == []
        _drop_queued_messages(site)

        site.start_worker()
        site.wait_for(lambda: all_jobs_done(site, 1), what="the job done")
        # A second restart routes nothing again.
        site.start_worker()
        site.python(
            "from dispatch.routing import services\nprint(services.route_pending())"
        )
    finally:
        rx.stop()

    (row,) = received(site)
    assert row["state"] == "routed" and row["instance_count"] == 25
    (job,) = site.jobs()
    assert (job["sent"], job["present"], job["failed"]) == (25, 0, 0)
    assert len(site.attempts(job["id"])) == 1
    uids = set(series.sop_uids)
    stored = [s for s in uids if orthanc.find_instance(s)]
    assert len(stored) == 25


def test_a_c_move_from_the_query_tool_lands_in_the_receiver_and_is_routed(
    courier_site, tmp_path
):
    site = setup_site(courier_site)
    folder = tmp_path / "moved"
    folder.mkdir()
    add_targets_and_rules(
        site,
        [{"name": "moved", "kind": "folder", "path": str(folder)}],
        [("CT to folder", 0, "CT")],
    )
    rx_port = free_port()
    pacs = Orthanc(
        tmp_path / "pacs", aet="PACS",
        modalities={"courier": {"AET": "COURIER", "Host": "127.0.0.1",
                                "Port": rx_port}},
    )  # fmt: skip
    series = make_series(tmp_path / "ct", 7)
    with pacs:
        assert storescu(pacs.dicom_port, [series.folder], called="PACS",
                        extra=["+sd"]).returncode == 0  # fmt: skip
        site.start_worker()  # starts while the receiver does
        rx = ReceiverProcess(site, port=rx_port).start()
        try:
            source = Target(kind="dicom", host="127.0.0.1", port=pacs.dicom_port,
                            called_aet="PACS", calling_aet="COURIER")  # fmt: skip
            result = DicomQuery(source).retrieve(
                RetrieveRequest(series.study_uid, [series.series_uid],
                                move_aet="COURIER"),
                tmp_path / "unused", lambda *a: None,
            )  # fmt: skip
            assert (result.completed, result.failed) == (7, 0), result.message
            site.wait_for(lambda: all_jobs_done(site, 1), what="the moved series sent")
        finally:
            rx.stop()
    (row,) = received(site)
    assert row["state"] == "routed" and row["calling_aet"] == "PACS"
    delivered = [pydicom.dcmread(p).SOPInstanceUID for p in folder.rglob("*.dcm")]
    assert sorted(delivered) == sorted(series.sop_uids)
