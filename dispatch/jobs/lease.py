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
    """Renew the lease on rows held by one worker while it works on them.

    One thread per process renews every keeper's rows (`_Renewer`), so that nothing
    the worker does (reading a large folder, a slow instance) delays a renewal, and
    a job costs no thread of its own: a keeper whose work ends within one renewal
    period (`renew_every`) is never renewed at all, as its first lease is still
    good. `valid` turns false when a row was taken from this worker (cancelled,
    taken over, or no longer in one of `states`) or when no renewal has succeeded
    for most of a lease: a worker that cannot reach the database stops working
    before another may claim the row, so two workers never work on one row.

    A keeper may hold several rows (a batch of small jobs): `release` those that
    are finished, `valid_for` tells whether one is still held.
    """

    def __init__(
        self,
        model: type[Model],
        pk: int | Iterable[int],
        worker: str,
        states: Iterable[str],
    ):
        self.model = model
        self.pks = [pk] if isinstance(pk, int) else list(pk)
        self.pk = self.pks[0] if self.pks else None
        self.worker = worker
        self.states = list(states)
        self.lease = lease_length().total_seconds()
        self.every = renew_every()
        self.renewed_at = time.monotonic()
        # Told the new end of the lease once, at the next renewal (`then`).
        self._then: Callable[[datetime], None] | None = None
        self.lost = threading.Event()
        self.lost_rows: set[int] = set()
        self._held = set(self.pks)

    def start(self) -> LeaseKeeper:
        self.renewed_at = time.monotonic()
        _renewer.add(self)
        return self

    def then(self, call: Callable[[datetime], None]) -> LeaseKeeper:
        """Call `call(new end of the lease)` once, after the next renewal (in the
        renewing thread): for what only a row still held that long needs."""
        self._then = call
        return self

    def release(self, pks: Iterable[int]) -> None:
        """Rows no longer held (finished by this worker): no more renewals."""
        with _renewer.lock:
            self._held.difference_update(pks)

    def stop(self) -> None:
        _renewer.remove(self)

    @property
    def valid(self) -> bool:
        # A renewal that started before this point may have extended the lease;
        # one that did not succeed for (lease - one interval) may not have.
        overdue = time.monotonic() - self.renewed_at > self.lease - self.every
        return not self.lost.is_set() and not overdue

    def valid_for(self, pk: int) -> bool:
        return pk not in self.lost_rows and pk in self._held and self.valid_time

    @property
    def valid_time(self) -> bool:
        return time.monotonic() - self.renewed_at <= self.lease - self.every

    @property
    def due(self) -> float:
        return self.renewed_at + self.every

    def renew(self) -> None:
        """One renewal of the held rows (in the renewing thread)."""
        started = time.monotonic()
        expires = timezone.now() + lease_length()
        with _renewer.lock:
            held = sorted(self._held)
        if not held:
            self.renewed_at = started
            return
        try:
            rows = self.model.objects.filter(
                pk__in=held, lease_owner=self.worker, state__in=self.states
            )
            renewed = rows.update(lease_expires_at=expires)
            if renewed < len(held):
                kept = set(rows.values_list("pk", flat=True))
            else:
                kept = set(held)
        except Exception as exc:  # the database is away: try again
            log.warning(
                "lease renewal failed %s",
                log_fields(
                    row=f"{self.model._meta.label}:{held[0]}",
                    error=type(exc).__name__,
                ),
            )
            connections.close_all()
            return
        with _renewer.lock:
            # A row released meanwhile was finished, not taken.
            gone = {pk for pk in held if pk not in kept and pk in self._held}
        if gone:
            self.lost_rows |= gone
            if len(self.pks) == 1 or gone >= set(held):
                self.lost.set()
        self.renewed_at = started
        call, self._then = self._then, None
        if call is not None and not self.lost.is_set():
            try:
                call(expires)
            except Exception as exc:  # the queue is away: the sweep remains
                log.warning(
                    "after lease renewal %s",
                    log_fields(
                        row=f"{self.model._meta.label}:{held[0]}",
                        error=type(exc).__name__,
                    ),
                )


class _Renewer:
    """The process's lease-renewing thread: started with the first keeper, asleep
    (and without a database connection) while no keeper holds anything."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._keepers: set[LeaseKeeper] = set()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, keeper: LeaseKeeper) -> None:
        with self.lock:
            self._keepers.add(keeper)
            if self._thread is None or self._pid != os.getpid():
                # (A forked child has no renewing thread of its own yet.)
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="lease-renewer", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def remove(self, keeper: LeaseKeeper) -> None:
        with self.lock:
            self._keepers.discard(keeper)

    def _run(self) -> None:
        connected = False
        while True:
            with self.lock:
                if not self._keepers and not connected:
                    self._wake.wait()  # until a keeper is added
                    continue
                due: list[LeaseKeeper] = []
                if self._keepers:
                    now = time.monotonic()
                    first = min(k.due for k in self._keepers)
                    if first > now:
                        self._wake.wait(first - now)
                        continue
                    # Those due now, and those due soon with them.
                    due = [k for k in self._keepers if k.due <= now + k.every / 4]
            if not due:
                # Nothing held: no database connection kept open meanwhile.
                connections.close_all()
                connected = False
                continue
            connected = True
            for keeper in due:
                keeper.renew()
                if keeper.lost.is_set():
                    self.remove(keeper)


_renewer = _Renewer()


class RowLease:
    """One row of a keeper that holds several: `valid` while that row is held."""

    def __init__(self, keeper: LeaseKeeper, pk: int):
        self.keeper, self.pk = keeper, pk

    @property
    def valid(self) -> bool:
        return self.keeper.valid_for(self.pk)
