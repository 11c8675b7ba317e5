"""Send a folder of DICOM files to a target now (or queue it with --queue)."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from dispatch.jobs import direct
from dispatch.jobs.models import (
    FINISHED_STATES,
    SUCCESS_STATES,
    DispatchError,
    Job,
    State,
)
from dispatch.jobs.status import files_done, waiting_note
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
    help = (
        "Send the series under a folder to a target (DICOM files; Folder, SFTP, rsync "
        "and S3 targets also get its other files); non-zero exit on failure."
    )
    # Scripts call this once per series: the system checks (the URL check imports
    # every admin page and view) are `runcourier`'s and `check`'s to run.
    requires_system_checks: list[str] = []

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
            help="copy the folder into the spool, queue a job for the workers and "
            "print its id (the folder may be deleted once this returns)",
        )
        parser.add_argument(
            "--wait",
            action="store_true",
            help="with --queue: follow the job until it is finished (same output "
            "and exit code as a direct send)",
        )

    def handle(
        self, *args, target, folder, calling_aet, called_aet, queue, wait, **options
    ):
        target_obj = find_target(target)
        path = Path(folder)
        if not path.exists():
            raise CommandError(f"folder {folder} does not exist")
        if not path.is_dir():
            raise CommandError(f"{folder} is not a folder")
        if wait and not queue:
            raise CommandError("--wait follows a queued job: use it with --queue")
        context = SendContext(calling_aet=calling_aet, called_aet=called_aet)
        if queue:
            try:
                report = direct.queue_series(target_obj, path, context=context)
            except DispatchError as exc:
                raise CommandError(str(exc)) from None
            self.warn_left_out(report.left_out, report.refused)
            job = report.job
            self.stdout.write(
                f"queued job {job.pk}: {job.files_label} to {target_obj.name} "
                f"(taken into the spool: {folder} may be deleted or reused now)"
            )
            if wait:
                self.stdout.flush()
                self.follow(job, report.seconds)
            return

        bar = None

        def on_start(job):
            nonlocal bar
            if self.stdout.isatty():
                from tqdm import tqdm

                total = job.total + job.other_files
                bar = tqdm(total=total, unit="file", file=sys.stdout)

        def on_wait(in_use: int, limit: int) -> None:
            self.stdout.write(
                f"waiting for a free connection to {target_obj.name} "
                f"({in_use} of {limit} in use)"
            )
            self.stdout.flush()

        failures: list[str] = []

        def progress(outcome):
            if outcome.status == FAILED:
                failures.append(f"{Path(outcome.path).name}: {outcome.message}")
            if bar is not None:
                bar.update(1)

        try:
            report = direct.send_series(
                target_obj,
                path,
                context=context,
                progress=progress,
                on_start=on_start,
                on_wait=on_wait,
            )
        except DispatchError as exc:
            raise CommandError(str(exc)) from None
        finally:
            if bar is not None:
                bar.close()
        self.warn_left_out(report.left_out, report.refused)
        for line in failures[:20]:
            self.stderr.write(f"failed: {line}")
        self.finish(report.job, report.seconds)

    def warn_left_out(
        self, left_out: list[tuple[Path, str]], refused: list[tuple[Path, str]]
    ) -> None:
        # A malformed DICOM file is named with its reason, each one: an instance
        # the target does not get, which fails the job.
        for path, reason in refused[:20]:
            self.stderr.write(f"failed: {path.name}: {reason}")
        if not left_out:
            return
        reasons = Counter(reason.split(" (")[0] for _, reason in left_out)
        why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        names = ", ".join(p.name for p, _ in left_out[:3])
        more = ", …" if len(left_out) > 3 else ""
        self.stderr.write(
            self.style.WARNING(
                f"left out {len(left_out)} "
                f"file{'s' if len(left_out) != 1 else ''}: {why} "
                f"(e.g. {names}{more})"
            )
        )

    def follow(self, job: Job, seconds: float) -> None:
        """Poll the queued job until it is finished, with a bar on a terminal."""
        bar = None
        if self.stdout.isatty():
            from tqdm import tqdm

            bar = tqdm(total=job.total + job.other_files, unit="file", file=sys.stdout)
        start = time.monotonic() - seconds
        said = ""
        try:
            while True:
                job.refresh_from_db()
                if bar is not None:
                    bar.update(files_done(job) - bar.n)
                if job.state in FINISHED_STATES:
                    break
                note = waiting_note(job)
                if note and note != said:
                    (bar.write if bar is not None else self.stdout.write)(note)
                    said = note
                time.sleep(0.5)
        finally:
            if bar is not None:
                bar.close()
        self.finish(job, time.monotonic() - start)

    def finish(self, job: Job, seconds: float) -> None:
        """Print the summary; raise CommandError (exit 1) unless the job is done."""
        mb = job.bytes_sent / 1e6
        summary = (
            f"job {job.pk}: {job.sent} sent, {job.present} already present, "
            f"{job.warnings} warnings, {job.failed} failed of {job.total} instances"
        )
        if job.other_files:
            summary += f"; {job.other_sent} of {job.other_files} other files delivered"
        if job.skipped:
            summary += f"; {job.skipped} files left out"
        if job.committed_label:
            summary += f"; {job.committed_label}"
        summary += f"; {mb:.1f} MB in {seconds:.1f} s"
        if job.state in SUCCESS_STATES:
            self.stdout.write(self.style.SUCCESS(summary))
            if job.last_error:
                self.stdout.write(self.style.WARNING(job.last_error))
            return
        self.stdout.write(summary)
        if job.state == State.CANCELLED:
            raise CommandError(f"job {job.pk} was cancelled: {job.last_error}")
        raise CommandError(
            f"sending to {job.target.name} failed: {job.last_error or job.state}"
        )
