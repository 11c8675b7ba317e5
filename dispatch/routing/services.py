"""Routing services: from a received series to dispatch jobs.

The services move a `ReceivedSeries` through its states:

    receiving ─(quiet period)→ complete ─(route_series)→ routed | unrouted | failed

A rule that forwards as instances arrive (`Rule.stream`) is judged earlier, when
the series' first instance is stored (`streaming.start_streaming`, from the
receiver's bookkeeping): its targets get their jobs then, open
(`Job.series_open`), which take each instance as it lands (`dispatch.jobs.growing`).
`route_series` closes those jobs when the series is complete and routes the other
rules as before; a target with a job for the series gets no second one.

`route_series` is idempotent: it locks the row, acts only on a complete series (or
one being re-routed) and creates the jobs and the new state in one transaction, so a
worker killed at any point either routed the series completely or not at all, and
the next sweep finishes the job. Jobs go through `dispatch.jobs.services.create_jobs`
with the spool folder owned by Courier (deleted once every job is done) and the AE
titles the series arrived with (for the pass-incoming switches). Which rules match
is decided by the pure functions of `matching`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from config.safetext import db_text, log_fields
from dispatch.jobs.models import ACTIVE_STATES, UNSUCCESSFUL_STATES, JobOrigin
from dispatch.jobs.services import DispatchError, close_jobs, create_jobs
from targets.kinds.base import SendContext
from targets.models import Target

from .matching import RuleSpec, matching_rules, targets_of
from .models import DESCRIPTION_SUFFIX, ReceivedSeries, Rule, count_instances

log = logging.getLogger("courier.routing")
State = ReceivedSeries.State

# Tags shown first in the admin's tags summary.
SUMMARY_KEYWORDS = (
    "Modality",
    "PatientID",
    "PatientName",
    "AccessionNumber",
    "StudyDate",
    "StudyDescription",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "InstitutionName",
    "StationName",
    "SOPClassUID",
)
# Longer values are not kept in the summary (they are not what rules match on).
MAX_TAG_TEXT = 256


def rule_spec(rule) -> RuleSpec:
    """Turn a `Rule` (with its conditions and targets) into a `RuleSpec`."""
    return RuleSpec(
        name=rule.name,
        match=rule.match,
        conditions=[(c.fact_name, c.operator, c.value) for c in rule.conditions.all()],
        target_ids=[t.pk for t in rule.targets.all()],
        pk=rule.pk,
    )


def enabled_rule_specs(*, streaming: bool = False) -> list[RuleSpec]:
    """The enabled rules in order; `streaming`: only those that forward as
    instances arrive."""
    rules = Rule.objects.filter(enabled=True)
    if streaming:
        rules = rules.filter(stream=True)
    rules = rules.prefetch_related("conditions", "targets")
    return [rule_spec(r) for r in rules]


# -- tags summary --------------------------------------------------------------------


def tags_summary(path: str | Path) -> dict[str, str]:
    """Top-level text tags of one instance, keyword -> text (multi-values joined by \\)."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    summary: dict[str, str] = {}
    for elem in ds:
        if not elem.keyword or elem.VR in (
            "SQ",
            "OB",
            "OW",
            "OF",
            "OD",
            "OL",
            "OV",
            "UN",
            "UT",
            "UC",
            "UR",
        ):
            continue
        try:
            value = elem.value
            if value is None:
                continue
            if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
                text = "\\".join(str(v) for v in value)
            else:
                text = str(value)
        except Exception:  # an odd value must not stop routing
            continue
        if len(text) <= MAX_TAG_TEXT:
            summary[elem.keyword] = db_text(text)
    return summary


def first_dicom(folder: Path) -> Path | None:
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".dcm"))
    except OSError:
        return None
    return folder / names[0] if names else None


def complete_series(pk: int) -> bool:
    """Mark a receiving series complete (counts from disk, tags summary); True if so."""
    row = ReceivedSeries.objects.filter(pk=pk, state=State.RECEIVING).first()
    if row is None:
        return False
    folder = Path(row.folder)
    # Half-written files of a receiver that died mid-write were never acknowledged
    # (the sender resends them): they must not be sent on.
    for part in folder.glob(".*.part"):
        part.unlink(missing_ok=True)
    count, size = count_instances(folder)
    first = first_dicom(folder)
    tags: dict[str, str] = {}
    note = ""
    if first is not None:
        try:
            tags = tags_summary(first)
        except Exception as exc:  # stored anyway; routing sees no tags
            note = db_text(f"could not read the tags of {first.name}: {exc}")
    now = timezone.now()
    new_state = State.COMPLETE if count else State.FAILED
    if not count:
        note = "no instance was stored in the series folder"
    updated = ReceivedSeries.objects.filter(pk=pk, state=State.RECEIVING).update(
        state=new_state,
        state_changed_at=now,
        instance_count=count,
        bytes=size,
        tags=tags,
        note=note,
    )
    return bool(updated)


def complete_quiet_series(
    now: datetime | None = None, *, grace: float = 0.0
) -> list[int]:
    """Complete series with no new instance for the quiet period (+ `grace` seconds).

    The receiver closes its own series on time; this catches series whose receiver
    stopped or died (the worker calls it with a grace period so it never races a
    live receiver).
    """
    now = now or timezone.now()
    quiet = timedelta(seconds=float(settings.COURIER_SERIES_QUIET_SECONDS) + grace)
    due = ReceivedSeries.objects.filter(
        state=ReceivedSeries.State.RECEIVING, last_received_at__lt=now - quiet
    ).values_list("pk", flat=True)
    return [pk for pk in list(due) if contained(complete_series, pk, "complete")]


def contained(step, pk: int, what: str, **kwargs):
    """Run one series' step; a failure is logged and the series marked failed
    (re-routable from the admin), so it never stops the series after it.

    `what` names the step in the log and the note ("complete", "route").
    """
    try:
        return step(pk, **kwargs)
    except Exception as exc:
        log.exception("event=series_%s_failed %s", what, log_fields(pk=pk))
        mark_failed(pk, f"could not {what} the series: {type(exc).__name__}: {exc}")
        return None


def mark_failed(pk: int, note: str) -> None:
    """Set a series failed with `note` (best effort: logged if even that fails).

    Jobs that forwarded its instances as they arrived are closed with what the
    folder holds: they end instead of waiting for instances that will not come.
    """
    try:
        ReceivedSeries.objects.filter(pk=pk).update(
            state=ReceivedSeries.State.FAILED,
            state_changed_at=timezone.now(),
            note=db_text(note, 2000),
        )
    except Exception:
        log.exception("event=series_mark_failed_failed %s", log_fields(pk=pk))
    try:
        row = ReceivedSeries.objects.filter(pk=pk).first()
        if row is not None:
            _close_streams(row)
    except Exception:
        log.exception("event=series_close_jobs_failed %s", log_fields(pk=pk))


def _close_streams(row: ReceivedSeries) -> list[int]:
    """Close the series' open jobs (forwarding as instances arrive); their ids."""
    ids = list(row.jobs.filter(series_open=True).values_list("pk", flat=True))
    if ids:
        close_jobs(ids, row.folder)
    return ids


@dataclass
class RouteResult:
    state: str
    rules: list[str] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    note: str = ""


def _default_target():
    name = (settings.COURIER_UNROUTED_DEFAULT_TARGET or "").strip()
    if not name:
        return None
    return Target.objects.filter(name__iexact=name).first()


def targets_in_order(target_ids: list[int]) -> list[Target]:
    """The targets of `target_ids` that still exist, in that order (rule order)."""
    found = list(Target.objects.filter(pk__in=target_ids))
    found.sort(key=lambda t: target_ids.index(t.pk))
    return found


def route_series(pk: int, *, reroute: bool = False) -> RouteResult | None:
    """Create the dispatch jobs of a complete series; None if it is not routable now.

    Every matched rule's targets get one job each (a target matched by several rules
    gets one). No match: the default target (`COURIER_UNROUTED_DEFAULT_TARGET`), or
    the series is kept as unrouted. `reroute=True` routes a routed, unrouted or
    failed series again with the current rules, skipping targets that already have a
    job for it that is not failed or cancelled.
    """
    allowed = [State.COMPLETE]
    if reroute:
        allowed += [State.ROUTED, State.UNROUTED, State.FAILED]
    with transaction.atomic():
        row = (
            ReceivedSeries.objects.select_for_update()
            .filter(pk=pk, state__in=allowed)
            .first()
        )
        if row is None:
            return None
        now = timezone.now()
        # Jobs that forwarded the series as it arrived take its last instances
        # and may end now (one transaction with the rest of routing).
        streamed = _close_streams(row)
        specs = enabled_rule_specs()
        matched = matching_rules(specs, row.facts())
        target_ids = targets_of(matched)
        note = ""
        if not matched and not streamed:
            default = _default_target()
            if default is not None:
                target_ids = [default.pk]
                note = f"no rule matched: sent to the default target {default.name}"
        if (reroute or streamed) and target_ids:
            jobs_now = row.jobs.all()
            if reroute:
                jobs_now = jobs_now.exclude(state__in=UNSUCCESSFUL_STATES)
            busy = set(jobs_now.values_list("target_id", flat=True))
            target_ids = [t for t in target_ids if t not in busy]
        targets = targets_in_order(target_ids)
        jobs = []
        folder = Path(row.folder)
        if targets and not folder.is_dir():
            state, note = State.FAILED, f"the spool folder {folder} is gone"
        elif targets:
            try:
                jobs = create_jobs(
                    folder,
                    targets,
                    context=SendContext(
                        calling_aet=row.calling_aet, called_aet=row.called_aet
                    ),
                    owned_spool=True,
                    source=JobOrigin.ROUTE,
                )
                state = State.ROUTED
            except DispatchError as exc:
                state, note = State.FAILED, f"jobs could not be created: {exc}"
        elif streamed and not reroute:
            state = State.ROUTED
        elif matched or (reroute and row.jobs.exists()):
            state = State.ROUTED
            note = note or (
                "already routed to every matching target"
                if reroute
                else "the matching rules have no targets"
            )
        else:
            state = State.UNROUTED
            name = (settings.COURIER_UNROUTED_DEFAULT_TARGET or "").strip()
            note = (
                f"no rule matched, and the default target {name!r} does not exist"
                if name
                else "no rule matched and there is no default target"
            )
        row.state = state
        row.state_changed_at = now
        row.note = db_text(note)
        if state == State.ROUTED:
            row.routed_at = now
        row.save(update_fields=["state", "state_changed_at", "note", "routed_at"])
        rules = Rule.objects.filter(pk__in=[r.pk for r in matched])
        if reroute or streamed:
            row.matched_rules.add(*rules)
        else:
            row.matched_rules.set(rules)
        if jobs:
            row.jobs.add(*jobs)
    log.info(
        "event=series_routed %s",
        log_fields(
            series_uid=row.series_uid,
            calling_aet=row.calling_aet,
            state=state,
            rules=",".join(r.name for r in matched) or "-",
            jobs=",".join(str(j.pk) for j in jobs) or "-",
            streamed=",".join(str(pk) for pk in streamed) or "-",
            note=note,
        ),
    )
    return RouteResult(state, [r.name for r in matched], [j.pk for j in jobs], note)


def send_by_hand(pk: int, target, *, user: str = "") -> RouteResult:
    """Send a received series to `target` because an operator chose it (no rule).

    For a series kept as unrouted or failed, or routed but also wanted elsewhere.
    Raise `DispatchError` in words when it cannot be sent: still receiving, its
    spool folder gone, or a job of that target for it is live or done already.
    """
    with transaction.atomic():
        row = ReceivedSeries.objects.select_for_update().filter(pk=pk).first()
        if row is None:
            raise DispatchError("the series no longer exists")
        if row.state not in (State.UNROUTED, State.FAILED, State.ROUTED):
            raise DispatchError(
                f"the series is {row.get_state_display().lower()}: wait until it "
                "is complete"
            )
        folder = Path(row.folder)
        if row.folder_removed_at or not folder.is_dir():
            raise DispatchError(
                f"its spool folder {folder} is gone (retention, or all its jobs done)"
            )
        live = row.jobs.filter(target=target).exclude(state__in=UNSUCCESSFUL_STATES)
        if live.exists():
            raise DispatchError(
                f"{target.name} already has a job for this series (job "
                f"{live.first().pk}): retry that one instead"
            )
        jobs = create_jobs(
            folder,
            [target],
            context=SendContext(calling_aet=row.calling_aet, called_aet=row.called_aet),
            owned_spool=True,
            source=JobOrigin.ADMIN,
        )
        now = timezone.now()
        note = f"sent by hand to {target.name}" + (f" by {user}" if user else "")
        row.state, row.state_changed_at, row.note = State.ROUTED, now, note
        row.routed_at = row.routed_at or now
        row.save(update_fields=["state", "state_changed_at", "note", "routed_at"])
        row.jobs.add(*jobs)
    log.info(
        "event=series_sent_by_hand %s",
        log_fields(
            series_uid=row.series_uid,
            target=target.name,
            jobs=",".join(str(j.pk) for j in jobs),
            user=user or "-",
        ),
    )
    return RouteResult(State.ROUTED, [], [j.pk for j in jobs], note)


def route_pending(now: datetime | None = None) -> int:
    """Route every complete series not routed yet (a lost message, a killed worker)."""
    pks = list(
        ReceivedSeries.objects.filter(state=ReceivedSeries.State.COMPLETE)
        .order_by("last_received_at")
        .values_list("pk", flat=True)
    )
    return sum(1 for pk in pks if contained(route_series, pk, "route") is not None)


def preview(specs: Sequence[RuleSpec], *, limit: int = 50):
    """Recent received series with the rules (of `specs`) each would match."""
    rows = ReceivedSeries.objects.exclude(state=ReceivedSeries.State.RECEIVING)[:limit]
    return [(row, [r.name for r in matching_rules(specs, row.facts())]) for row in rows]


# -- retention -------------------------------------------------------------------------


def purge_expired(now: datetime | None = None) -> int:
    """Delete failed and unrouted series (rows and folders) past their retention.

    Also notes folders removed by dispatch (all jobs done) and removes the
    description files of folders that are gone.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(days=float(settings.COURIER_UNROUTED_RETENTION_DAYS))
    spool = Path(settings.COURIER_SPOOL_DIR).resolve()
    expired = ReceivedSeries.objects.filter(
        state__in=[State.FAILED, State.UNROUTED], state_changed_at__lt=cutoff
    ).filter(Q(jobs__isnull=True) | ~Q(jobs__state__in=ACTIVE_STATES))
    purged = 0
    for row in expired.distinct():
        folder = Path(row.folder)
        try:
            if folder.is_dir() and folder.resolve().is_relative_to(spool):
                shutil.rmtree(folder, ignore_errors=True)
            Path(f"{folder}{DESCRIPTION_SUFFIX}").unlink(missing_ok=True)
            row.delete()
        except Exception:  # the next series is purged all the same
            log.exception("event=series_expire_failed %s", log_fields(pk=row.pk))
            continue
        log.info(
            "event=series_expired %s",
            log_fields(series_uid=row.series_uid, folder=folder, state=row.state),
        )
        purged += 1
    gone = (
        ReceivedSeries.objects.filter(folder_removed_at__isnull=True)
        .exclude(state=State.RECEIVING)
        .values_list("pk", "folder")
    )
    for pk, folder in list(gone):
        if not Path(folder).exists():
            Path(f"{folder}{DESCRIPTION_SUFFIX}").unlink(missing_ok=True)
            ReceivedSeries.objects.filter(pk=pk).update(folder_removed_at=now)
    return purged


# -- the periodic safety net ------------------------------------------------------------


def sweep() -> None:
    """Complete series whose receiver went away, route what is complete, purge.

    The grace period on top of the quiet period (at least 30 s) keeps the sweep
    from completing a series a live receiver is still closing on its own.
    """
    grace = max(30.0, float(settings.COURIER_SERIES_QUIET_SECONDS))
    # Each step on its own: a failure in one (logged) never skips the others.
    for step in (lambda: complete_quiet_series(grace=grace), route_pending,
                 purge_expired):  # fmt: skip
        try:
            step()
        except Exception:
            log.exception("event=routing_sweep_step_failed")
