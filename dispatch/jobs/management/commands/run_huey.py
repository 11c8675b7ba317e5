"""`manage.py run_huey`: huey's consumer, with Courier's imports done before its threads.

Huey's own command starts the worker threads straight away; the first tasks then
import pydicom in several threads at once, which can break the process for good (see
`config/preload.py`). This command imports what the threads need first, then runs
huey's command unchanged (same options).
"""

from __future__ import annotations

from huey.contrib.djhuey.management.commands.run_huey import Command as HueyCommand

from config.preload import preload_for_threads


class Command(HueyCommand):
    help = "Run the queue consumer (Courier's worker)."

    def handle(self, *args, **options):
        preload_for_threads()
        super().handle(*args, **options)
