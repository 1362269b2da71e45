"""From ordered-logit covariates to two-group splits of users, each with a predicted direction.

Owns the rule (README, "How a covariate becomes a split"): median splits of significant continuous
covariates, significant levels against the rest for categorical ones, the predicted direction from the sign
of β, the region null control, and two presets of the original research: `v3` (eight fixed splits) and `v2`
(six, read with v2's binary logit of I(score_gap > 14)):

- S1_age: 18-34 vs 35+, v3's groups.
- S2_personalisation, S3_safety: median splits of the stated preference, v3's S3/S4 rule (the same users).
- S4_familiarity: the lm_familiarity levels whose β has the sign of its smallest-p level vs its other fitted
  levels; when lm_familiarity has no term in the fit, Very/Somewhat familiar vs Not familiar at all, A>B.
- S5_behavioral: median split of each analysed user's mean score gap, A above, A>B by construction; circular,
  since the groups are made from the very gaps DPO learns from.
- S6_region: the null control.

v2's other directions come from its own fit: a median split takes the sign of its covariate's β, a categorical
one the sign of (mean β of A's levels − mean β of B's), the reference level counting β = 0 and levels not in the
fit left out; with no term to decide from, v3's direction (age A>B, personalisation A>B, safety A<B).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from prism_assets.dataset import schema

SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
GROUPS = ("A", "B")
NULL_REGION_A = ("UK", "Europe")
NULL_REGION_B = ("US", "Northern America", "Latin America and the Caribbean")
REGION_COLUMN = "location_special_region"
PRESETS = ("auto", "v2", "v3")
AGE_A, AGE_B = schema.AGE_LEVELS[:2], schema.AGE_LEVELS[2:6]  # 18-34 vs 35+ ("Prefer not to say" in neither)
# The research's predicted directions (v3), also v2's when its fit has no term to decide from.
V3_AGE_DIRECTION = "A>B"
V3_PREF_DIRECTIONS = {
    "personalisation": "A>B",
    "safety": "A<B",
    "factuality": "A<B",
    "helpfulness": "A<B",
    "diversity": "A>B",
}
FAMILIARITY = "lm_familiarity"
FAMILIAR, UNFAMILIAR = ("Very familiar", "Somewhat familiar"), ("Not familiar at all",)
MEAN_GAP = "mean_score_gap"
COEFFICIENT_COLUMNS = ["term", "variable", "level", "kind", "beta", "p"]


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
    random: bool = False  # a random split: a draw of the null, not a prediction


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


def _fitted_term(coefficients: pd.DataFrame, term: str) -> dict:
    """β and p of one term of the fit; empty when the fit has no such term."""
    rows = coefficients[coefficients["term"] == term] if len(coefficients) else coefficients
    return dict(beta=float(rows["beta"].iloc[0]), p=float(rows["p"].iloc[0])) if len(rows) else {}


def _categorical_direction(
    coefficients: pd.DataFrame, variable: str, a_levels, b_levels, fitted_levels: dict[str, list[str]]
) -> str | None:
    """The sign of (mean β of A's levels − mean β of B's) as "A>B"/"A<B", a fitted level without a term (the
    reference) counting β = 0 and levels not in the fit left out; None when a side has no fitted level or the
    means are equal (the fit does not decide)."""
    terms = coefficients[coefficients["variable"] == variable]
    beta = {str(level): float(b) for level, b in zip(terms["level"], terms["beta"])}
    fitted = {str(level) for level in fitted_levels.get(variable, ())} | set(beta)
    means = []
    for levels in (a_levels, b_levels):
        values = [beta.get(str(level), 0.0) for level in levels if str(level) in fitted]
        if not values:
            return None
        means.append(float(np.mean(values)))
    difference = means[0] - means[1]
    return _direction(difference) if np.isfinite(difference) and difference != 0 else None


def _familiarity_split(
    name: str, coefficients: pd.DataFrame, survey: pd.DataFrame, fitted_levels: dict[str, list[str]]
) -> SplitMembership:
    terms = coefficients[coefficients["variable"] == FAMILIARITY]
    if terms.empty:
        return _categorical_split(
            name,
            survey,
            FAMILIARITY,
            FAMILIAR,
            UNFAMILIAR,
            rule="v2 fallback (lm_familiarity not in the fit): Very/Somewhat familiar vs Not familiar at all, "
            "A>B assumed",
            predicted="A>B",
            null_control=False,
        )
    top = terms.loc[terms["p"].idxmin()]
    positive = top["beta"] > 0
    a_levels = [str(level) for level, b in zip(terms["level"], terms["beta"]) if (b > 0) == positive]
    b_levels = [str(level) for level in fitted_levels[FAMILIARITY] if str(level) not in a_levels]
    # A's β's all have top's sign and B holds the reference (β = 0) and the other sign, so the mean rule agrees with
    # that sign; the sign alone decides when B has no fitted level.
    predicted = _categorical_direction(coefficients, FAMILIARITY, a_levels, b_levels, fitted_levels)
    return _categorical_split(
        name,
        survey,
        FAMILIARITY,
        a_levels,
        b_levels,
        rule=f"v2: lm_familiarity levels with β {'>' if positive else '<'} 0 like its smallest-p level vs the rest",
        predicted=predicted or _direction(1.0 if positive else -1.0),
        null_control=False,
        beta=float(top["beta"]),
        p=float(top["p"]),
    )


def v2_splits(
    coefficients: pd.DataFrame,
    survey: pd.DataFrame,
    analysed_users: set,
    pairs: pd.DataFrame,
    fitted_levels: dict[str, list[str]],
) -> list[SplitMembership]:
    """The original v2 experiment's six splits (rules in the module docstring), directions from `coefficients`
    (v2's binary-logit fit; `fitted_levels` as for `splits_from_fit`), the fit's β and p attached where a single
    term matches."""
    if coefficients.empty:
        coefficients = pd.DataFrame(columns=COEFFICIENT_COLUMNS)

    def decided(direction: str | None, fallback: str) -> tuple[str, str]:
        return (direction, "direction from the fit") if direction else (fallback, "v3's direction: no term decides")

    predicted, how = decided(
        _categorical_direction(coefficients, "age", AGE_A, AGE_B, fitted_levels), V3_AGE_DIRECTION
    )
    splits = [
        _categorical_split(
            "S1_age",
            survey,
            "age",
            AGE_A,
            AGE_B,
            rule=f"v2: age 18-34 vs 35+; {how}",
            predicted=predicted,
            null_control=False,
        )
    ]
    for index, pref in enumerate(("personalisation", "safety"), start=2):
        variable = f"stated_prefs_{pref}"
        term = _fitted_term(coefficients, variable)
        beta = term.get("beta", 0.0)
        predicted, how = decided(
            _direction(beta) if np.isfinite(beta) and beta != 0 else None, V3_PREF_DIRECTIONS[pref]
        )
        splits.append(
            _median_split(
                f"S{index}_{pref}",
                survey,
                variable,
                analysed_users,
                rule=f"v2: median split of {variable}; {how}",
                predicted=predicted,
                null_control=False,
                **term,
            )
        )
    splits.append(_familiarity_split("S4_familiarity", coefficients, survey, fitted_levels))
    mean_gaps = pairs.groupby("user_id", as_index=False)["score_gap"].mean().rename(columns={"score_gap": MEAN_GAP})
    splits.append(
        _median_split(
            "S5_behavioral",
            mean_gaps,
            MEAN_GAP,
            analysed_users,
            rule="v2: median split of each user's mean score gap, A>B by construction (circular: the groups are made "
            "from the gaps DPO learns from)",
            predicted="A>B",
            null_control=False,
        )
    )
    splits.append(null_control("S6_region", survey))
    return splits


def v3_splits(coefficients: pd.DataFrame, survey: pd.DataFrame, analysed_users: set) -> list[SplitMembership]:
    """The original v3 experiment's eight splits, with the fit's β and p attached where a single term matches."""
    edu_a = ("University Bachelors Degree", "Graduate / Professional degree")
    edu_b = tuple(
        level for level in schema.EDUCATION_LEVELS if level not in edu_a and level != schema.PREFER_NOT_TO_SAY
    )
    splits = [
        _categorical_split(
            "S1_age",
            survey,
            "age",
            AGE_A,
            AGE_B,
            rule="v3: age 18-34 vs 35+",
            predicted=V3_AGE_DIRECTION,
            null_control=False,
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
    for index, (pref, predicted) in enumerate(V3_PREF_DIRECTIONS.items(), start=3):
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
                **_fitted_term(coefficients, variable),
            )
        )
    splits.append(null_control("S8_region", survey))
    return splits


# Random split k puts this share of the users in group A (k = 1, 2, … cycling): from a half to 70/30, the range of the
# predicted splits' group sizes, so that the null is drawn from splits shaped like the ones it judges.
RANDOM_SHARES = (0.5, 0.6, 0.4, 0.7, 0.3)


def random_splits(analysed_users: set, count: int) -> list[SplitMembership]:
    """`count` random splits of the users with pairs, R1..R<count>, split k drawn with seed k and group A holding
    RANDOM_SHARES[k − 1 mod 5] of the users: the same users in every experiment on the same pairs (so their runs are
    shared), a draw of the null each."""
    users = np.array(sorted(map(str, analysed_users)), dtype=object)
    memberships = []
    for index in range(1, count + 1):
        share = RANDOM_SHARES[(index - 1) % len(RANDOM_SHARES)]
        order = np.random.default_rng(index).permutation(len(users))
        group = np.where(np.arange(len(users)) < round(share * len(users)), "A", "B")
        split = Split(
            name=f"R{index}",
            variable="random",
            rule=f"random split of the users with pairs (seed {index}), {share:.0%} in A",
            group_a=f"a random {share:.0%}",
            group_b="the others",
            predicted="A≈B",
            null_control=False,
            random=True,
        )
        memberships.append(SplitMembership(split, pd.DataFrame({"user_id": users[order], "group": group})))
    return memberships


def discovery_users(user_ids: pd.Series, share: float) -> pd.Series:
    """Honest mode: whether each user is in the discovery part (the ordered logit is fitted on theirs) rather than the
    confirmation part (DPO trains and is evaluated on theirs); by a hash of the user id, independent of the held-out
    folds."""
    position = ("discovery:" + user_ids.astype(str)).map(
        lambda text: int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    )
    return position.astype("float64") / 2.0**64 < share
