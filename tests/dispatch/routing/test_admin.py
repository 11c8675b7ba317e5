"""The admin for rules (form, preview) and received series (page, re-route)."""

from __future__ import annotations

from itertools import count
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone

from dispatch.receiving.models import ReceiverStatus
from dispatch.routing import services as routing
from dispatch.routing.models import ReceivedSeries, Rule
from targets.models import FolderTarget
from tests.dicomgen import make_series

pytestmark = pytest.mark.django_db(transaction=True)
_n = count(1)


@pytest.fixture
def target(tmp_path):
    (tmp_path / "out").mkdir()
    return FolderTarget.objects.create(name="archive", path=str(tmp_path / "out"))


def received(spool: Path, kind: str, calling: str, **row) -> ReceivedSeries:
    folder = spool / "incoming" / f"s{next(_n)}"
    series = make_series(folder, 2, kind=kind)
    return ReceivedSeries.objects.create(
        series_uid=series.series_uid, folder=str(folder), calling_aet=calling,
        called_aet="COURIER", instance_count=2,
        tags=routing.tags_summary(series.files[0]), **row,
    )  # fmt: skip


def rule_form(target, **over) -> dict:
    data = {
        "name": "CT to archive", "enabled": "on", "order": "10", "match": "all",
        "targets": [str(target.pk)], "description": "",
        "conditions-TOTAL_FORMS": "2", "conditions-INITIAL_FORMS": "0",
        "conditions-MIN_NUM_FORMS": "0", "conditions-MAX_NUM_FORMS": "1000",
        "conditions-0-field": "tag", "conditions-0-keyword": "Modality",
        "conditions-0-operator": "exact", "conditions-0-value": "CT",
        "conditions-1-field": "calling_aet", "conditions-1-keyword": "",
        "conditions-1-operator": "wildcard", "conditions-1-value": "CT_*",
    }  # fmt: skip
    data.update(over)
    return data


def test_a_rule_is_added_with_its_conditions(admin_client, target):
    url = reverse("admin:routing_rule_add")
    response = admin_client.post(url, rule_form(target))
    assert response.status_code == 302, response.content.decode()[:3000]
    rule = Rule.objects.get()
    assert [str(c) for c in rule.conditions.all()] == [
        "Modality is exactly 'CT'",
        "Calling AE title (the sender) matches wildcard (* and ?) 'CT_*'",
    ]
    assert list(rule.targets.all()) == [target]


def test_a_bad_keyword_or_expression_is_a_form_error(admin_client, target):
    url = reverse("admin:routing_rule_add")
    response = admin_client.post(url, rule_form(
        target, **{"conditions-0-keyword": "Modaliti",
                   "conditions-1-operator": "regex", "conditions-1-value": "(CT"},
    ))  # fmt: skip
    assert response.status_code == 200
    page = response.content.decode()
    assert "is not a DICOM keyword" in page
    assert "Not a valid regular expression" in page
    assert not Rule.objects.exists()


def test_the_preview_shows_which_recent_series_the_unsaved_rule_matches(
    admin_client, target, spool
):
    ct = received(spool, "ct", "CT_1", state="routed")
    mr = received(spool, "mr", "MR_1", state="routed")
    other_ct = received(spool, "ct", "US_9", state="unrouted")

    response = admin_client.post(
        reverse("admin:routing_rule_preview"), rule_form(target)
    )

    assert response.status_code == 200
    rows = {r.pk: hit for r, hit in response.context["rows"]}
    assert rows == {ct.pk: True, mr.pk: False, other_ct.pk: False}
    assert not Rule.objects.exists()  # nothing saved
    either = rule_form(target, match="any")
    rows = dict(admin_client.post(reverse("admin:routing_rule_preview"),
                                  either).context["rows"])  # fmt: skip
    assert {r.pk for r, hit in rows.items() if hit} == {ct.pk, other_ct.pk}


def test_the_preview_reports_a_bad_condition_instead_of_failing(admin_client, target):
    data = rule_form(target, **{"conditions-0-keyword": "NoSuchTag"})
    response = admin_client.post(reverse("admin:routing_rule_preview"), data)
    assert response.status_code == 200
    assert "not a DICOM keyword" in response.content.decode()


def test_the_rule_page_previews_the_saved_rule(admin_client, target, spool):
    ct = received(spool, "ct", "CT_1", state="routed")
    rule = Rule.objects.create(name="everything")
    rule.targets.set([target])
    page = admin_client.get(reverse("admin:routing_rule_change", args=[rule.pk]))
    assert page.status_code == 200
    assert page.context["preview_rows"] == [(ct, True)]
    assert "Preview matches" in page.content.decode()


def test_the_series_page_shows_tags_rules_and_job_states(admin_client, target, spool):
    rule = Rule.objects.create(name="CT rule")
    rule.targets.set([target])
    series = received(spool, "ct", "CT_1", state="complete")
    routing.route_series(series.pk)

    page = admin_client.get(
        reverse("admin:routing_receivedseries_change", args=[series.pk])
    ).content.decode()

    assert "Modality" in page and "<td>CT</td>" in page
    assert "CT rule" in page
    assert "archive" in page and "Queued" in page
    assert "Re-route with the current rules" in page


def test_re_route_sends_an_unrouted_series_after_a_rule_is_added(
    admin_client, target, spool
):
    series = received(spool, "mr", "MR_1", state="complete")
    routing.route_series(series.pk)
    series.refresh_from_db()
    assert series.state == "unrouted"
    rule = Rule.objects.create(name="MR rule")
    rule.targets.set([target])

    response = admin_client.post(
        reverse("admin:routing_receivedseries_changelist"),
        {"action": "reroute", "_selected_action": [series.pk]},
        follow=True,
    )

    assert response.status_code == 200
    series.refresh_from_db()
    assert series.state == "routed" and series.jobs.count() == 1
    assert "1 new job" in response.content.decode()


def test_the_list_shows_the_receiver_and_its_refusals(admin_client, spool):
    ReceiverStatus.objects.create(
        name="COURIER@11112", info={"stored": 42}, refused_count=3,
        last_refusal="spool disk nearly full (10 bytes free)",
        last_refusal_at=timezone.now(),
    )  # fmt: skip
    page = admin_client.get(
        reverse("admin:routing_receivedseries_changelist")
    ).content.decode()
    assert "Receiver COURIER@11112" in page and "running" in page
    assert "Refused 3 instances" in page and "nearly full" in page


def test_a_catastrophic_expression_cannot_hang_the_preview(
    admin_client, target, spool, in_child
):
    slow = received(spool, "ct", "CT_1", state="routed")
    slow.tags["StudyDescription"] = "a" * 40 + "!"
    slow.save()
    data = rule_form(target, **{"conditions-1-field": "tag",
                                "conditions-1-keyword": "StudyDescription",
                                "conditions-1-operator": "regex",
                                "conditions-1-value": "(a+)+$"})  # fmt: skip

    def preview():
        response = admin_client.post(reverse("admin:routing_rule_preview"), data)
        rows = [(row.pk, hit) for row, hit in response.context["rows"]]
        return response.status_code, rows

    status, rows = in_child(preview)

    assert status == 200
    assert rows == [(slow.pk, False)]
