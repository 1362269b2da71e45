"""Covariates become user splits: the v3 preset's membership and the automatic rule."""

import pandas as pd
import pytest
from builders import V3_SPLITS, survey_row

from prism_assets.dataset.loading import survey_table
from prism_assets.statistics.splits import PRESETS, safe_split_name, splits_from_fit, v2_splits, v3_splits


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


def _term(variable, level, beta, p):
    return {
        "term": variable if level is None else f"{variable}[{level}]",
        "variable": variable,
        "level": level,
        "kind": "continuous" if level is None else "categorical",
        "beta": beta,
        "p": p,
    }


V2_NAMES = ["S1_age", "S2_personalisation", "S3_safety", "S4_familiarity", "S5_behavioral", "S6_region"]
FAMILIARITY = {
    "young": "Very familiar",
    "mid": "Somewhat familiar",
    "old": "Not familiar at all",
    "older": "Very familiar",
    "shy": "Somewhat familiar",
}


def _pairs(gaps_by_user):
    return pd.DataFrame(
        [(user, gap) for user, gaps in gaps_by_user.items() for gap in gaps], columns=["user_id", "score_gap"]
    )


def test_v2_preset_shares_v3_membership_and_falls_back_to_v3_directions_without_a_fit(survey):
    survey = survey.assign(lm_familiarity=survey["user_id"].map(FAMILIARITY))
    analysed = {"young", "mid", "old", "older"}
    pairs = _pairs({user: [10] for user in analysed})
    empty = pd.DataFrame(columns=["term", "variable", "level", "kind", "beta", "p"])
    v2 = {m.split.name: m for m in v2_splits(empty, survey, analysed, pairs, {})}
    v3 = {m.split.name: m for m in v3_splits(empty, survey, analysed)}
    assert "v2" in PRESETS and list(v2) == V2_NAMES
    for v2_name, v3_name in [
        ("S1_age", "S1_age"),
        ("S2_personalisation", "S3_personalisation"),
        ("S3_safety", "S4_safety"),
        ("S6_region", "S8_region"),
    ]:
        assert _groups(v2[v2_name]) == _groups(v3[v3_name]), v2_name
        assert v2[v2_name].split.predicted == v3[v3_name].split.predicted, v2_name
    for name in ("S1_age", "S2_personalisation", "S3_safety"):
        assert "v3's direction" in v2[name].split.rule and v2[name].split.beta is None
    # lm_familiarity has no term: Very/Somewhat familiar vs Not familiar at all.
    assert _groups(v2["S4_familiarity"]) == {
        u: "B" if f == "Not familiar at all" else "A" for u, f in FAMILIARITY.items()
    }
    assert v2["S4_familiarity"].split.predicted == "A>B" and "fallback" in v2["S4_familiarity"].split.rule
    assert v2["S6_region"].split.null_control and not any(v2[n].split.null_control for n in V2_NAMES[:-1])


def test_v2_behavioral_split_is_at_the_median_of_the_analysed_users_mean_gaps(survey):
    # Mean gaps 14, 5, 50, 12 (the median of young's gaps is 1, of the means 13); shy has pairs but is not analysed.
    pairs = _pairs({"young": [1, 1, 40], "mid": [5], "old": [40, 50, 60], "older": [12], "shy": [99, 99]})
    analysed = {"young", "mid", "old", "older"}
    behavioral = v2_splits(pd.DataFrame(), survey, analysed, pairs, {})[4]
    assert _groups(behavioral) == {"young": "A", "old": "A", "mid": "B", "older": "B"}
    assert behavioral.split.group_a == "mean_score_gap > 13"
    assert behavioral.split.predicted == "A>B" and "circular" in behavioral.split.rule


def test_v2_directions_and_familiarity_levels_come_from_the_fit(survey):
    survey = survey.assign(lm_familiarity=survey["user_id"].map(FAMILIARITY))
    coefficients = pd.DataFrame(
        [
            # age: A = 18-34 has 18-24 (0.2) and the reference 25-34 (0) → 0.1; B = 35+ has only 35-44 (0.3) and
            # 65+ (0.0) in the fit → 0.15, so A<B. Counting 45-64 as 0 (0.075) or leaving out the reference (0.2)
            # would give A>B.
            _term("age", "18-24 years old", 0.2, 0.3),
            _term("age", "35-44 years old", 0.3, 0.04),
            _term("age", "65+ years old", 0.0, 0.9),
            # familiarity: the smallest p is "Not familiar at all" with β < 0; "Very familiar" has the other sign.
            _term("lm_familiarity", "Not familiar at all", -0.4, 0.01),
            _term("lm_familiarity", "Very familiar", 0.1, 0.5),
            _term("stated_prefs_personalisation", None, -0.01, 0.2),
        ]
    )
    fitted_levels = {
        "age": ["25-34 years old", "18-24 years old", "35-44 years old", "65+ years old"],
        "lm_familiarity": ["Somewhat familiar", "Not familiar at all", "Very familiar"],
    }
    splits = {
        m.split.name: m for m in v2_splits(coefficients, survey, set(survey["user_id"]), _pairs({}), fitted_levels)
    }
    assert splits["S1_age"].split.predicted == "A<B" and "from the fit" in splits["S1_age"].split.rule
    personalisation = splits["S2_personalisation"].split
    assert (personalisation.predicted, personalisation.beta, personalisation.p) == ("A<B", -0.01, 0.2)
    # No safety term: v3's direction.
    assert splits["S3_safety"].split.predicted == "A<B" and "v3's direction" in splits["S3_safety"].split.rule
    familiarity = splits["S4_familiarity"]
    assert _groups(familiarity) == {u: "A" if f == "Not familiar at all" else "B" for u, f in FAMILIARITY.items()}
    assert (familiarity.split.group_a, familiarity.split.group_b) == (
        "Not familiar at all",
        "Somewhat familiar | Very familiar",
    )
    assert (familiarity.split.predicted, familiarity.split.beta, familiarity.split.p) == ("A<B", -0.4, 0.01)


def test_v2_familiarity_groups_every_level_with_the_smallest_p_levels_sign(survey):
    survey = survey.assign(lm_familiarity=survey["user_id"].map(FAMILIARITY))
    coefficients = pd.DataFrame(
        [
            _term("lm_familiarity", "Somewhat familiar", 0.2, 0.3),
            _term("lm_familiarity", "Very familiar", 0.5, 0.001),
        ]
    )
    fitted_levels = {"lm_familiarity": ["Not familiar at all", "Somewhat familiar", "Very familiar"]}
    familiarity = v2_splits(coefficients, survey, set(survey["user_id"]), _pairs({}), fitted_levels)[3]
    assert _groups(familiarity) == {u: "B" if f == "Not familiar at all" else "A" for u, f in FAMILIARITY.items()}
    assert familiarity.split.predicted == "A>B" and familiarity.split.beta == 0.5
    assert "fallback" not in familiarity.split.rule
