"""Log lines from network data cannot be forged; database text has no NUL."""

from __future__ import annotations

import logging
import shlex

from config.safetext import SafeFormatter, db_text, log_fields


def test_a_value_cannot_add_a_field_or_a_line():
    line = log_fields(calling_aet="CT 1 event=admin", uid="1.2\nlevel=INFO x=y", n=3)

    assert "\n" not in line
    assert dict(p.split("=", 1) for p in shlex.split(line)) == {
        "calling_aet": "CT 1 event=admin",
        "uid": "1.2\\nlevel=INFO x=y",
        "n": "3",
    }
    assert (
        log_fields(uid="1.2.840.10008.1.1", empty="")
        == 'uid=1.2.840.10008.1.1 empty=""'
    )


def test_the_console_formatter_keeps_any_logger_to_one_line_per_record():
    # pynetdicom logs values as it got them, e.g. an invalid AE title.
    formatter = SafeFormatter("level=%(levelname)s logger=%(name)s %(message)s")
    record = logging.LogRecord(
        "pynetdicom.utils", logging.ERROR, __file__, 1,
        "Invalid 'Calling AE Title' value '%s'", ("AB\nlevel=INFO event=forged\x1b[2J",),
        None,
    )  # fmt: skip
    try:
        raise ValueError("bad\nlevel=INFO event=forged")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()

    text = formatter.format(record)

    first, *rest = text.split("\n")
    assert first.startswith("level=ERROR logger=pynetdicom.utils Invalid")
    assert "\\nlevel=INFO event=forged\\x1b[2J" in first
    assert rest and all(line.startswith("    ") for line in rest)
    # The exception's own text goes on indented lines: never a record of its own.
    assert "    ValueError: bad" in rest and "    level=INFO event=forged" in rest


def test_database_text_has_no_nul_and_no_control_characters():
    assert db_text("1.2.3\x00.4") == "1.2.3.4"
    assert db_text("Lung\x07 B70f\r\n\t") == "Lung\ufffd B70f\r\n\t"
    assert db_text(None) == "" and db_text("x" * 100, 64) == "x" * 64
