"""From ordered-logit covariates to two-group splits of users, each with a predicted direction.

Owns the rule (README, "How a covariate becomes a split"): median splits of significant continuous
covariates, significant levels against the rest for categorical ones, the predicted direction from the sign
of β, the region null control, and the `v3` preset of the original experiment's eight splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from prism_assets.dataset import schema

SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
GROUPS = ("A", "B")
NULL_REGION_A = ("UK", "Europe")
NULL_REGION_B = ("US", "Northern America", "Latin America and the Caribbean")
REGION_COLUMN = "location_special_region"
PRESETS = ("auto", "v3")


@dataclass
class Split:
    name: str
    variable: str
    rule: str
    group_a: str
    group_b: str
    predicted: str  # "A>B", "A<B" or "A≈B"
    null_control: bool
    beta: float | None = None
    p: float | None = None


@dataclass
class SplitMembership:
    split: Split
    users: pd.DataFrame  # user_id, group ("A" / "B"); users in neither group are absent


def safe_split_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    if not SPLIT_NAME.fullmatch(name):
        raise ValueError(f"cannot make a partition-safe split name from {text!r}")
    return name


def _direction(sign: float) -> str:
    return "A>B" if sign > 0 else "A<B"


def _categorical_split(name: str, survey: pd.DataFrame, variable: str, a_levels, b_levels, **kw) -> SplitMembership:
    # As text on both sides: the fit names levels as text, whatever the covariate's type (an int or bool level too).
    column = survey[variable].map(lambda value: None if pd.isna(value) else str(value))
    group = pd.Series(pd.NA, index=survey.index, dtype="object")
    group[column.isin([str(level) for level in a_levels])] = "A"
    group[column.isin([str(level) for level in b_levels])] = "B"
    users = pd.DataFrame({"user_id": survey["user_id"], "group": group}).dropna()
    split = Split(name=name, variable=variable, group_a=" | ".join(a_levels), group_b=" | ".join(b_levels), **kw)
    return SplitMembership(split, users.reset_index(drop=True))


def _median_split(name: str, survey: pd.DataFrame, variable: str, analysed_users: set, **kw) -> SplitMembership:
    values = pd.to_numeric(survey[variable], errors="coerce")
    in_sample = survey["user_id"].isin(analysed_users) & values.notna()
    median = float(values[in_sample].median())
    above, at_or_above = (values > median) & in_sample, (values >= median) & in_sample
    n = int(in_sample.sum())
    strict_balance = abs(int(above.sum()) - n / 2)
    use_strict = strict_balance <= abs(int(at_or_above.sum()) - n / 2)
    high = above if use_strict else at_or_above
    op = ">" if use_strict else "≥"
    group = pd.Series(pd.NA, index=survey.index, dtype="object")
    group[in_sample] = "B"
    group[high] = "A"
    users = pd.DataFrame({"user_id": survey["user_id"], "group": group}).dropna()
    split = Split(
        name=name,
        variable=variable,
        group_a=f"{variable} {op} {median:g}",
        group_b=f"{variable} {'≤' if use_strict else '<'} {median:g}",
        **kw,
    )
    return SplitMembership(split, users.reset_index(drop=True))


def null_control(name: str, survey: pd.DataFrame) -> SplitMembership:
    return _categorical_split(
        name,
        survey,
        REGION_COLUMN,
        NULL_REGION_A,
        NULL_REGION_B,
        rule="null control: region (no effect expected)",
        predicted="A≈B",
        null_control=True,
    )


def splits_from_fit(
    coefficients: pd.DataFrame,
    survey: pd.DataFrame,
    analysed_users: set,
    fitted_levels: dict[str, list[str]],
    alpha: float,
) -> list[SplitMembership]:
    """One split per covariate with a term at p < alpha (rule in the module docstring), then the null control."""
    splits: list[SplitMembership] = []
    for variable, terms in coefficients.groupby("variable", sort=False):
        significant = terms[terms["p"] < alpha]
        if significant.empty:
            continue
        name = safe_split_name(f"S{len(splits) + 1}_{variable}")
        top = significant.loc[significant["p"].idxmin()]
        sign = 1.0 if top["beta"] > 0 else -1.0
        common = dict(predicted=_direction(sign), null_control=False, beta=float(top["beta"]), p=float(top["p"]))
        if top["kind"] == "continuous":
            splits.append(
                _median_split(
                    name, survey, variable, analysed_users, rule=f"median split (p={top['p']:.2g})", **common
                )
            )
        else:
            a_levels = [lvl for lvl, b in zip(significant["level"], significant["beta"]) if (b > 0) == (sign > 0)]
            b_levels = [lvl for lvl in fitted_levels[variable] if lvl not in a_levels]
            splits.append(
                _categorical_split(
                    name,
                    survey,
                    variable,
                    a_levels,
                    b_levels,
                    rule=f"significant levels with β {'>' if sign > 0 else '<'} 0 vs the rest",
                    **common,
                )
            )
    splits.append(null_control(safe_split_name(f"S{len(splits) + 1}_region"), survey))
    return splits


def v3_splits(coefficients: pd.DataFrame, survey: pd.DataFrame, analysed_users: set) -> list[SplitMembership]:
    """The original v3 experiment's eight splits, with the fit's β and p attached where a single term matches."""
    by_term = coefficients.set_index("term") if len(coefficients) else pd.DataFrame(columns=["beta", "p"])

    def fitted(term):
        return (
            dict(beta=float(by_term.loc[term, "beta"]), p=float(by_term.loc[term, "p"]))
            if term in by_term.index
            else {}
        )

    age_a, age_b = schema.AGE_LEVELS[:2], schema.AGE_LEVELS[2:6]
    edu_a = ("University Bachelors Degree", "Graduate / Professional degree")
    edu_b = tuple(
        level for level in schema.EDUCATION_LEVELS if level not in edu_a and level != schema.PREFER_NOT_TO_SAY
    )
    splits = [
        _categorical_split(
            "S1_age", survey, "age", age_a, age_b, rule="v3: age 18-34 vs 35+", predicted="A>B", null_control=False
        ),
        _categorical_split(
            "S2_education",
            survey,
            "education",
            edu_a,
            edu_b,
            rule="v3: Bachelors or Graduate/Professional vs below (Prefer not to say excluded)",
            predicted="A>B",
            null_control=False,
        ),
    ]
    for index, (pref, predicted) in enumerate(
        (
            ("personalisation", "A>B"),
            ("safety", "A<B"),
            ("factuality", "A<B"),
            ("helpfulness", "A<B"),
            ("diversity", "A>B"),
        ),
        start=3,
    ):
        variable = f"stated_prefs_{pref}"
        splits.append(
            _median_split(
                f"S{index}_{pref}",
                survey,
                variable,
                analysed_users,
                rule=f"v3: median split of {variable}",
                predicted=predicted,
                null_control=False,
                **fitted(variable),
            )
        )
    splits.append(null_control("S8_region", survey))
    return splits
