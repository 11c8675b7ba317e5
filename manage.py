#!/usr/bin/env python
"""Django's command-line utility for Courier."""

import gc
import os
import sys


def main() -> None:
    # No cyclic garbage collection while Django starts: what start-up makes lives
    # as long as the process. config/apps.py turns it back on (see there).
    gc.disable()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
