"""Target services shared by the admin, the `test_target` command and the worker."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable

from django.utils import timezone

from .kinds.base import Check, CheckReport
from .models import Target
from .redaction import crash_site, redact, secret_values

log = logging.getLogger(__name__)

TEST_FIELDS = ["last_test_at", "last_test_ok", "last_test_message", "last_test_result"]


def run_test(target: Target, *, store: bool = True) -> CheckReport:
    """Run the target's checks for real, store the outcome on it and return it.

    With `store=False` (settings from a form that are not saved) the outcome is only
    returned: the last-test columns describe the saved settings.

    Never raises for anything the handler does: an unexpected exception becomes a
    failed check ("internal error: <type>") and a log line without the exception's
    message (which could hold a secret). Only the last-test columns are written, so
    a test never overwrites an edit made meanwhile.
    """
    target = target.as_kind()
    try:
        result = target.handler.test()
        if not isinstance(result, CheckReport):
            raise TypeError(f"test() returned {type(result).__name__}")
    except Exception as exc:
        log.error(
            "target test crashed target=%s kind=%s error=%s at=%s",
            target.pk,
            target.kind,
            type(exc).__name__,
            crash_site(exc),
        )
        result = CheckReport(
            checks=[
                Check(
                    name="test",
                    ok=False,
                    message=f"internal error: {type(exc).__name__} (see the log)",
                )
            ]
        )

    # Defence in depth: a handler's message must not echo a secret back.
    secrets = secret_values(target)
    for check in result.checks:
        check.message = redact(str(check.message), secrets)
        check.details = {
            str(k): redact(str(v), secrets) for k, v in (check.details or {}).items()
        }

    if not store:
        return result
    target.last_test_at = timezone.now()
    target.last_test_ok = result.ok
    target.last_test_message = result.summary if result.checks else "No checks ran."
    # Where the checks ran matters for folders and networks: with several machines
    # the web server may see other mounts and routes than the workers.
    target.last_test_result = {**result.as_dict(), "host": socket.gethostname()}
    if target.pk is not None:
        Target.objects.filter(pk=target.pk).update(
            **{name: getattr(target, name) for name in TEST_FIELDS}
        )
    return result


def run_test_report(target_id: int) -> dict | None:
    """Test the target here and say where: the result, the host and the process.

    None if there is no such target (deleted meanwhile).
    """
    target = Target.objects.filter(pk=target_id).first()
    if target is None:
        return None
    result = run_test(target)
    return {
        **result.as_dict(),
        "summary": result.summary if result.checks else "No checks ran.",
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def pause_targets(targets: Iterable[Target]) -> int:
    """Pause dispatch to the targets: their jobs wait (paused) until resumed."""
    return Target.objects.filter(pk__in=[t.pk for t in targets]).update(paused=True)


def resume_targets(targets: Iterable[Target]) -> int:
    """Resume dispatch to the targets.

    Their paused jobs are queued again by dispatch: at once when resumed through
    `dispatch.jobs.services.resume_targets` (the admin does), else by its sweep.
    """
    return Target.objects.filter(pk__in=[t.pk for t in targets]).update(paused=False)
