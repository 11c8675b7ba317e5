"""Rules that forward as instances arrive: judged on a series' first instance.

The receiver's bookkeeping calls `start_streaming` (through
`tasks.forward_received`) once the row of a series still arriving exists. The
rules with "forward as instances arrive" (`Rule.stream`) are matched on the
header of its first stored instance (every condition looks at one instance's
header and the AE titles, so nothing is lost by judging it before the series is
complete); their targets get open jobs (`Job.series_open`), which grow as
instances land (`dispatch.jobs.growing`) and `services.route_series` closes at
completion.
"""

from __future__ import annotations

import logging
from pathlib import Path

from django.db import transaction

from config.safetext import log_fields
from dispatch.jobs.models import JobOrigin
from dispatch.jobs.services import create_jobs
from targets.kinds.base import SendContext

from .matching import matching_rules, targets_of
from .models import ReceivedSeries, Rule
from .services import enabled_rule_specs, first_dicom, tags_summary, targets_in_order

log = logging.getLogger("courier.routing")
State = ReceivedSeries.State


def start_streaming(pk: int) -> list[int]:
    """Judge the rules that forward as instances arrive on a series still arriving
    (its first stored instance); make their targets' jobs, open. Return the ids of
    the series' open jobs (made now or by an earlier call: idempotent, a target
    gets one job per series).

    Called by the receiver's bookkeeping once the series' row exists; the files
    in its folder are durable. A series no streaming rule matches is left to
    `route_series` at completion.
    """
    with transaction.atomic():
        row = (
            ReceivedSeries.objects.select_for_update()
            .filter(pk=pk, state=State.RECEIVING)
            .first()
        )
        if row is None:
            return []
        have = {t: j for j, t in row.jobs.values_list("pk", "target_id")}
        open_ids = list(row.jobs.filter(series_open=True).values_list("pk", flat=True))
        specs = enabled_rule_specs(streaming=True)
        if not specs:
            return open_ids
        folder = Path(row.folder)
        first = first_dicom(folder)
        if first is None:
            return open_ids
        row.tags = tags_summary(first)
        row.save(update_fields=["tags"])
        matched = matching_rules(specs, row.facts())
        found = targets_in_order([t for t in targets_of(matched) if t not in have])
        jobs = []
        if found:
            jobs = create_jobs(
                folder,
                found,
                context=SendContext(
                    calling_aet=row.calling_aet, called_aet=row.called_aet
                ),
                owned_spool=True,
                source=JobOrigin.ROUTE,
                growing=True,
            )
            row.jobs.add(*jobs)
        if matched:
            row.matched_rules.add(*Rule.objects.filter(pk__in=[r.pk for r in matched]))
    if jobs:
        log.info(
            "event=series_streaming %s",
            log_fields(
                series_uid=row.series_uid,
                calling_aet=row.calling_aet,
                rules=",".join(r.name for r in matched),
                jobs=",".join(str(j.pk) for j in jobs),
            ),
        )
    return open_ids + [j.pk for j in jobs]
