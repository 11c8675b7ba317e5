"""Rows and folders the routing and receiving tests share: targets, received series
as the receiver leaves them, rules."""

from __future__ import annotations

from itertools import count
from pathlib import Path

from dispatch.routing.models import ReceivedSeries, Rule, RuleCondition
from dispatch.routing.services import tags_summary
from targets.models import FolderTarget, Target
from tests.dicomgen import make_series

_n = count(1)


def folder_target(path: Path, **kw) -> Target:
    path.mkdir(parents=True, exist_ok=True)
    return FolderTarget.objects.create(
        name=kw.pop("name", f"folder-{path.name}"), path=str(path), **kw
    )


def received(spool: Path, *, kind: str = "ct", instances: int = 3,
             calling: str = "CT_SCANNER", called: str = "COURIER",
             state: str = ReceivedSeries.State.COMPLETE, **row) -> ReceivedSeries:  # fmt: skip
    """A received series in the spool as the receiver leaves it."""
    folder = spool / "incoming" / f"series-{next(_n)}"
    series = make_series(folder, instances, kind=kind)
    return ReceivedSeries.objects.create(
        series_uid=series.series_uid, study_uid=series.study_uid, folder=str(folder),
        calling_aet=calling, called_aet=called, instance_count=instances, state=state,
        tags=tags_summary(series.files[0]), **row,
    )  # fmt: skip


def rule(name: str, targets: list[Target], *conditions, match: str = "all") -> Rule:
    r = Rule.objects.create(name=name, match=match)
    r.targets.set(targets)
    for field, keyword, operator, value in conditions:
        RuleCondition.objects.create(
            rule=r, field=field, keyword=keyword, operator=operator, value=value
        )
    return r


def modality_is(value: str):
    return ("tag", "Modality", "exact", value)
