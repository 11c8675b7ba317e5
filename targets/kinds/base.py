"""The handler contract every target kind implements.

A handler wraps one target: `send(series)` delivers files and reports per instance,
`test()` checks the target for real and returns named checks (a `CheckReport`).
Querying is not a handler's: a queryable kind has a query source (`targets.query`).
Errors carry a hint in words, never a secret. This module imports no model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from targets.dicomnet.commitment import Reference, Report
    from targets.models import Target
    from targets.series import Instance, OtherFile, Series


class TargetError(Exception):
    """A send or check failed. `permanent` errors are not worth retrying as they are."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.message = message
        self.permanent = permanent

    def __str__(self) -> str:
        return self.message


# -- test results ---------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    message: str = ""
    duration_ms: float = 0.0
    # Informational checks (e.g. ICMP ping) are shown but never fail the test.
    informational: bool = False
    # Extra facts for the admin (e.g. a host key fingerprint to pin).
    details: dict = field(default_factory=dict)


@dataclass
class CheckReport:
    """The named checks of a Test, in the order they ran."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(
            c.ok for c in self.checks if not c.informational
        )

    @property
    def summary(self) -> str:
        failed = [c for c in self.checks if not c.ok and not c.informational]
        if not failed:
            return "All checks passed."
        first = failed[0]
        return f"{first.name} failed: {first.message}"

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    @contextmanager
    def check(self, name: str, *, informational: bool = False) -> Iterator[Check]:
        """Time a check; a `TargetError` inside it marks the check failed.

        Use it as `with report.check("TCP connect") as c: ...; c.message = "..."`.
        After a failed (non-informational) check, `report.stopped` is true and later
        checks that depend on it should not run.
        """
        check = Check(name=name, ok=True, informational=informational)
        start = time.perf_counter()
        try:
            yield check
        except TargetError as exc:
            check.ok = False
            check.message = exc.message
        finally:
            check.duration_ms = round((time.perf_counter() - start) * 1000, 1)
            self.checks.append(check)

    @property
    def stopped(self) -> bool:
        return any(not c.ok and not c.informational for c in self.checks)


# -- send results --------------------------------------------------------------------

SENT = "sent"
WARNING = "warning"
FAILED = "failed"
PRESENT = "present"  # already at the target (a retry found it there)


@dataclass
class Outcome:
    """What happened to one instance (one file) of a send."""

    path: str
    status: str  # SENT | WARNING | FAILED | PRESENT
    message: str = ""
    bytes: int = 0
    sop_instance_uid: str = ""


@dataclass
class SendResult:
    outcomes: list[Outcome] = field(default_factory=list)
    # Things worth telling about the send as a whole (e.g. a stalled association
    # that was aborted and resumed on a new one).
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def sent(self) -> int:
        return self.count(SENT) + self.count(WARNING)

    @property
    def warnings(self) -> int:
        return self.count(WARNING)

    @property
    def failed(self) -> int:
        return self.count(FAILED)

    @property
    def present(self) -> int:
        return self.count(PRESENT)

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.outcomes if o.status in (SENT, WARNING))


ProgressCallback = Callable[["Outcome"], None]
Report = Callable[["Outcome"], None]
# Every file a target delivers, as (file, name) by destination folder.
FileGroups = dict[str, list[tuple["Instance | OtherFile", str]]]

# The empty file written into a series folder once all its files are there
# (Folder and SFTP, when the target asks for it).
COMPLETE_MARKER = ".complete"


@dataclass
class SendContext:
    """Values from how the series arrived, for the pass-incoming switches."""

    calling_aet: str = ""
    called_aet: str = ""


class Handler:
    """Base class of the per-kind handlers."""

    def __init__(self, target: Target):
        self.target = target

    def send(
        self,
        series: Series,
        *,
        progress: ProgressCallback | None = None,
        context: SendContext | None = None,
        connections: int | None = None,
    ) -> SendResult:
        """Deliver `series.instances` to the target.

        Call `progress(outcome)` for each instance as soon as its fate is known and
        return all outcomes. Raise `TargetError` when the target cannot be used (or
        stops being usable part-way): the outcomes already reported through
        `progress` stand, so a retry needs to send only the rest. Open at most
        `connections` connections at once (a job's share of the target's limit;
        None: the target's own limit).
        """
        raise NotImplementedError

    def test(self) -> CheckReport:
        """Check the target for real; never raise for a target-side problem."""
        raise NotImplementedError

    def request_commitment(
        self,
        transaction_uid: str,
        references: Sequence[Reference],
        *,
        wait: float,
        poll: Callable[[], Report | None],
        context: SendContext | None = None,
    ) -> Report:
        """Ask the target to commit `references` (Storage Commitment) and wait.

        Return the target's report (what it committed, what not and why), whether
        it came back on the request's own connection or `poll()` found it (it came
        another way); raise `TargetError` when it cannot be asked or no report
        comes within `wait` seconds. Only kinds whose proxy `can_commit` have it.
        """
        raise TargetError(
            f"{self.target.get_kind_display()} targets cannot commit", permanent=True
        )

    # -- helpers for send() -----------------------------------------------------------
    def start(self, progress: ProgressCallback | None) -> tuple[SendResult, Report]:
        """A result to fill, and `report(outcome)`, which adds an outcome to it and
        tells `progress`; safe to call from several threads."""
        result = SendResult()
        lock = threading.Lock()

        def report(outcome: Outcome) -> None:
            with lock:
                result.outcomes.append(outcome)
                if progress:
                    progress(outcome)

        return result, report

    def start_grouped(
        self, series: Series, progress: ProgressCallback | None
    ) -> tuple[SendResult, Report, FileGroups]:
        """`start()`, and every file the target delivers by destination folder
        (`files_by_folder`: a file that cannot be placed is reported FAILED)."""
        result, report = self.start(progress)
        return result, report, files_by_folder(series, self.target, report)

    def connection_count(self, connections: int | None, work: int) -> int:
        """How many connections to open for `work` items: `connections` (or the
        target's parallel connections), at least one, never more than the work."""
        limit = self.target.max_connections if connections is None else connections
        return max(1, min(limit or 1, work))


def instance_outcome(
    instance: Instance | OtherFile, status: str, message: str = ""
) -> Outcome:
    return Outcome(
        path=str(instance.path),
        status=status,
        message=message,
        bytes=instance.size if status in (SENT, WARNING) else 0,
        sop_instance_uid=instance.sop_instance_uid,
    )


def group_by_layout(
    series: Series, target: Target, report: Callable[[Outcome], None]
) -> dict[str, list[Instance]]:
    """Group the instances the target's exclusion globs keep by their folder.

    The folder is the target's layout rendered from the instance's tags ("" for the
    target's root), in order of first appearance; an instance whose layout cannot be
    rendered is reported FAILED through `report` and left out.
    """
    # Imported here so that importing the handler contract stays light.
    from targets.series import DEFAULT_LAYOUT, LayoutError, render_layout
    from targets.validators import split_globs

    layout = target.layout or DEFAULT_LAYOUT
    groups: dict[str, list[Instance]] = {}
    for inst in series.excluding(split_globs(target.exclude)).instances:
        try:
            rel = render_layout(layout, inst.tags)
        except LayoutError as exc:
            report(instance_outcome(inst, FAILED, str(exc)))
            continue
        groups.setdefault(rel, []).append(inst)
    return groups


def files_by_folder(
    series: Series, target: Target, report: Callable[[Outcome], None]
) -> FileGroups:
    """Every file the target delivers, as (file, name) by destination folder.

    The instances as `group_by_layout` places them, each named after its SOP
    Instance UID; then the series' other files (reports, previews, results) minus
    the target's exclusion filter, each in the folder of the DICOM files beside it
    (or in a folder above it, else the series' first folder) under its own path
    from there. An other file whose name an earlier file already has, or that has
    no folder to go to, is reported FAILED.
    """
    from targets.paths import UnsafePath, remote_inside
    from targets.series import instance_file_name
    from targets.validators import split_globs

    groups = group_by_layout(series, target, report)
    files: dict[str, list[tuple[Instance | OtherFile, str]]] = {
        rel: [(inst, instance_file_name(inst)) for inst in instances]
        for rel, instances in groups.items()
    }
    beside: dict[Path, str] = {}
    for rel, instances in groups.items():
        for inst in instances:
            beside.setdefault(inst.path.parent, rel)
    first = next(iter(groups), None)
    for other in series.excluding(split_globs(target.exclude)).others:
        folder, name = _place(other.path, series, beside, first)
        if folder is None:
            report(
                instance_outcome(
                    other,
                    FAILED,
                    "no DICOM instance of the series to place it beside (the "
                    "destination folder comes from the instances' tags)",
                )
            )
            continue
        try:
            remote_inside("", name)  # a clean relative path: no "..", no "//"
        except UnsafePath as exc:
            report(instance_outcome(other, FAILED, str(exc)))
            continue
        taken = {n for _, n in files.get(folder, [])}
        if name in taken:
            report(
                instance_outcome(
                    other, FAILED, f"another file of the series is named {name}"
                )
            )
            continue
        files.setdefault(folder, []).append((other, name))
    return files


def _place(
    path: Path, series: Series, beside: dict[Path, str], first: str | None
) -> tuple[str | None, str]:
    folder = path.parent
    while folder in beside or (
        folder != series.root and folder.is_relative_to(series.root)
    ):
        if folder in beside:
            return beside[folder], path.relative_to(folder).as_posix()
        folder = folder.parent
    return first, series.relative(path)
