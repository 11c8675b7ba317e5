"""Routing services in process: received series, rules, jobs, retention, adoption."""

from __future__ import annotations

import json
from datetime import timedelta
from itertools import count
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from dispatch import routing
from dispatch.models import Job, State
from dispatch.routing_models import ReceivedSeries, Rule, RuleCondition
from targets.models import Direction, FolderTarget, Target
from tests.dicomgen import make_series
from tests.fixtures.receive_peers import storescu

pytestmark = pytest.mark.django_db(transaction=True)

_n = count(1)


def folder_target(path: Path, **kw) -> Target:
    path.mkdir(parents=True, exist_ok=True)
    return FolderTarget.objects.create(
        name=kw.pop("name", f"folder-{path.name}"), path=str(path), **kw
    )


def received(spool: Path, *, kind: str = "ct", instances: int = 3,
             calling: str = "CT_SCANNER", called: str = "COURIER",
             state: str = ReceivedSeries.State.COMPLETE, **row) -> ReceivedSeries:  # fmt: skip
    """A received series in the spool as the receiver leaves it."""
    folder = spool / "incoming" / f"series-{next(_n)}"
    series = make_series(folder, instances, kind=kind)
    return ReceivedSeries.objects.create(
        series_uid=series.series_uid, study_uid=series.study_uid, folder=str(folder),
        calling_aet=calling, called_aet=called, instance_count=instances, state=state,
        tags=routing.tags_summary(series.files[0]), **row,
    )  # fmt: skip


def rule(name: str, targets: list[Target], *conditions, match: str = "all") -> Rule:
    r = Rule.objects.create(name=name, match=match)
    r.targets.set(targets)
    for field, keyword, operator, value in conditions:
        RuleCondition.objects.create(
            rule=r, field=field, keyword=keyword, operator=operator, value=value
        )
    return r


def modality_is(value: str):
    return ("tag", "Modality", "exact", value)


def test_each_matched_target_gets_one_job_carrying_the_incoming_aets(tmp_path, spool):
    a = folder_target(tmp_path / "a")
    b = folder_target(tmp_path / "b")
    rule("ct to a and b", [a, b], modality_is("CT"))
    rule("scanner to a", [a], ("calling_aet", "", "wildcard", "CT_*"))
    rule("mr to b", [b], modality_is("MR"))
    series = received(spool, calling="CT_SCANNER", called="PACS")

    result = routing.route_series(series.pk)

    assert result.state == ReceivedSeries.State.ROUTED
    assert sorted(result.rules) == ["ct to a and b", "scanner to a"]
    jobs = Job.objects.filter(pk__in=result.job_ids)
    assert sorted(j.target_id for j in jobs) == sorted([a.pk, b.pk])
    for job in jobs:
        assert (job.calling_aet, job.called_aet) == ("CT_SCANNER", "PACS")
        assert job.owned_spool and job.folder == series.folder and job.total == 3
    series.refresh_from_db()
    assert series.state == ReceivedSeries.State.ROUTED and series.routed_at
    assert {r.name for r in series.matched_rules.all()} == set(result.rules)
    assert set(series.jobs.values_list("pk", flat=True)) == set(result.job_ids)


def test_routing_is_done_once(tmp_path, spool):
    rule("all", [folder_target(tmp_path / "a")])
    series = received(spool)

    assert routing.route_series(series.pk) is not None
    assert routing.route_series(series.pk) is None
    assert routing.route_pending() == 0
    assert Job.objects.count() == 1


def test_a_series_matching_no_rule_is_kept_unrouted_and_can_be_rerouted(
    tmp_path, spool
):
    a = folder_target(tmp_path / "a")
    rule("mr only", [a], modality_is("MR"))
    series = received(spool)

    result = routing.route_series(series.pk)

    assert result.state == ReceivedSeries.State.UNROUTED and not result.job_ids
    assert "no rule matched" in result.note
    assert Path(series.folder).is_dir()
    rule("ct too", [a], modality_is("CT"))
    again = routing.route_series(series.pk, reroute=True)
    assert again.state == ReceivedSeries.State.ROUTED and len(again.job_ids) == 1
    # Re-routing once more adds no second job for a target already served.
    third = routing.route_series(series.pk, reroute=True)
    assert third.job_ids == [] and Job.objects.count() == 1


def test_a_series_matching_no_rule_goes_to_the_default_target(
    tmp_path, spool, settings
):
    default = folder_target(tmp_path / "catch-all", name="Catch-All")
    settings.COURIER_UNROUTED_DEFAULT_TARGET = "catch-all"
    series = received(spool)

    result = routing.route_series(series.pk)

    assert result.state == ReceivedSeries.State.ROUTED
    assert [Job.objects.get(pk=j).target_id for j in result.job_ids] == [default.pk]
    assert "default target" in result.note


def test_a_missing_default_target_is_named_in_the_note(spool, settings):
    settings.COURIER_UNROUTED_DEFAULT_TARGET = "gone"
    result = routing.route_series(received(spool).pk)
    assert result.state == ReceivedSeries.State.UNROUTED
    assert "'gone' does not exist" in result.note


def test_disabled_rules_are_ignored(tmp_path, spool):
    r = rule("ct", [folder_target(tmp_path / "a")], modality_is("CT"))
    r.enabled = False
    r.save()
    assert routing.route_series(received(spool).pk).state == "unrouted"


def test_a_query_only_target_fails_the_series_with_the_reason(tmp_path, spool):
    qr = Target.objects.create(
        name="pacs-qr", kind="dicom", direction=Direction.QUERY, host="127.0.0.1",
        port=104, called_aet="PACS",
    )  # fmt: skip
    rule("to qr", [qr])
    series = received(spool)

    result = routing.route_series(series.pk)

    assert result.state == ReceivedSeries.State.FAILED
    assert "query-only" in result.note
    assert Path(series.folder).is_dir()


def test_a_quiet_series_is_completed_with_its_tags_counted_from_disk(spool, settings):
    settings.COURIER_SERIES_QUIET_SECONDS = 60
    old = timezone.now() - timedelta(seconds=200)
    quiet = received(spool, kind="mr", instances=4, state="receiving",
                     last_received_at=old)  # fmt: skip
    busy = received(spool, state="receiving")
    ReceivedSeries.objects.filter(pk=quiet.pk).update(tags={}, instance_count=1)
    half_written = Path(quiet.folder) / ".1.2.3.dcm.1234.part"
    half_written.write_bytes(b"never acknowledged")

    done = routing.complete_quiet_series(grace=30)

    assert done == [quiet.pk]
    quiet.refresh_from_db()
    assert quiet.state == ReceivedSeries.State.COMPLETE
    assert quiet.instance_count == 4
    assert quiet.tags["Modality"] == "MR" and "SeriesInstanceUID" in quiet.tags
    assert not half_written.exists()
    busy.refresh_from_db()
    assert busy.state == ReceivedSeries.State.RECEIVING


def test_a_folder_whose_row_was_never_written_is_adopted(spool):
    incoming = spool / "incoming"
    series = make_series(incoming / "orphan", 2)
    (incoming / "orphan.series.json").write_text(json.dumps({
        "series_uid": series.series_uid, "calling_aet": "US_1", "called_aet": "X",
        "peer_address": "10.0.0.9:4000",
        "first_received": timezone.now().isoformat(),
    }))  # fmt: skip

    restored = routing.restore_open_series(incoming)

    (row,) = ReceivedSeries.objects.all()
    assert (row.calling_aet, row.called_aet, row.instance_count) == ("US_1", "X", 2)
    assert row.state == ReceivedSeries.State.RECEIVING
    assert [s.pk for s in restored] == [row.pk]
    assert restored[0].instance_count == 2


def test_expired_unrouted_series_are_purged_with_their_folder(spool, settings):
    settings.COURIER_UNROUTED_RETENTION_DAYS = 7
    old = received(spool, state="unrouted",
                   state_changed_at=timezone.now() - timedelta(days=8))  # fmt: skip
    recent = received(spool, state="unrouted")

    assert routing.purge_expired() == 1

    assert not Path(old.folder).exists()
    assert not ReceivedSeries.objects.filter(pk=old.pk).exists()
    assert Path(recent.folder).is_dir()


def test_rule_conditions_refuse_unknown_keywords_and_bad_expressions():
    with pytest.raises(ValidationError, match="not a DICOM keyword"):
        RuleCondition(field="tag", keyword="Modaliti", value="CT").clean()
    with pytest.raises(ValidationError, match="regular expression"):
        RuleCondition(field="tag", keyword="Modality", operator="regex",
                      value="(CT").clean()  # fmt: skip
    RuleCondition(field="calling_aet", operator="wildcard", value="CT*").clean()


def test_received_in_process_routed_and_delivered_then_the_spool_is_removed(
    receiver, tmp_path, spool, immediate_huey
):
    """Receiver with the database recorder → quiet period → route → Folder target."""
    out = tmp_path / "out"
    rule("ct", [folder_target(out)], modality_is("CT"))
    series = make_series(tmp_path / "ct", 5)
    rx = receiver(spool_dir=spool, quiet_seconds=0.5,
                  recorder=routing.DatabaseRecorder("test"))  # fmt: skip

    assert storescu(rx.port, [series.folder], extra=["+sd"]).returncode == 0

    row = _wait(lambda: ReceivedSeries.objects.filter(state="routed").first())
    (job,) = row.jobs.all()
    _wait(lambda: Job.objects.get(pk=job.pk).state == State.DONE)
    assert len([p for p in out.rglob("*.dcm")]) == 5
    assert row.instance_count == 5 and row.calling_aet == "MODALITY"
    assert row.peer_address.startswith("127.0.0.1:")
    _wait(lambda: not Path(row.folder).exists())
    routing.purge_expired()
    row.refresh_from_db()
    assert row.folder_removed_at is not None
    assert not Path(f"{row.folder}.series.json").exists()


def _wait(condition, timeout: float = 60):
    import time

    from django.db import OperationalError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except OperationalError as exc:
            # The test database is SQLite in memory with a shared cache: a read
            # while the receiver's thread writes fails at once instead of waiting.
            if "locked" not in str(exc):
                raise
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {condition}")


def test_the_receiver_reports_refusals_and_heartbeats_for_the_admin(spool):
    from dispatch.routing_models import ReceiverStatus

    recorder = routing.DatabaseRecorder("COURIER@11112")
    recorder.restore(spool / "incoming")
    recorder.refused("spool disk nearly full (5 bytes free)", 2)
    recorder.refused("spool disk nearly full (3 bytes free)", 1)
    recorder.heartbeat({"stored": 7})

    status = ReceiverStatus.objects.get(name="COURIER@11112")
    assert status.refused_count == 3
    assert status.last_refusal.endswith("(3 bytes free)") and status.last_refusal_at
    assert status.info == {"stored": 7}


def test_one_series_that_fails_never_stops_the_sweep_for_the_others(
    tmp_path, spool, settings, monkeypatch
):
    """A failure the database raises for one series (as PostgreSQL did for a NUL)
    fails that series alone: the others are completed, routed and purged."""
    from django.db import DataError

    settings.COURIER_SERIES_QUIET_SECONDS = 60
    settings.COURIER_UNROUTED_RETENTION_DAYS = 7
    rule("ct", [folder_target(tmp_path / "out")], modality_is("CT"))
    old = timezone.now() - timedelta(seconds=600)
    bad_complete = received(spool, state="receiving", last_received_at=old)
    good_quiet = received(spool, state="receiving", last_received_at=old)
    bad_route = received(spool, last_received_at=old)
    good_complete = received(spool)
    expired = received(spool, state="unrouted",
                       state_changed_at=timezone.now() - timedelta(days=8))  # fmt: skip
    complete, route = routing.complete_series, routing.route_series

    def failing(real, bad_pk):
        def step(pk, **kwargs):
            if pk == bad_pk:
                raise DataError(
                    "A string literal cannot contain NUL (0x00) characters."
                )
            return real(pk, **kwargs)

        return step

    monkeypatch.setattr(routing, "complete_series", failing(complete, bad_complete.pk))
    monkeypatch.setattr(routing, "route_series", failing(route, bad_route.pk))

    routing.sweep()

    states = dict(ReceivedSeries.objects.values_list("pk", "state"))
    assert states[good_quiet.pk] == states[good_complete.pk] == "routed"
    assert states[bad_complete.pk] == states[bad_route.pk] == "failed"
    assert expired.pk not in states
    bad = ReceivedSeries.objects.get(pk=bad_complete.pk)
    assert "could not complete the series: DataError" in bad.note
    assert Job.objects.count() == 2


def test_a_description_file_with_control_characters_is_adopted_clean(spool):
    incoming = spool / "incoming"
    series = make_series(incoming / "odd", 2)
    (incoming / "odd.series.json").write_text(json.dumps({
        "series_uid": series.series_uid + "\x00", "calling_aet": "US\x001",
        "called_aet": "X\n", "peer_address": "10.0.0.9:4000",
    }))  # fmt: skip
    (incoming / "broken.series.json").write_text("{not json")
    (incoming / "broken").mkdir()

    restored = routing.restore_open_series(incoming)

    (row,) = ReceivedSeries.objects.all()
    assert row.series_uid == series.series_uid
    assert (row.calling_aet, row.called_aet) == ("US1", "X\n")
    assert [s.pk for s in restored] == [row.pk]


def test_tags_with_control_characters_are_kept_fit_for_any_database(tmp_path):
    (path,) = make_series(
        tmp_path / "ct", 1, tags={"SeriesDescription": "Lung\x00 1.0\x07"}
    ).files

    tags = routing.tags_summary(path)

    assert tags["SeriesDescription"] == "Lung 1.0\ufffd"
