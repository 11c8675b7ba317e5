"""Rule matching: pure functions over a series' facts (tags and AE titles)."""

from __future__ import annotations

import pytest

from dispatch.routing.matching import (
    CALLED_AET,
    CALLING_AET,
    RuleSpec,
    condition_matches,
    matching_rules,
    rule_matches,
    targets_of,
)

FACTS = {
    "Modality": "CT",
    "StudyDescription": "CT THORAX W/O CONTRAST",
    "SeriesDescription": "Lung 1.0 B70f",
    "BodyPartExamined": "CHEST",
    "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
    CALLING_AET: "CT_SCANNER_1",
    CALLED_AET: "PACS",
}


@pytest.mark.parametrize(
    ("fact", "operator", "pattern", "expected"),
    [
        ("Modality", "exact", "CT", True),
        ("Modality", "exact", "ct", False),  # case-sensitive, as DICOM
        ("Modality", "exact", "MR", False),
        ("StudyDescription", "wildcard", "*THORAX*", True),
        ("StudyDescription", "wildcard", "THORAX*", False),
        ("SeriesDescription", "wildcard", "Lung ?.0*", True),
        ("SeriesDescription", "regex", r"Lung \d\.\d B\d+f", True),
        ("SeriesDescription", "regex", "Lung", False),  # must match the whole value
        ("SeriesDescription", "regex", "(?i)lung.*", True),
        ("ImageType", "exact", "AXIAL", True),  # any one of several values
        ("ImageType", "exact", "ORIGINAL\\PRIMARY\\AXIAL", True),
        ("ImageType", "wildcard", "LOCAL*", False),
        (CALLING_AET, "wildcard", "CT_*", True),
        (CALLED_AET, "exact", "PACS", True),
        ("InstitutionName", "exact", "", True),  # a missing tag is an empty value
        ("InstitutionName", "wildcard", "*", True),
        ("InstitutionName", "regex", ".+", False),
        ("Modality", "regex", "(unclosed", False),  # never raises while routing
    ],
)
def test_a_condition_matches_like_this(fact, operator, pattern, expected):
    assert condition_matches(fact, operator, pattern, FACTS) is expected


def test_all_needs_every_condition_and_any_needs_one():
    conditions = [("Modality", "exact", "CT"), ("BodyPartExamined", "exact", "HEAD")]
    assert not rule_matches(RuleSpec("r", "all", conditions), FACTS)
    assert rule_matches(RuleSpec("r", "any", conditions), FACTS)


def test_a_rule_without_conditions_matches_every_series():
    assert rule_matches(RuleSpec("everything", "all", []), FACTS)


def test_every_matching_rule_counts_and_targets_are_deduplicated_in_rule_order():
    rules = [
        RuleSpec("ct", "all", [("Modality", "exact", "CT")], [3, 1]),
        RuleSpec("mr", "all", [("Modality", "exact", "MR")], [2]),
        RuleSpec(
            "from scanner 1", "all", [(CALLING_AET, "exact", "CT_SCANNER_1")], [1, 4]
        ),  # fmt: skip
    ]
    matched = matching_rules(rules, FACTS)
    assert [r.name for r in matched] == ["ct", "from scanner 1"]
    assert targets_of(matched) == [3, 1, 4]


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)+b", "(.*a){20}"])
def test_a_catastrophic_expression_cannot_hang_the_router(pattern, in_child):
    # Python's backtracking `re` takes 2^40 steps on these values.
    facts = {"StudyDescription": "a" * 40 + "!"}
    matched = in_child(
        lambda: condition_matches("StudyDescription", "regex", pattern, facts)
    )
    assert matched is False


@pytest.mark.parametrize("pattern", [r"(a+)\1", r"CT(?=X)", r"(?<!M)R"])
def test_expressions_only_backtracking_can_match_are_a_form_error(pattern):
    from django.core.exceptions import ValidationError

    from dispatch.routing.models import RuleCondition

    condition = RuleCondition(
        field="tag", keyword="Modality", operator="regex", value=pattern
    )
    with pytest.raises(ValidationError, match="linear-time matcher"):
        condition.clean()
