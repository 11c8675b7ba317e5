"""Send a folder of DICOM files to a target now (or queue it with --queue)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from dispatch import services
from dispatch.models import State
from targets.kinds.base import FAILED, SendContext
from targets.models import Target


def find_target(name: str) -> Target:
    target = Target.objects.filter(name__iexact=name).first()
    if target is None:
        known = ", ".join(Target.objects.values_list("name", flat=True)[:20])
        raise CommandError(
            f"no target named {name!r}" + (f" (known: {known})" if known else "")
        )
    return target.as_kind()


class Command(BaseCommand):
    help = "Send every DICOM file under a folder to a target; non-zero exit on failure."

    def add_arguments(self, parser):
        parser.add_argument("target", help="target name (case-insensitive)")
        parser.add_argument("folder", help="folder with DICOM files (recursive)")
        parser.add_argument(
            "--calling-aet", default="", help="incoming Source AET to pass on"
        )
        parser.add_argument(
            "--called-aet", default="", help="incoming Target AET to pass on"
        )
        parser.add_argument(
            "--queue",
            action="store_true",
            help="queue a job for the worker and print its id instead of waiting",
        )

    def handle(self, *args, target, folder, calling_aet, called_aet, queue, **options):
        target_obj = find_target(target)
        path = Path(folder)
        if not path.exists():
            raise CommandError(f"folder {folder} does not exist")
        if not path.is_dir():
            raise CommandError(f"{folder} is not a folder")
        context = SendContext(calling_aet=calling_aet, called_aet=called_aet)
        if queue:
            try:
                job = services.queue_series(target_obj, path, context=context)
            except services.DispatchError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(
                f"queued job {job.pk}: {job.total} instances to {target_obj.name}"
            )
            return

        bar = None

        def on_start(job):
            nonlocal bar
            if self.stdout.isatty():
                from tqdm import tqdm

                bar = tqdm(total=job.total, unit="inst", file=sys.stdout)

        failures: list[str] = []

        def progress(outcome):
            if outcome.status == FAILED:
                failures.append(f"{Path(outcome.path).name}: {outcome.message}")
            if bar is not None:
                bar.update(1)

        try:
            report = services.send_series(
                target_obj, path, context=context, progress=progress, on_start=on_start
            )
        except services.DispatchError as exc:
            raise CommandError(str(exc)) from None
        finally:
            if bar is not None:
                bar.close()

        if report.skipped:
            reasons = Counter(reason.split(" (")[0] for _, reason in report.skipped)
            why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            names = ", ".join(p.name for p, _ in report.skipped[:3])
            more = ", …" if len(report.skipped) > 3 else ""
            self.stderr.write(
                self.style.WARNING(
                    f"skipped {len(report.skipped)} "
                    f"file{'s' if len(report.skipped) != 1 else ''}: {why} "
                    f"(e.g. {names}{more})"
                )
            )
        job = report.job
        for line in failures[:20]:
            self.stderr.write(f"failed: {line}")
        mb = job.bytes_sent / 1e6
        summary = (
            f"job {job.pk}: {job.sent} sent, {job.present} already present, "
            f"{job.warnings} warnings, {job.failed} failed of {job.total} instances; "
            f"{mb:.1f} MB in {report.seconds:.1f} s"
        )
        if job.state in (State.DONE, State.DONE_WITH_WARNINGS):
            self.stdout.write(self.style.SUCCESS(summary))
            if job.last_error:
                self.stdout.write(self.style.WARNING(job.last_error))
            return
        self.stdout.write(summary)
        raise CommandError(
            f"sending to {target_obj.name} failed: {job.last_error or job.state}"
        )
