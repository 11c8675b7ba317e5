"""huey tasks of targets: thin, they take a primary key and call a service."""

from __future__ import annotations

from huey.contrib.djhuey import db_task

from . import services


@db_task()
def target_test_task(target_id: int) -> dict | None:
    """Run a target's Test on the worker that picks this up (`test_target --on-worker`)."""
    return services.run_test_report(target_id)
