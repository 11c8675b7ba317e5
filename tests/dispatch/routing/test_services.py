"""Routing services in process: received series, rules, jobs, retention."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from dispatch.jobs.models import Job
from dispatch.routing import services as routing
from dispatch.routing.models import ReceivedSeries, RuleCondition
from targets.models import Direction, Target
from tests.dicomgen import make_series
from tests.dispatch.helpers import folder_target, modality_is, received, rule

pytestmark = pytest.mark.django_db(transaction=True)


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


def test_tags_with_control_characters_are_kept_fit_for_any_database(tmp_path):
    (path,) = make_series(
        tmp_path / "ct", 1, tags={"SeriesDescription": "Lung\x00 1.0\x07"}
    ).files

    tags = routing.tags_summary(path)

    assert tags["SeriesDescription"] == "Lung 1.0\ufffd"
