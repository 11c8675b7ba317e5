"""Claims and leases: exactly one worker holds a row, and knows when it no longer does.

A worker takes a row (a dispatch job, a query tool retrieval) with one conditional
UPDATE, so of any number of workers on any number of machines exactly one matches
the row; the update names the worker (`lease_owner`) and until when its claim holds
(`lease_expires_at`, `COURIER_JOB_LEASE` seconds ahead). A `LeaseKeeper` thread
renews the lease while the worker works. A row whose lease ran out belongs to a
worker that died: whoever looks next may take it over.

The row's model needs `state`, `lease_owner` and `lease_expires_at` fields.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connections
from django.db.models import Model, Q, QuerySet
from django.utils import timezone

from config.safetext import log_fields

log = logging.getLogger("courier.dispatch")


def worker_id() -> str:
    """Name this worker thread in attempts, leases and logs."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def lease_length() -> timedelta:
    return timedelta(seconds=float(settings.COURIER_JOB_LEASE))


def renew_every() -> float:
    """Seconds between renewals of a lease: five chances before it runs out."""
    return max(0.2, float(settings.COURIER_JOB_LEASE) / 5)


def ran_out(now: datetime) -> Q:
    """Rows whose worker stopped renewing its lease (it died, or lost the database)."""
    return Q(lease_expires_at__lt=now)


def take(rows: QuerySet, worker: str, now: datetime, **fields) -> int:
    """Claim `rows` for `worker` with a fresh lease, setting `fields` too.

    One conditional UPDATE: `rows` says what may be claimed, and of several
    workers taking the same row at once exactly one updates it. Return how many
    rows were taken (0: someone else has it, or it may not be claimed now).
    """
    return rows.update(
        lease_owner=worker, lease_expires_at=now + lease_length(), **fields
    )


def look_again_at(expires: datetime) -> datetime:
    """When to look at a held row again: just after its lease would run out."""
    return expires + timedelta(seconds=min(1.0, renew_every()))


def check_on(
    model: type[Model],
    pk: int,
    held_state: str,
    *,
    look_again: Callable[[datetime], None],
    take_over: Callable[[], object],
) -> None:
    """What a watch on a held row does when it comes due.

    Queued when the row is claimed, for when its lease would run out. A row no
    longer in `held_state` was finished: nothing to do. One whose worker still
    renews gets `look_again(new end)`; one whose lease ran out is taken over
    (`take_over()`), seconds after its worker died rather than at the next sweep.
    """
    row = model.objects.filter(pk=pk).values_list("state", "lease_expires_at").first()
    if row is None or row[0] != held_state:
        return
    expires = row[1]
    if expires is not None and expires >= timezone.now():
        look_again(expires)
        return
    take_over()


class LeaseKeeper:
    """Renew the lease on one row from a thread of its own while it is held.

    Its own thread, so that nothing the worker does (reading a large folder, a slow
    instance) delays a renewal. `valid` turns false when the row was taken from
    this worker (cancelled, taken over, or no longer in one of `states`) or when no
    renewal has succeeded for most of a lease: a worker that cannot reach the
    database stops working before another may claim the row, so two workers never
    work on one row.
    """

    def __init__(self, model: type[Model], pk: int, worker: str, states: Iterable[str]):
        self.model = model
        self.pk = pk
        self.worker = worker
        self.states = list(states)
        self.lease = lease_length().total_seconds()
        self.every = renew_every()
        self.renewed_at = time.monotonic()
        # Told the new end of the lease once, at the next renewal (`then`).
        self._then: Callable[[datetime], None] | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            name=f"lease-{model._meta.model_name}-{pk}",
            daemon=True,
        )

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def then(self, call: Callable[[datetime], None]) -> LeaseKeeper:
        """Call `call(new end of the lease)` once, after the next renewal (in the
        keeper's thread): for what only a row still held that long needs."""
        self._then = call
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def valid(self) -> bool:
        # A renewal that started before this point may have extended the lease;
        # one that did not succeed for (lease - one interval) may not have.
        overdue = time.monotonic() - self.renewed_at > self.lease - self.every
        return not self.lost.is_set() and not overdue

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.every):
                started = time.monotonic()
                expires = timezone.now() + lease_length()
                try:
                    renewed = self.model.objects.filter(
                        pk=self.pk, lease_owner=self.worker, state__in=self.states
                    ).update(lease_expires_at=expires)
                except Exception as exc:  # the database is away: try again
                    log.warning(
                        "lease renewal failed %s",
                        log_fields(
                            row=f"{self.model._meta.label}:{self.pk}",
                            error=type(exc).__name__,
                        ),
                    )
                    continue
                if not renewed:
                    self.lost.set()
                    return
                self.renewed_at = started
                call, self._then = self._then, None
                if call is not None:
                    try:
                        call(expires)
                    except Exception as exc:  # the queue is away: the sweep remains
                        log.warning(
                            "after lease renewal %s",
                            log_fields(
                                row=f"{self.model._meta.label}:{self.pk}",
                                error=type(exc).__name__,
                            ),
                        )
        finally:
            # This thread's own database connection.
            connections.close_all()
