"""The receiver's bookkeeping in the database: its series as `ReceivedSeries` rows,
its own state as a `ReceiverStatus` row, complete series handed to routing.

`DatabaseBookkeeper` is what `manage.py receive` gives the receiver; the receiver's
association threads never touch the database, its bookkeeping thread calls this
once a second.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

from django.db import connections, transaction
from django.db.models import F
from django.utils import timezone

from config.safetext import db_text, log_fields
from dispatch.jobs.commitment import record_report
from dispatch.routing.models import DESCRIPTION_SUFFIX, ReceivedSeries, count_instances
from dispatch.routing.tasks import forward_received, route_received

from .models import ReceiverStatus
from .series import Bookkeeper, OpenSeries

log = logging.getLogger("courier.receiver")
State = ReceivedSeries.State


class DatabaseBookkeeper(Bookkeeper):
    """Rows in the database; a series closed by the receiver goes to routing."""

    def __init__(self, name: str):
        self.name = name
        # Series still arriving, by row pk: the jobs of rules that forward them
        # as instances arrive (empty: none does).
        self._streams: dict[int, list[int]] = {}

    def restore(self, spool_incoming: Path) -> list[OpenSeries]:
        ReceiverStatus.objects.update_or_create(
            name=self.name,
            defaults={
                "started_at": timezone.now(),
                "heartbeat_at": timezone.now(),
                "info": {},
            },
        )
        return restore_open_series(spool_incoming)

    def save(self, series: list[OpenSeries]) -> list[OpenSeries]:
        failed = save_open_series(series)
        for s in series:
            if s.pk is not None and s not in failed:
                self._forward(s)
        return failed

    def _forward(self, series: OpenSeries) -> None:
        """Start or grow the jobs of rules that forward as instances arrive.

        A failure is logged; routing at completion catches up.
        """
        try:
            self._streams[series.pk] = forward_received(
                series.pk, self._streams.get(series.pk)
            )
        except Exception as exc:
            # Tried again on the next tick (the series is saved again too: that
            # is idempotent), whether or not another instance lands.
            series.dirty = True
            log.warning(
                "event=series_forward_failed %s",
                log_fields(series_uid=series.series_uid, error=exc),
            )

    def close(self, series: OpenSeries) -> None:
        if series.pk is None and save_open_series([series]):
            raise RuntimeError("the series' row could not be written")
        if series.pk is not None:
            self._streams.pop(series.pk, None)
            route_received(series.pk)

    def refused(self, reason: str, count: int) -> None:
        ReceiverStatus.objects.filter(name=self.name).update(
            refused_count=F("refused_count") + count,
            last_refusal=db_text(reason),
            last_refusal_at=timezone.now(),
        )

    def heartbeat(self, info: dict) -> None:
        ReceiverStatus.objects.filter(name=self.name).update(
            heartbeat_at=timezone.now(), info=info
        )

    def commitment_report(self, report, calling_aet: str, address: str) -> bool:
        try:
            row = record_report(
                report.transaction_uid,
                [(r.sop_class, r.sop_instance) for r in report.committed],
                [(r.sop_class, r.sop_instance, r.failure or 0) for r in report.failed],
                reported_by=calling_aet,
                reported_from=address,
            )
            return row is not None
        finally:
            # An association's thread, not the bookkeeping one: no connection
            # left open behind it.
            connections.close_all()

    def stopped(self, info: dict) -> None:
        """The receiver stopped on purpose (not a silent heartbeat: not degraded)."""
        self.heartbeat({**info, "stopped": True})


def save_open_series(items: list[OpenSeries]) -> list[OpenSeries]:
    """Create or update the rows of series being received.

    Each item gets its row's `pk`. A row is only updated while it is still
    receiving. Each series is saved on its own (a savepoint in one transaction):
    one the database refuses is logged and returned, the others are saved.
    """
    failed = []
    with transaction.atomic():
        for s in items:
            try:
                with transaction.atomic():
                    if s.pk is None:
                        row, _ = ReceivedSeries.objects.get_or_create(
                            folder=db_text(s.folder),
                            defaults=_series_fields(s),
                        )
                        s.pk = row.pk
                    ReceivedSeries.objects.filter(
                        pk=s.pk, state=State.RECEIVING
                    ).update(
                        last_received_at=s.last_received,
                        instance_count=s.instance_count,
                        bytes=s.bytes,
                    )
            except Exception as exc:
                log.warning(
                    "event=series_save_failed %s",
                    log_fields(series_uid=s.series_uid, error=exc),
                )
                failed.append(s)
    return failed


def _series_fields(s: OpenSeries) -> dict:
    return {
        "series_uid": db_text(s.series_uid, 64),
        "study_uid": db_text(s.study_uid, 64),
        "calling_aet": db_text(s.calling_aet, 16),
        "called_aet": db_text(s.called_aet, 16),
        "peer_address": db_text(s.peer_address, 100),
        "first_received_at": s.first_received,
        "last_received_at": s.last_received,
        "instance_count": s.instance_count,
        "bytes": s.bytes,
    }


def restore_open_series(incoming: Path) -> list[OpenSeries]:
    """Series still receiving from an earlier run, as `OpenSeries`, folders adopted.

    A series folder whose row was never written (the receiver died within a second
    of its first instance) is adopted from its description file beside it.
    """
    known = set(ReceivedSeries.objects.values_list("folder", flat=True))
    for description in sorted(incoming.glob(f"*{DESCRIPTION_SUFFIX}")):
        folder = incoming / description.name[: -len(DESCRIPTION_SUFFIX)]
        if str(folder) in known or not folder.is_dir():
            continue
        # One folder that cannot be adopted never keeps the receiver from starting.
        try:
            _adopt(folder, json.loads(description.read_text()))
        except Exception as exc:
            log.error(
                "event=series_adopt_failed %s", log_fields(folder=folder, error=exc)
            )
    restored = []
    for row in ReceivedSeries.objects.filter(state=State.RECEIVING):
        folder = Path(row.folder)
        if not folder.is_dir():
            continue
        sops = {p.stem for p in folder.glob("*.dcm")}
        restored.append(
            OpenSeries(
                series_uid=row.series_uid,
                calling_aet=row.calling_aet,
                called_aet=row.called_aet,
                peer_address=row.peer_address,
                folder=folder,
                study_uid=row.study_uid,
                first_received=row.first_received_at,
                last_received=row.last_received_at,
                sop_uids=sops,
                bytes=row.bytes,
                pk=row.pk,
                dirty=False,
            )
        )
    return restored


def _adopt(folder: Path, meta: dict) -> None:
    count, size = count_instances(folder)
    first = meta.get("first_received")
    row = ReceivedSeries.objects.create(
        folder=db_text(folder),
        series_uid=db_text(meta.get("series_uid"), 64),
        study_uid=db_text(meta.get("study_uid"), 64),
        calling_aet=db_text(meta.get("calling_aet"), 16),
        called_aet=db_text(meta.get("called_aet"), 16),
        peer_address=db_text(meta.get("peer_address"), 100),
        first_received_at=datetime.fromisoformat(first) if first else timezone.now(),
        instance_count=count,
        bytes=size,
    )
    log.warning(
        "event=series_adopted %s",
        log_fields(series_uid=row.series_uid, folder=folder, instances=count),
    )
