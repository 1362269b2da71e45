"""Covariates become user splits: the v3 preset's membership and the automatic rule."""

import pandas as pd
import pytest
from builders import V3_SPLITS, survey_row

from prism_assets.dataset.loading import survey_table
from prism_assets.statistics.splits import safe_split_name, splits_from_fit, v3_splits


def _survey(rows):
    return survey_table(rows)


@pytest.fixture
def survey():
    return _survey(
        [
            survey_row(
                "young",
                age="18-24 years old",
                education="Graduate / Professional degree",
                stated_prefs={"safety": 90, "personalisation": 10},
                location={"special_region": "UK"},
            ),
            survey_row(
                "mid",
                age="25-34 years old",
                education="Vocational",
                stated_prefs={"safety": 50, "personalisation": 50},
                location={"special_region": "US"},
            ),
            survey_row(
                "old",
                age="35-44 years old",
                education="University Bachelors Degree",
                stated_prefs={"safety": 50, "personalisation": 80},
                location={"special_region": "Latin America and the Caribbean"},
            ),
            survey_row(
                "older",
                age="65+ years old",
                education="Prefer not to say",
                stated_prefs={"safety": 10, "personalisation": 90},
                location={"special_region": "Europe"},
            ),
            survey_row(
                "shy",
                age="Prefer not to say",
                education="Some Primary",
                stated_prefs={"safety": 70, "personalisation": 20},
                location={"special_region": "Asia"},
            ),
        ]
    )


def _groups(membership):
    return dict(zip(membership.users["user_id"], membership.users["group"]))


def test_v3_preset_reproduces_the_eight_splits_and_their_membership(survey):
    everyone = set(survey["user_id"])
    splits = {m.split.name: m for m in v3_splits(pd.DataFrame(columns=["term", "beta", "p"]), survey, everyone)}
    assert list(splits) == V3_SPLITS
    assert [splits[n].split.predicted for n in splits] == ["A>B", "A>B", "A>B", "A<B", "A<B", "A<B", "A>B", "A≈B"]
    assert _groups(splits["S1_age"]) == {"young": "A", "mid": "A", "old": "B", "older": "B"}
    assert _groups(splits["S2_education"]) == {"young": "A", "mid": "B", "old": "A", "shy": "B"}
    # safety values 90, 50, 50, 10, 70: median 50; "> 50" gives 2 vs 3, "≥ 50" 4 vs 1 → strict.
    assert _groups(splits["S4_safety"]) == {"young": "A", "mid": "B", "old": "B", "older": "B", "shy": "A"}
    assert _groups(splits["S8_region"]) == {"young": "A", "mid": "B", "old": "B", "older": "A"}
    assert splits["S8_region"].split.null_control


def test_median_split_only_counts_analysed_users(survey):
    splits = {
        m.split.name: m for m in v3_splits(pd.DataFrame(columns=["term"]), survey, {"young", "mid", "old", "older"})
    }
    # personalisation of analysed users: 10, 50, 80, 90 → median 65.
    assert _groups(splits["S3_personalisation"]) == {"young": "B", "mid": "B", "old": "A", "older": "A"}
    assert splits["S3_personalisation"].split.group_a == "stated_prefs_personalisation > 65"


def test_median_split_uses_at_least_median_when_the_median_is_crowded():
    survey = _survey(
        [survey_row(f"u{i}", stated_prefs={"helpfulness": v}) for i, v in enumerate([100, 100, 100, 90, 40])]
    )
    splits = {m.split.name: m for m in v3_splits(pd.DataFrame(columns=["term"]), survey, set(survey["user_id"]))}
    assert _groups(splits["S6_helpfulness"]) == {"u0": "A", "u1": "A", "u2": "A", "u3": "B", "u4": "B"}


def test_automatic_rule_groups_significant_levels_and_median_splits_continuous(survey):
    coefficients = pd.DataFrame(
        [
            {
                "term": "age[35-44 years old]",
                "variable": "age",
                "level": "35-44 years old",
                "kind": "categorical",
                "beta": -0.5,
                "p": 1e-6,
            },
            {
                "term": "age[65+ years old]",
                "variable": "age",
                "level": "65+ years old",
                "kind": "categorical",
                "beta": -0.3,
                "p": 0.01,
            },
            {
                "term": "age[18-24 years old]",
                "variable": "age",
                "level": "18-24 years old",
                "kind": "categorical",
                "beta": 0.1,
                "p": 0.4,
            },
            {
                "term": "gender[Male]",
                "variable": "gender",
                "level": "Male",
                "kind": "categorical",
                "beta": 0.1,
                "p": 0.5,
            },
            {
                "term": "stated_prefs_safety",
                "variable": "stated_prefs_safety",
                "level": None,
                "kind": "continuous",
                "beta": 0.01,
                "p": 0.001,
            },
        ]
    )
    fitted = {
        "age": ["25-34 years old", "35-44 years old", "65+ years old", "18-24 years old"],
        "gender": ["Female", "Male"],
    }
    splits = splits_from_fit(coefficients, survey, set(survey["user_id"]), fitted, alpha=0.05)
    assert [m.split.name for m in splits] == ["S1_age", "S2_stated_prefs_safety", "S3_region"]
    age = splits[0]
    assert age.split.predicted == "A<B"
    assert _groups(age) == {"old": "A", "older": "A", "young": "B", "mid": "B"}
    assert splits[1].split.predicted == "A>B"
    assert splits[2].split.null_control


def test_split_names_are_partition_safe():
    assert safe_split_name("S1_location_special_region") == "S1_location_special_region"
    assert safe_split_name("S2 educ;rm -rf") == "S2_educ_rm_-rf"
    with pytest.raises(ValueError, match="cannot make a partition-safe split name"):
        safe_split_name(";;;")
