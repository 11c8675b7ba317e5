"""Matching a series against routing rules: pure functions over plain values.

`condition_matches`, `rule_matches` and `matching_rules` take text and `RuleSpec`s,
not rows, so the admin's preview, the tests and the router agree by construction.
Regular expressions run on RE2, in time linear in the value whatever the pattern.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from config.safetext import log_fields

log = logging.getLogger("courier.routing")

# Fact names of the AE titles a series arrived with, beside its tags' keywords.
CALLING_AET = "@calling_aet"
CALLED_AET = "@called_aet"


@lru_cache(maxsize=512)
def _wildcard(pattern: str) -> re.Pattern:
    return re.compile(fnmatch.translate(pattern), re.DOTALL)


class RegexError(ValueError):
    """A rule's regular expression that the linear-time matcher cannot take."""


def compile_regex(pattern: str):
    """Compile a rule's regular expression with RE2 (google-re2).

    RE2 matches in time linear in the value, whatever the pattern: no rule can
    hang the router or the preview (Python's `re` takes exponential time on a
    pattern like `(a+)+$`). What only backtracking can do (backreferences,
    look-around) is refused with `RegexError`, shown as a form error.
    """
    # Imported with the first pattern: the models import this module, and every
    # management command (a script's send_series) would load RE2 for no rule.
    import re2

    options = re2.Options()
    options.log_errors = False
    options.max_mem = 4 << 20  # per pattern; a rule's pattern is at most 200 chars
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        words = exc.args[0] if exc.args else exc
        if isinstance(words, bytes):
            words = words.decode("utf-8", "replace")
        raise RegexError(str(words)) from None


@lru_cache(maxsize=512)
def _regex(pattern: str):
    return compile_regex(pattern)


def value_matches(operator: str, pattern: str, value: str) -> bool:
    """Match one text value: `exact`, `wildcard` (* and ?) or `regex` (whole value)."""
    value = value.strip()
    if operator == "exact":
        return value == pattern.strip()
    if operator == "wildcard":
        return _wildcard(pattern.strip()).match(value) is not None
    if operator == "regex":
        try:
            return _regex(pattern).fullmatch(value) is not None
        except RegexError as exc:  # refused by the form; never raise while routing
            log.warning(
                "event=rule_pattern_unusable %s",
                log_fields(pattern=pattern, error=exc),
            )
            return False
    raise ValueError(f"unknown operator {operator!r}")


def condition_matches(
    fact_name: str, operator: str, pattern: str, facts: Mapping[str, str]
) -> bool:
    """Match a condition against a series' facts.

    A multi-valued tag (values separated by a backslash, e.g. ImageType) matches if
    the whole text or any one of its values does. A missing tag is an empty value.
    """
    text = str(facts.get(fact_name, "") or "")
    if value_matches(operator, pattern, text):
        return True
    if "\\" in text:
        return any(value_matches(operator, pattern, v) for v in text.split("\\"))
    return False


@dataclass
class RuleSpec:
    """A rule as plain values: what matching needs and nothing else."""

    name: str
    match: str  # "all" | "any"
    conditions: Sequence[tuple[str, str, str]]  # (fact name, operator, value)
    target_ids: Sequence[int] = field(default_factory=list)
    pk: int | None = None


def rule_matches(rule: RuleSpec, facts: Mapping[str, str]) -> bool:
    """All (or any) conditions hold. A rule without conditions matches everything."""
    if not rule.conditions:
        return True
    results = (condition_matches(f, op, v, facts) for f, op, v in rule.conditions)
    return all(results) if rule.match == "all" else any(results)


def matching_rules(
    rules: Iterable[RuleSpec], facts: Mapping[str, str]
) -> list[RuleSpec]:
    return [rule for rule in rules if rule_matches(rule, facts)]


def targets_of(rules: Iterable[RuleSpec]) -> list[int]:
    """Target ids of the matched rules, each once, in rule order."""
    seen: dict[int, None] = {}
    for rule in rules:
        for tid in rule.target_ids:
            seen.setdefault(tid, None)
    return list(seen)
