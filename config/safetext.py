"""Text from the network made safe for log lines and database columns.

Values that come from DICOM or a peer (UIDs, AE titles, tags, error comments, paths
made from them) go into `key=value` lines through `log_fields()` or `log_value()`:
a value that is not a plain token is JSON-quoted, so a space, `=`, a quote, a newline
or a control character in it can neither start a new line nor fake another field.
`SafeFormatter` (the console formatter in config/settings.py) is the backstop for
every other logger, pynetdicom's and pydicom's included: control characters in a
message are escaped, and a traceback's lines are indented under their record.
`db_text()` makes such a value fit for any database column (PostgreSQL refuses a
NUL).
"""

from __future__ import annotations

import json
import logging
import re

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+,*?#%&~^-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_value(value: object) -> str:
    """`value` as one field of a key=value line: as it is if plain, else JSON-quoted."""
    text = "" if value is None else str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text)


def log_fields(**fields: object) -> str:
    """`key=value key=value ...` with every value through `log_value`."""
    return " ".join(f"{key}={log_value(value)}" for key, value in fields.items())


def escape_controls(text: str) -> str:
    """Escape control characters (newlines included) as `\\xNN` / `\\uNNNN`."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class SafeFormatter(logging.Formatter):
    """One record, one line: control characters in the message escaped, tracebacks
    indented (a log collector joins indented lines to the record before them)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join(
        "    " + escape_controls(line) for line in text.splitlines() if line
    )


_DB_CONTROLS = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")


def db_text(value: object, max_length: int | None = None) -> str:
    """Text from a DICOM file or a peer, fit for any database column.

    PostgreSQL refuses a NUL in text and `\\u0000` in JSON (the whole statement
    fails); NULs are dropped and other control characters (but tab, CR, LF)
    become U+FFFD, so the value stays visibly odd rather than silently changed.
    """
    text = _DB_CONTROLS.sub("\ufffd", str(value or "").replace("\x00", ""))
    return text if max_length is None else text[:max_length]
