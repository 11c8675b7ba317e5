"""Storage Commitment for DICOM targets: the request after a send, and its Test check.

The handler opens the association (plain or TLS); this asks on it and waits
(`targets.dicomnet.commit_scu`), turning protocol errors into `TargetError`s in words.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from targets.dicomnet import commit_scu
from targets.dicomnet.commitment import (
    STORAGE_COMMITMENT,
    SYNTAXES,
    Reference,
    Report,
)
from targets.dicomnet.scu import Association, LinkError
from targets.kinds.base import CheckReport, TargetError

# The one presentation context a commitment request proposes (and Test adds).
CONTEXT = (STORAGE_COMMITMENT, list(SYNTAXES))


def request(
    assoc: Association,
    transaction_uid: str,
    references: Sequence[Reference],
    wait: float,
    poll: Callable[[], Report | None],
    calling: str,
    called: str,
) -> Report:
    """Ask on `assoc` and wait up to `wait` s for the report (on `assoc`, or from
    `poll()`); release or abort `assoc` after; `TargetError` in words."""
    try:
        report = commit_scu.request(
            assoc, transaction_uid, references, wait=wait, poll=poll
        )
    except LinkError as exc:
        assoc.abort()
        raise TargetError(exc.message, permanent=exc.permanent) from exc
    except BaseException:
        assoc.abort()
        raise
    assoc.release()
    if report is None:
        raise TargetError(
            f"no storage commitment report from {called} within {wait:g} s "
            f"(transaction {transaction_uid}); check that the target knows "
            f"Courier's AE title {calling} with the receiver's host and port"
        )
    return report


def check(result: CheckReport, assoc: Association, wanted: bool) -> None:
    """Test's "Storage Commitment" check: whether the target accepted the SOP class.

    A failure only when the target is to commit what it gets (`wanted`);
    informational otherwise.
    """
    with result.check("Storage Commitment", informational=not wanted) as c:
        if assoc.contexts_for(STORAGE_COMMITMENT):
            c.message = "the target accepts the Storage Commitment Push Model"
            if not wanted:
                c.message += " ('Request storage commitment' is off)"
        elif wanted:
            raise TargetError(
                "the target does not accept the Storage Commitment Push Model SOP "
                "class: enable storage commitment on it, or turn off 'Request "
                "storage commitment'"
            )
        else:
            c.ok = False
            c.message = (
                "the target does not accept the Storage Commitment Push Model "
                "(informational: 'Request storage commitment' is off)"
            )
