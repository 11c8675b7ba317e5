"""`manage.py test_target <name>`: run a target's checks and print them.

`--on-worker` runs them on a worker (`run_huey`) instead, and says which: a site with
several machines tests from where it sends.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from targets.models import Target
from targets.services import run_test_report


class Command(BaseCommand):
    help = "Test a target for real (the same checks as the admin's Test button)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name", help="Target name (case-insensitive).")
        parser.add_argument(
            "--on-worker",
            action="store_true",
            help="Run the checks on a worker (manage.py run_huey), where jobs are "
            "sent from; the result names the host and process.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="With --on-worker: seconds to wait for a worker (default 60).",
        )

    def handle(
        self, *args, name: str, on_worker: bool, timeout: float, **options
    ) -> None:
        target = Target.objects.filter(name__iexact=name).first()
        if target is None:
            known = ", ".join(Target.objects.values_list("name", flat=True)[:20])
            raise CommandError(
                f"No target named {name!r}."
                + (f" Known targets: {known}." if known else " No targets exist yet.")
            )
        report = (
            self.on_worker(target, timeout) if on_worker else run_test_report(target.pk)
        )
        if report is None:
            raise CommandError(f"The target {target.name} was deleted meanwhile.")
        for check in report["checks"]:
            if check["ok"]:
                status = self.style.SUCCESS("ok    ")
            elif check["informational"]:
                status = self.style.WARNING("info  ")
            else:
                status = self.style.ERROR("FAILED")
            message = f": {check['message']}" if check["message"] else ""
            line = f"{status} {check['name']}{message} ({check['duration_ms']:.0f} ms)"
            self.stdout.write(line)
            for key, value in (check["details"] or {}).items():
                self.stdout.write(f"       {key}: {value}")
        where = f"ran on {report['host']}"
        if on_worker:
            where += f" (worker process {report['pid']})"
        self.stdout.write(where)
        if not report["ok"]:
            raise CommandError(
                f"Test of {target.name} failed: {report['summary']} ({where})"
            )
        self.stdout.write(self.style.SUCCESS(f"Test of {target.name} passed."))

    def on_worker(self, target: Target, timeout: float) -> dict | None:
        from huey.exceptions import HueyException, TaskException

        from targets.tasks import target_test_task

        handle = target_test_task(target.pk)
        try:
            return handle.get(blocking=True, timeout=timeout, revoke_on_timeout=True)
        except TaskException as exc:
            raise CommandError(f"The test failed on the worker: {exc}") from None
        except HueyException:
            raise CommandError(
                f"No worker ran the test within {timeout:.0f} s: is manage.py "
                "run_huey running (and using the same queue)?"
            ) from None
