"""`manage.py test_target <name>`: run a target's checks and print them."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from targets.models import Target
from targets.services import run_test


class Command(BaseCommand):
    help = "Test a target for real (the same checks as the admin's Test button)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("name", help="Target name (case-insensitive).")

    def handle(self, *args, name: str, **options) -> None:
        target = Target.objects.filter(name__iexact=name).first()
        if target is None:
            known = ", ".join(Target.objects.values_list("name", flat=True)[:20])
            raise CommandError(
                f"No target named {name!r}."
                + (f" Known targets: {known}." if known else " No targets exist yet.")
            )
        result = run_test(target)
        for check in result.checks:
            if check.ok:
                status = self.style.SUCCESS("ok    ")
            elif check.informational:
                status = self.style.WARNING("info  ")
            else:
                status = self.style.ERROR("FAILED")
            message = f": {check.message}" if check.message else ""
            line = f"{status} {check.name}{message} ({check.duration_ms:.0f} ms)"
            self.stdout.write(line)
            for key, value in (check.details or {}).items():
                self.stdout.write(f"       {key}: {value}")
        if not result.ok:
            raise CommandError(f"Test of {target.name} failed: {result.summary}")
        self.stdout.write(self.style.SUCCESS(f"Test of {target.name} passed."))
