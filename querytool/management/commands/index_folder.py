"""manage.py index_folder <target>: bring a local-folder source's index up to date."""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand, CommandError

from querytool import services
from targets.models import Target
from targets.query import SourceError


class Command(BaseCommand):
    help = "Scan a local-folder source (a DICOMweb target with a file:// URL) into its index."

    def add_arguments(self, parser):
        parser.add_argument("target", help="Target name (case-insensitive) or id.")
        parser.add_argument(
            "--no-progress",
            action="store_true",
            help="No progress bar (default when not on a terminal).",
        )

    def handle(self, *args, target: str, no_progress: bool, **options):
        found = Target.objects.filter(name__iexact=target).first()
        if found is None and target.isdigit():
            found = Target.objects.filter(pk=int(target)).first()
        if found is None:
            raise CommandError(f"No target named {target!r}.")
        if not services.keeps_index(found):
            raise CommandError(
                f"{found.name} is not a local folder (a DICOMweb target "
                "with a file:// URL)."
            )
        bar = None
        progress = None
        if not no_progress and sys.stderr.isatty():
            from tqdm import tqdm

            def progress(done: int, total: int) -> None:
                nonlocal bar
                if bar is None:
                    bar = tqdm(total=total, unit="file", desc="reading headers")
                bar.update(done - bar.n)

        try:
            report = services.reindex(found, None, progress)
        except SourceError as exc:
            raise CommandError(exc.message) from exc
        finally:
            if bar is not None:
                bar.close()
        self.stdout.write(
            self.style.SUCCESS(
                f"{found.name}: {report.seen} files, {report.added} added, "
                f"{report.updated} changed, {report.removed} removed, "
                f"{report.unchanged} unchanged, {report.not_dicom} not DICOM or unreadable in "
                f"{report.seconds:.1f} s."
            )
        )
        if report.problems:
            self.stdout.write(
                self.style.WARNING(f"{len(report.problems)} not DICOM or unreadable:")
            )
            for path, reason in report.problems:
                self.stdout.write(f"  {path}: {reason}")
