"""`manage.py job_status <id> [--json]`: one job's state for scripts, as an exit code.

Exit codes: 0 done (with or without warnings), 1 failed or cancelled, 2 not finished
(queued, sending, waiting to retry, paused), 3 no such job or a usage error.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from dispatch.jobs.models import SUCCESS_STATES, Job, State
from dispatch.jobs.status import job_report

DONE, FAILED, RUNNING, UNKNOWN = 0, 1, 2, 3


class Command(BaseCommand):
    help = (
        "Print a job's state, counts, attempts and last error. Exit code: 0 done, "
        "1 failed or cancelled, 2 not finished yet, 3 no such job."
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)

        # argparse exits with 2 on a usage error, which here means "running".
        def error(message: str):
            raise CommandError(
                f"{message} (usage: job_status <id> [--json])", returncode=UNKNOWN
            )

        parser.error = error
        return parser

    def add_arguments(self, parser):
        parser.add_argument("job", help="the job id (send_series prints it)")
        parser.add_argument(
            "--json", action="store_true", dest="as_json", help="print JSON"
        )

    def handle(self, *args, job: str, as_json: bool, **options):
        found = (
            Job.objects.select_related("target").filter(pk=int(job)).first()
            if job.isdigit()
            else None
        )
        if found is None:
            raise CommandError(f"no job {job}", returncode=UNKNOWN)
        report = job_report(found)
        if as_json:
            self.stdout.write(json.dumps(report))
        else:
            self.print_report(found, report)
        code = self.exit_code(found)
        if code:
            # Not a failure of the command: the job's state, as the exit code.
            self.stdout.flush()
            raise SystemExit(code)

    def exit_code(self, job: Job) -> int:
        if job.state in SUCCESS_STATES:
            return DONE
        if job.state in (State.FAILED, State.CANCELLED):
            return FAILED
        return RUNNING

    def print_report(self, job: Job, report: dict) -> None:
        self.stdout.write(f"job {job.pk}: {job.files_label} → {job.target.name}")
        self.stdout.write(f"state: {job.get_state_display()}")
        counts = (
            f"{report['sent']} sent, {report['present']} already present, "
            f"{report['warnings']} warnings, {report['failed']} failed of "
            f"{report['instances']} instances"
        )
        if job.state not in (State.DONE, State.DONE_WITH_WARNINGS, State.FAILED):
            counts += (
                f" ({report['done']} of {job.total + job.other_files} files so far)"
            )
        self.stdout.write(counts)
        if job.committed_label:
            self.stdout.write(f"storage commitment: {job.committed_label}")
        if job.other_files or job.skipped:
            self.stdout.write(
                f"other files: {job.other_sent} of {job.other_files} delivered, "
                f"{job.skipped} left out"
            )
        self.stdout.write(f"attempts: {job.attempt_count}")
        for attempt in report["attempts"]:
            line = f"  {attempt['number']}: {attempt['outcome'] or 'running'} on {attempt['worker']}"
            if attempt["error"]:
                line += f": {attempt['error']}"
            self.stdout.write(line)
        if job.last_error:
            self.stdout.write(f"last error: {job.last_error}")
