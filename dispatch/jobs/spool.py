"""The spool: folders Courier owns, taken in durably and deleted when done.

`take_into_spool` makes the queued copy of a folder a script hands over
(`send_series --queue`); `cleanup_spool` deletes a job's folder once every job for
it is done; `expire_spool` deletes those of failed or cancelled jobs after the
retention period. Nothing outside `COURIER_SPOOL_DIR` is ever deleted, whatever a
row says.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db.models import Min
from django.utils import timezone

from config.safetext import log_fields
from targets.paths import private_dir

from .models import FINISHED_STATES, SUCCESS_STATES, DispatchError, Job

log = logging.getLogger("courier.dispatch")


def inside_spool(folder: Path) -> bool:
    spool = Path(settings.COURIER_SPOOL_DIR).resolve()
    return folder.resolve().is_relative_to(spool) and folder.resolve() != spool


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        # Another file system (EXDEV), or protected_hardlinks for a file Courier's
        # user does not own (EPERM): copy the bytes instead.
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)


def take_into_spool(folder: str | Path) -> Path:
    """Put the files under `folder` into a new spool folder Courier owns; return it.

    Hard links where the spool is on the same file system (no bytes copied; a file
    later deleted, moved or replaced by the caller stays as it was here), copies
    elsewhere. Every file and folder is fsynced and the folder renamed into place
    only when whole, so the caller may delete or reuse its folder once this
    returns. Raise `DispatchError` (nothing left behind) if it cannot be done.
    """
    folder = Path(folder).resolve()
    queued = Path(settings.COURIER_SPOOL_DIR) / "queued"
    name = f"{timezone.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:12]}"
    tmp = queued / f".{name}.part"
    made: list[Path] = []
    try:
        private_dir(queued)  # the spool: Courier's alone
        tmp.mkdir(mode=0o700)
        folders = [tmp]
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            here = tmp / Path(dirpath).relative_to(folder)
            if here != tmp:
                here.mkdir()
                folders.append(here)
            for file_name in sorted(filenames):
                src = Path(dirpath) / file_name
                if not src.is_file():
                    continue  # sockets, pipes, dangling links: not files to send
                _link_or_copy(src, here / file_name)
                made.append(here / file_name)
        # Concurrent fsyncs share the file system's journal commits.
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(_fsync, made))
        for path in reversed(folders):
            _fsync(path)
        final = queued / name
        os.rename(tmp, final)
        _fsync(queued)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({exc.filename})" if exc.filename else ""
        raise DispatchError(
            f"cannot copy {folder} into the spool {queued}: "
            f"{exc.strerror or exc}{where}"
        ) from None
    return final


def cleanup_spool(folder: str) -> bool:
    """Delete a spool folder once every job for it is done; True if deleted."""
    jobs = Job.objects.filter(folder=folder, owned_spool=True)
    if jobs.exclude(state__in=SUCCESS_STATES).exists():
        return False
    path = Path(folder)
    if not path.exists() or not inside_spool(path):
        # Never delete outside the spool, whatever a row says.
        return False
    shutil.rmtree(path, ignore_errors=True)
    log.info("dispatch spool deleted %s", log_fields(folder=folder))
    return True


def expire_spool(now=None) -> int:
    """Delete spool folders of failed or cancelled jobs older than the retention."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=float(settings.COURIER_FAILED_RETENTION_DAYS))
    folders = (
        Job.objects.filter(owned_spool=True, state__in=FINISHED_STATES)
        .values("folder")
        .annotate(last=Min("finished_at"))
        .filter(last__lt=cutoff)
        .values_list("folder", flat=True)
    )
    deleted = 0
    for folder in folders:
        path = Path(folder)
        if not path.exists() or not inside_spool(path):
            continue
        jobs = Job.objects.filter(folder=folder)
        if jobs.exclude(state__in=FINISHED_STATES).exists():
            continue
        if jobs.filter(finished_at__gte=cutoff).exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("dispatch spool expired %s", log_fields(folder=folder))
        deleted += 1
    return deleted
