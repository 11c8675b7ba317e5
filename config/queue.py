"""The embedded queue: huey's SqliteHuey with the database's durability settings.

huey opens its SQLite file in WAL mode but leaves `synchronous` at SQLite's default
(FULL): every enqueue, dequeue and result write waits for the disk, under one lock
shared by the worker's threads, and on a busy disk that wait was most of a queued
job's time. With WAL, `synchronous=NORMAL` (what Courier's own SQLite database
uses) never corrupts the file; a power cut may lose the last messages, and a lost
message loses no work: the sweep queues every job that is due again.
"""

from __future__ import annotations

import sqlite3

from huey import SqliteHuey
from huey.storage import SqliteStorage


class QueueStorage(SqliteStorage):
    def _create_connection(self) -> sqlite3.Connection:
        conn = super()._create_connection()
        conn.execute("pragma synchronous=NORMAL")
        return conn


class CourierSqliteHuey(SqliteHuey):
    storage_class = QueueStorage
