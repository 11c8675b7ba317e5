"""No admin page answers 500 on a realistic database: 1,000 targets of every kind and
state, 5,000 jobs in every state, 2,000 received series, rules, retrievals and audit
entries. Every changelist (with each of its filters, each sort column, a search and a
second page) and the change, history and delete pages of objects of every sort are
fetched with the test client, as an admin clicking through them would."""

from __future__ import annotations

import random
import re
from datetime import timedelta
from html import unescape
from urllib.parse import parse_qs

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

from dispatch.jobs.models import (
    Attempt,
    InstanceState,
    Job,
    JobInstance,
    JobOrigin,
    State,
)
from dispatch.receiving.models import ReceiverStatus
from dispatch.routing.models import ReceivedSeries, Rule, RuleCondition
from querytool.models import AuditAction, AuditEntry, RetrievalJob, RetrievalState
from targets.models import PROXIES, Direction, Kind, Target
from tests.targets.test_admin_form import Tags

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_password_hashing")]

N_TARGETS, N_JOBS, N_SERIES = 1_000, 5_000, 2_000
VARIANT_ROWS = 10

# Enough settings per kind for its pages to show something real.
KIND_FIELDS = {
    Kind.DICOM: dict(host="pacs{i}.example.org", port=104, called_aet="PACS{i}"),
    Kind.DICOM_TLS: dict(
        host="tls{i}.example.org", port=2762, called_aet="TLS{i}", tls_ca_cert="/ca"
    ),
    Kind.DICOMWEB: dict(
        url="https://web{i}.example.org/dicom-web",
        auth="basic",
        username="courier",
        password="secret-{i}",
    ),  # fmt: skip
    Kind.FOLDER: dict(path="/srv/share{i}"),
    Kind.RSYNC: dict(
        host="rs{i}.example.org",
        username="u",
        path="/in",
        run_on_complete=True,
        private_key_path="/keys/id",
    ),  # fmt: skip
    Kind.S3: dict(
        bucket="bucket-{i}",
        access_key_id="AK{i}",
        secret_key="sk-{i}",
        endpoint_url="https://s3.example.org",
    ),  # fmt: skip
    Kind.SFTP: dict(
        host="sftp{i}.example.org",
        username="u",
        path="/in",
        password="pw-{i}",
        host_key="SHA256:" + "B" * 43,
    ),  # fmt: skip
    Kind.XNAT: dict(
        url="https://xnat{i}.example.org",
        project="P{i}",
        username="u",
        password="pw-{i}",
    ),  # fmt: skip
}


def build_site() -> dict[str, list]:
    """Fill the database with bulk inserts; return samples to open pages for."""
    rng = random.Random(12)
    now = timezone.now()
    kinds = list(PROXIES)
    targets = []
    for i in range(N_TARGETS):
        kind = kinds[i % len(kinds)]
        fields = {
            k: v.format(i=i) if isinstance(v, str) else v
            for k, v in KIND_FIELDS[kind].items()
        }
        targets.append(
            Target(
                name=f"{kind}-{i:04d}",
                kind=kind,
                direction=Direction.BOTH
                if kind in (Kind.DICOM, Kind.DICOMWEB) and i % 3 == 0
                else Direction.STORE,
                enabled=i % 17 != 0,
                paused=i % 13 == 0,
                contact_email=f"it{i}@hospital.example" if i % 5 == 0 else "",
                description="Research <b>share</b> & more" if i % 7 == 0 else "",
                last_test_at=now - timedelta(minutes=i) if i % 2 else None,
                last_test_ok=(i % 4 == 1) if i % 2 else None,
                last_test_message="TCP connect failed: connection refused"
                if i % 4 == 3
                else "All checks passed.",
                last_test_result={
                    "ok": i % 4 == 1,
                    "host": "courier-web",
                    "checks": [
                        {
                            "name": "TCP connect",
                            "ok": i % 4 == 1,
                            "message": "<x>",
                            "duration_ms": 1.5,
                            "details": {"a": "b" * 200},
                        },  # fmt: skip
                    ],
                }
                if i % 2
                else None,
                **fields,
            )
        )
    Target.objects.bulk_create(targets, batch_size=500)
    targets = list(Target.objects.order_by("pk"))

    states = list(State)
    jobs = []
    for i in range(N_JOBS):
        state = states[i % len(states)]
        finished = state in (State.DONE, State.DONE_WITH_WARNINGS, State.FAILED,
                             State.CANCELLED)  # fmt: skip
        jobs.append(
            Job(
                target=targets[rng.randrange(N_TARGETS)],
                folder=f"/spool/series-{i}",
                owned_spool=i % 2 == 0,
                source=list(JobOrigin)[i % len(JobOrigin)],
                study_uid=f"1.2.826.0.1.{i // 3}",
                series_uid=f"1.2.826.0.1.{i // 3}.{i}",
                series_description=f"CT CHEST <{i}>" if i % 3 else "",
                state=state,
                created_at=now - timedelta(minutes=i),
                finished_at=now - timedelta(minutes=i - 1) if finished else None,
                lease_expires_at=now - timedelta(minutes=5)
                if state == State.SENDING and i % 2
                else None,
                attempt_count=i % 4,
                total=40,
                sent=20 if state != State.QUEUED else 0,
                failed=2 if state == State.FAILED else 0,
                bytes_sent=20 * 39_000,
                last_error="association rejected: <called AE> & more"
                if state in (State.FAILED, State.RETRY_WAIT)
                else "",
            )
        )
    Job.objects.bulk_create(jobs, batch_size=1000)
    jobs = list(Job.objects.order_by("pk"))
    Attempt.objects.bulk_create(
        [
            Attempt(
                job=job,
                number=n,
                worker="host:1:2",
                outcome="error",
                ended_at=job.created_at,
                error="timeout",
            )  # fmt: skip
            for job in jobs[:1500]
            for n in range(1, job.attempt_count + 1)
        ],
        batch_size=1000,
    )
    JobInstance.objects.bulk_create(
        [
            JobInstance(
                job=job,
                path=f"{job.folder}/{n}.dcm",
                state=list(InstanceState)[n % 5],
                message="<failed>",
            )  # fmt: skip
            for job in jobs[:400]
            for n in range(8)
        ],
        batch_size=1000,
    )

    rules = [
        Rule(name=f"rule {i}", order=i, enabled=i % 4 != 0, description="CT <to> PACS")
        for i in range(40)
    ]
    Rule.objects.bulk_create(rules)
    rules = list(Rule.objects.order_by("pk"))
    RuleCondition.objects.bulk_create(
        [
            RuleCondition(
                rule=rule, field="tag", keyword="Modality", operator="exact", value="CT"
            )  # fmt: skip
            for rule in rules
        ]
    )
    Rule.targets.through.objects.bulk_create(
        [
            Rule.targets.through(rule_id=rule.pk, target_id=targets[(j * 7) % 900].pk)
            for j, rule in enumerate(rules)
        ]
    )

    series_states = list(ReceivedSeries.State)
    series = [
        ReceivedSeries(
            series_uid=f"1.2.3.{i}",
            study_uid=f"1.2.3.{i // 4}",
            folder=f"/spool/incoming/s{i}",
            calling_aet=f"MOD{i % 12}",
            called_aet="COURIER",
            peer_address="10.0.0.5",
            last_received_at=now - timedelta(minutes=i),
            instance_count=30,
            bytes=30 * 39_000,
            tags={
                "Modality": "CT",
                "SeriesDescription": f"<b>head</b> {i}",
                "PatientID": f"P{i}",
            },  # fmt: skip
            state=series_states[i % len(series_states)],
            note="no rule matched" if i % 5 == 3 else "",
        )
        for i in range(N_SERIES)
    ]
    ReceivedSeries.objects.bulk_create(series, batch_size=1000)
    series = list(ReceivedSeries.objects.order_by("pk"))
    ReceivedSeries.jobs.through.objects.bulk_create(
        [
            ReceivedSeries.jobs.through(receivedseries_id=s.pk, job_id=jobs[i].pk)
            for i, s in enumerate(series)
        ],
        batch_size=1000,
    )
    ReceivedSeries.matched_rules.through.objects.bulk_create(
        [
            ReceivedSeries.matched_rules.through(
                receivedseries_id=s.pk, rule_id=rules[i % 40].pk
            )
            for i, s in enumerate(series[:1000])
        ],
        batch_size=1000,
    )
    ReceiverStatus.objects.create(
        name="COURIER@11112", refused_count=3, last_refusal="<corrupt>",
        last_refusal_at=now, info={"stored": 60_000},
    )  # fmt: skip
    RetrievalJob.objects.bulk_create(
        [
            RetrievalJob(
                source=targets[0],
                source_name=targets[0].name,
                state=list(RetrievalState)[i % len(RetrievalState)],
                study_uid=f"1.2.9.{i}",
                series_uids=[f"1.2.9.{i}.1"],
                destination=targets[3] if i % 2 else None,
                destination_name=targets[3].name if i % 2 else "",
                download=not i % 2,
                total=10,
                done=i % 11,
                message="<done>",
            )  # fmt: skip
            for i in range(300)
        ]
    )
    AuditEntry.objects.bulk_create(
        [
            AuditEntry(
                username="admin",
                action=list(AuditAction)[i % len(AuditAction)],
                source=targets[0],
                source_name=targets[0].name,
                criteria={"PatientID": f"P{i}"},
                result_count=i,
                detail="<ok>",
            )  # fmt: skip
            for i in range(500)
        ]
    )
    samples = {}
    for t in targets:  # one of each kind, and a paused and a disabled one
        samples.setdefault(t.kind, t)
        samples.setdefault((t.enabled, t.paused), t)
    return {
        "targets": list(samples.values()),
        "jobs": [next(j for j in jobs if j.state == s) for s in states],
        "series": [next(s for s in series if s.state == st) for st in series_states],
        "rules": rules[:1],
    }


FILTER_LINK = re.compile(r'<a href="(\?[^"]*)"')


def is_column(model, name) -> bool:
    try:
        return isinstance(name, str) and not model._meta.get_field(name).is_relation
    except Exception:
        return False


def test_no_admin_page_fails_on_a_realistic_database(admin_client, monkeypatch):
    samples = build_site()
    assert Target.objects.count() == N_TARGETS and Job.objects.count() == N_JOBS
    assert ReceivedSeries.objects.count() == N_SERIES

    failures: list[str] = []
    fetched = 0

    def fetch(url: str, *, form: bool = False):
        nonlocal fetched
        fetched += 1
        response = admin_client.get(url)
        if response.status_code != 200:
            failures.append(f"{response.status_code} {url}")
            return None
        html = response.content.decode()
        if form and "_save" not in Tags(html).named("input"):
            failures.append(f"no Save button in what a browser parses: {url}")
        return html

    fetch(reverse("admin:index"))
    fetch("/health/")
    for model, model_admin in admin.site._registry.items():
        opts = model._meta
        changelist = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        html = fetch(changelist)
        if html is None:
            continue
        # The first page has every sort of row (the data cycles through them); each
        # variant below runs its own query and renders its first rows, ten rather
        # than a page of a hundred (most of this test's time was rows rendered
        # again).
        monkeypatch.setattr(model_admin, "list_per_page", VARIANT_ROWS)
        filters = (
            html.split('id="changelist-filter"', 1)[-1]
            if "changelist-filter" in html
            else ""
        )
        # Two choices of each filter (and of the date drill-down).
        by_filter: dict[frozenset, list[str]] = {}
        for link in sorted({unescape(h) for h in FILTER_LINK.findall(filters)}):
            keys = frozenset(parse_qs(link[1:]))
            if "_facets" not in keys:
                by_filter.setdefault(keys, []).append(link)
        for links in by_filter.values():
            fetch(changelist + links[min(1, len(links) - 1)])  # past "All"
        # Sorting by a model's own column is the database's business; by a computed
        # or annotated column it is the admin's.
        for column, name in enumerate(model_admin.list_display, 1):
            if not is_column(model, name):
                fetch(f"{changelist}?o={column}")
        if model_admin.search_fields:
            fetch(f"{changelist}?q=1.2&o=-1")
        fetch(f"{changelist}?p=2")
        if model_admin.date_hierarchy:
            fetch(
                f"{changelist}?{model_admin.date_hierarchy}__year={timezone.now().year}"
            )

    seen_kinds = set()
    for target in samples["targets"]:
        fetch(reverse("admin:targets_target_change", args=[target.pk]), form=True)
        if target.kind not in seen_kinds:
            seen_kinds.add(target.kind)
            fetch(reverse("admin:targets_target_history", args=[target.pk]))
            fetch(reverse("admin:targets_target_delete", args=[target.pk]))
    for kind in PROXIES:
        fetch(f"{reverse('admin:targets_target_add')}?kind={kind}", form=True)
    fetch(reverse("admin:targets_target_add"))
    for job in samples["jobs"]:
        fetch(reverse("admin:dispatch_job_change", args=[job.pk]))
    for series in samples["series"]:
        fetch(reverse("admin:routing_receivedseries_change", args=[series.pk]))
    for rule in samples["rules"]:
        fetch(reverse("admin:routing_rule_change", args=[rule.pk]), form=True)
        fetch(reverse("admin:routing_rule_preview_saved", args=[rule.pk]))
    fetch(reverse("admin:routing_rule_add"), form=True)
    for model in (RetrievalJob, AuditEntry):
        obj = model.objects.first()
        opts = model._meta
        fetch(
            reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
        )
    assert not failures, f"{len(failures)} of {fetched} pages failed:\n" + "\n".join(
        failures[:40]
    )
    assert fetched > 100
