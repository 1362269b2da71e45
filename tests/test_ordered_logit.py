"""The ordered logit recovers planted effects, and its fast likelihood equals statsmodels' stock one."""

import json

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.miscmodels.ordinal_model import OrderedModel

from prism_assets.dataset.loading import load_prism_directory
from prism_assets.dataset.pairs import within_model_pairs
from prism_assets.statistics.ordered_logit import (
    CovariateSpec,
    LogitOrderedModel,
    cluster_robust_ordered_logit,
    gap_outcome,
    quartile_boundaries,
)


def test_fast_logit_model_matches_stock_ordered_model_with_clustered_errors():
    rng = np.random.default_rng(7)
    n = 3000
    X = pd.DataFrame(rng.normal(size=(n, 3)), columns=["a", "b", "c"])
    X["d"] = (rng.random(n) < 0.3).astype(float)
    latent = X.to_numpy() @ np.array([0.6, -0.4, 0.0, 0.8]) + rng.logistic(size=n)
    y = np.digitize(latent, [-1.0, 0.2, 1.5])
    groups = rng.integers(0, 300, n)
    kwargs = dict(method="bfgs", cov_type="cluster", cov_kwds={"groups": groups}, disp=False, maxiter=2000)
    stock = OrderedModel(y, X, distr="logit").fit(**kwargs)
    fast = LogitOrderedModel(y, X).fit(**kwargs)
    np.testing.assert_allclose(fast.params, stock.params, atol=1e-5)
    np.testing.assert_allclose(fast.bse, stock.bse, rtol=1e-4)


def test_quartile_bins_put_a_gap_on_a_boundary_in_the_lower_bin():
    gaps = pd.Series([1, 6, 7, 14, 15, 29, 30, 99])
    assert list(gap_outcome(gaps, [6, 14, 29])) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert quartile_boundaries(pd.Series(range(1, 101))) == [25.75, 50.5, 75.25]


@pytest.fixture(scope="module")
def full_fit(full_synthetic_dir):
    tables = load_prism_directory(full_synthetic_dir)
    pairs = within_model_pairs(tables.utterances, tables.conversations).pairs
    return cluster_robust_ordered_logit(pairs, tables.survey), json.loads(
        (full_synthetic_dir / "truth.json").read_text()
    )


def test_planted_effects_are_recovered_with_the_right_sign_inside_the_ci(full_fit):
    fit, truth = full_fit
    coefficients = fit.coefficients.set_index("term")
    planted = {term: beta for term, beta in truth["ordered_logit_beta"].items() if term in coefficients.index}
    assert len(planted) >= 12
    # Each 95% CI covers its truth; across 14 terms that is checked with Bonferroni-adjusted (simultaneous) intervals.
    z = stats.norm.ppf(1 - 0.05 / (2 * len(planted)))
    for term, beta in planted.items():
        row = coefficients.loc[term]
        assert np.sign(row["beta"]) == np.sign(beta), term
        assert row["beta"] - z * row["se"] <= beta <= row["beta"] + z * row["se"], (term, beta, row["beta"], row["se"])
        assert np.isclose(row["ci_high"] - row["beta"], stats.norm.ppf(0.975) * row["se"])
        assert row["p"] < 0.05, term
    assert fit.converged
    # Un-planted covariates are mostly not significant (5% false positives expected).
    null_terms = coefficients.drop(index=list(truth["ordered_logit_beta"]), errors="ignore")
    assert (null_terms["p"] < 0.05).mean() < 0.2


def test_rare_levels_are_excluded_and_counted(full_fit):
    fit, _ = full_fit
    assert fit.dropped["pairs_rare_or_missing_location_special_region"] > 0  # Oceania, Prefer not to say
    assert "location_special_region[Oceania]" not in set(fit.coefficients["term"])
    assert fit.num_pairs == sum(fit.outcome_counts.values())
    assert fit.reference_levels["age"] == "25-34 years old"


def test_unknown_covariate_is_named(full_synthetic_dir):
    tables = load_prism_directory(full_synthetic_dir)
    pairs = within_model_pairs(tables.utterances, tables.conversations).pairs
    with pytest.raises(ValueError, match=r"covariates not in the survey table: \[.stated_prefs_astrology.\]"):
        cluster_robust_ordered_logit(pairs, tables.survey, CovariateSpec(continuous=("stated_prefs_astrology",)))


def _users_and_pairs(
    levels: np.ndarray, effect: dict, seed: int = 0, without_pairs: set[str] | frozenset[str] = frozenset()
):
    """A survey of users with covariate `level` (and `x`), and pairs whose gap grows with the level's effect."""
    rng = np.random.default_rng(seed)
    users = pd.DataFrame(
        {"user_id": [f"u{i}" for i in range(len(levels))], "level": levels, "x": rng.uniform(0, 100, len(levels))}
    )
    rows = [
        (user, int(np.clip(np.round(12 + 8 * (effect.get(level, 0.0) + rng.logistic())), 1, 99)))
        for user, level in zip(users["user_id"], users["level"])
        if user not in without_pairs
        for _ in range(rng.integers(5, 30))
    ]
    return users, pd.DataFrame(rows, columns=["user_id", "score_gap"])


def test_a_level_is_rare_by_its_users_with_pairs_not_its_survey_respondents():
    levels = np.array(["a"] * 150 + ["b"] * 138 + ["rare"] * 12, dtype=object)
    # 12 respondents hold "rare" (≥ min_level_users), but only 2 of them have pairs: its SE would rest on 2 users.
    users, pairs = _users_and_pairs(levels, {"b": 0.5}, without_pairs={f"u{i}" for i in range(290, 300)})
    fit = cluster_robust_ordered_logit(pairs, users, CovariateSpec(("level",), ("x",), min_level_users=10))
    assert "level[rare]" not in set(fit.coefficients["term"])
    assert fit.dropped["pairs_rare_or_missing_level"] == int(pairs["user_id"].isin({"u288", "u289"}).sum()) > 0
    assert fit.num_users == 288


def test_a_non_text_covariate_splits_its_users_by_the_fitted_levels():
    from prism_assets.statistics.splits import splits_from_fit

    levels = np.repeat([1, 2, 3], 100)  # e.g. a count: the fit names its levels "1", "2", "3"
    users, pairs = _users_and_pairs(levels, {3: 1.5}, seed=1)
    fit = cluster_robust_ordered_logit(pairs, users, CovariateSpec(("level",), ("x",), min_level_users=10))
    assert fit.coefficients.set_index("term").loc["level[3]", "p"] < 0.05
    fitted = {"level": [fit.reference_levels["level"], *fit.coefficients.query("variable == 'level'")["level"]]}
    survey = users.assign(location_special_region="UK")
    split = splits_from_fit(fit.coefficients, survey, set(pairs["user_id"]), fitted, alpha=0.05)[0]
    assert split.split.name == "S1_level" and split.split.group_a == "3"
    groups = dict(zip(split.users["user_id"], split.users["group"]))
    assert groups == {user: "A" if level == 3 else "B" for user, level in zip(users["user_id"], levels)}


def test_one_fixed_boundary_fits_the_binary_logit_of_the_gap_above_it():
    levels = np.repeat(["a", "b", "c"], 100).astype(object)
    users, pairs = _users_and_pairs(levels, {"b": 0.6, "c": -0.4}, seed=2)
    fit = cluster_robust_ordered_logit(
        pairs, users, CovariateSpec(("level",), ("x",), min_level_users=10), boundaries=[14]
    )
    assert fit.boundaries == [14.0] and len(fit.thresholds) == 1
    assert fit.outcome_counts == {1: int((pairs["score_gap"] <= 14).sum()), 2: int((pairs["score_gap"] > 14).sum())}
    assert fit.num_pairs == len(pairs)
    # The same model fitted as a plain logit of I(gap > 14): P(Y = 2) = expit(Xβ − θ), so Logit's coefficients are β
    # and its constant is −θ. Both clustered covariances carry statsmodels' G/(G−1)·(N−1)/(N−K) correction with the
    # same K (β's and one threshold vs β's and a constant), so the SEs match too, up to the optimiser's tolerance
    # and OrderedModel's numerical Hessian.
    joined = pairs.join(users.set_index("user_id"), on="user_id")
    reference = fit.reference_levels["level"]
    X = pd.DataFrame({f"level[{lvl}]": (joined["level"] == lvl).astype(float) for lvl in ("a", "b", "c")})
    X = X.drop(columns=f"level[{reference}]").assign(x=joined["x"])
    logit = sm.Logit((joined["score_gap"] > 14).astype(float), sm.add_constant(X)).fit(
        cov_type="cluster", cov_kwds={"groups": pd.factorize(joined["user_id"])[0]}, disp=False
    )
    coefficients = fit.coefficients.set_index("term").loc[list(X.columns)]
    np.testing.assert_allclose(coefficients["beta"], logit.params[X.columns], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(coefficients["se"], logit.bse[X.columns], rtol=1e-3)
    np.testing.assert_allclose(fit.thresholds[0], -logit.params["const"], rtol=1e-3)
    assert (coefficients["p"] < 0.05).any()  # a planted effect is there to be matched, not just noise


@pytest.mark.parametrize(
    ("boundaries", "problem"),
    [
        ("deciles", "must be 'quartiles' or a list of numbers"),
        ([], "empty list"),
        ([14, "29"], "must be numbers"),
        ([14, float("nan")], "must be finite"),
        ([14, 14], "strictly increasing"),
        ([29, 14], "strictly increasing"),
    ],
)
def test_invalid_boundaries_are_named(boundaries, problem):
    users, pairs = _users_and_pairs(np.repeat(["a", "b"], 20).astype(object), {})
    with pytest.raises(ValueError, match=problem):
        cluster_robust_ordered_logit(pairs, users, CovariateSpec(("level",), ("x",)), boundaries=boundaries)


def test_a_boundary_leaving_a_bin_without_pairs_is_an_error():
    users, pairs = _users_and_pairs(np.repeat(["a", "b"], 50).astype(object), {"b": 0.5})
    top = int(pairs["score_gap"].max())
    with pytest.raises(ValueError, match=rf"boundaries \[14.0, {top}.0\] leave Y = \[3\] without pairs"):
        cluster_robust_ordered_logit(pairs, users, CovariateSpec(("level",), ("x",)), boundaries=[14, top])
    with pytest.raises(ValueError, match=r"leave Y = \[1\] without pairs"):
        cluster_robust_ordered_logit(pairs, users, CovariateSpec(("level",), ("x",)), boundaries=[0])


def test_quartiles_stay_the_default_and_are_the_boundaries_reported():
    users, pairs = _users_and_pairs(np.repeat(["a", "b"], 60).astype(object), {"b": 0.5})
    spec = CovariateSpec(("level",), ("x",))
    default = cluster_robust_ordered_logit(pairs, users, spec)
    named = cluster_robust_ordered_logit(pairs, users, spec, boundaries="quartiles")
    fixed = cluster_robust_ordered_logit(pairs, users, spec, boundaries=quartile_boundaries(pairs["score_gap"]))
    assert default.boundaries == named.boundaries == fixed.boundaries == quartile_boundaries(pairs["score_gap"])
    pd.testing.assert_frame_equal(default.coefficients, named.coefficients)
    pd.testing.assert_frame_equal(default.coefficients, fixed.coefficients)
