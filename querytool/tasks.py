"""huey tasks of the query tool: thin, they take a primary key and call a service."""

from __future__ import annotations

from huey.contrib.djhuey import db_task

from . import services


@db_task()
def retrieve_task(job_id: int) -> None:
    services.run_retrieval(job_id)
