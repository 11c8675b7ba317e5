"""Print the dispatch summary (queued, sending, failed in the last 24 h) for scripts."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand

from dispatch.jobs.status import status_summary


class Command(BaseCommand):
    help = "Print how many jobs are queued, sending, waiting and failed (24 h)."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print JSON")

    def handle(self, *args, **options):
        summary = status_summary()
        if options["json"]:
            self.stdout.write(json.dumps(summary))
            return
        for key, value in summary.items():
            self.stdout.write(f"{key}={'' if value is None else value}")
