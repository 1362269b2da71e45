"""Ordered logit of the binned score gap on user covariates, with user-clustered standard errors.

Owns the statistical model: Y bins score_gap at boundaries (Y = 1 + #{boundaries below the gap}): by
default its quartiles, computed from the data (Y ∈ 1..4), or fixed ones given by the caller (one boundary,
e.g. [14], makes Y ∈ {1, 2} and the model a binary logit of I(gap > 14)). User covariates are joined on
user_id, and statsmodels' `OrderedModel(distr="logit")` fits logit P(Y ≤ j) = θ_j − Xβ with standard errors
clustered by user (many pairs per user). Categorical covariates become dummies against their most
frequent level; levels held by fewer than `min_level_users` of the users with pairs in the fit are excluded
and their pairs counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real

import numpy as np
import pandas as pd
from scipy import special, stats
from statsmodels.miscmodels.ordinal_model import OrderedModel
from statsmodels.tools.numdiff import approx_fprime

from prism_assets.dataset import schema

DEFAULT_CATEGORICAL = ("age", "education", "gender", "lm_familiarity", "location_special_region")
DEFAULT_CONTINUOUS = tuple(f"stated_prefs_{name}" for name in schema.STATED_PREFS)
QUARTILES = "quartiles"


@dataclass
class CovariateSpec:
    categorical: tuple[str, ...] = DEFAULT_CATEGORICAL
    continuous: tuple[str, ...] = DEFAULT_CONTINUOUS
    min_level_users: int = 10


@dataclass
class OrderedLogitResult:
    coefficients: pd.DataFrame  # term, variable, level, kind, beta, se, z, p, ci_low, ci_high
    thresholds: list[float]  # cut points θ_1 < … < θ_K on the latent scale, one per boundary
    boundaries: list[float]  # score_gap boundaries defining Y (the data's quartiles, or the fixed ones given)
    reference_levels: dict[str, str]
    num_pairs: int
    num_users: int
    converged: bool
    dropped: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # covariate or term → why it is not in the fit
    outcome_counts: dict[int, int] = field(default_factory=dict)


class LogitOrderedModel(OrderedModel):
    """statsmodels' logit OrderedModel with closed-form cdf/pdf and score.

    The stock model evaluates scipy's generic `logistic.cdf` and differentiates the log-likelihood
    numerically, ~20 s on PRISM's 18k pairs × 32 covariates; the same likelihood with its analytic
    gradient fits in about a second. Parameters, thresholds and standard errors are the stock
    model's (a test compares both).
    """

    def __init__(self, endog, exog, **kwargs):
        super().__init__(endog, exog, distr="logit", **kwargs)

    def cdf(self, x):
        return special.expit(x)

    def pdf(self, x):
        p = special.expit(x)
        return p * (1 - p)

    def score_obs(self, params):
        low, upp = self._bounds(params)
        prob = np.maximum(self.cdf(upp) - self.cdf(low), 0) + 1e-20
        pdf_low, pdf_upp = self.pdf(low), self.pdf(upp)
        k_thresholds = self.k_levels - 1
        # d loglike / d theta_k: + pdf(upp)/p for the upper cut of the observed level, − pdf(low)/p for its lower cut.
        rows = np.arange(self.nobs)
        d_theta = np.zeros((self.nobs, k_thresholds + 1))
        d_theta[rows, self.endog] += pdf_upp / prob
        d_theta[rows, self.endog - 1 + (self.endog == 0) * (k_thresholds + 1)] -= pdf_low / prob
        d_theta = d_theta[:, :k_thresholds]
        # theta_k = t_0 + sum_{m=1..k} exp(t_m): chain rule into the increment parameters.
        increments = params[self.k_vars :]
        jacobian = np.tril(np.ones((k_thresholds, k_thresholds))) * np.concatenate(([1.0], np.exp(increments[1:])))
        d_beta = -((pdf_upp - pdf_low) / prob)[:, None] * self.exog
        return np.column_stack((d_beta, d_theta @ jacobian))

    def score(self, params):
        return self.score_obs(params).sum(0)

    def hessian(self, params):
        return approx_fprime(params, self.score, centered=True)


def term_name(variable: str, level: str | None = None) -> str:
    return variable if level is None else f"{variable}[{level}]"


def quartile_boundaries(score_gap: pd.Series) -> list[float]:
    return [float(b) for b in np.quantile(score_gap.to_numpy(), [0.25, 0.5, 0.75])]


def fixed_boundaries(boundaries: str | Sequence[float]) -> list[float] | None:
    """The given boundaries as floats, or None for "quartiles" (computed from the data at fit time); a
    ValueError names what is wrong with anything else."""
    if isinstance(boundaries, str):
        if boundaries != QUARTILES:
            raise ValueError(f"boundaries must be {QUARTILES!r} or a list of numbers, not {boundaries!r}")
        return None
    values = list(boundaries)
    if not values:
        raise ValueError("boundaries is an empty list: give at least one number (one boundary → a binary outcome)")
    not_numbers = [b for b in values if isinstance(b, bool) or not isinstance(b, Real)]
    if not_numbers:
        raise ValueError(f"boundaries must be numbers; not numbers: {not_numbers}")
    floats = [float(b) for b in values]
    if not np.isfinite(floats).all():
        raise ValueError(f"boundaries must be finite: {floats}")
    if any(low >= high for low, high in zip(floats, floats[1:])):
        raise ValueError(f"boundaries must be strictly increasing: {floats}")
    return floats


def empty_bins(y: np.ndarray, boundaries: list[float]) -> list[int]:
    return [level for level in range(1, len(boundaries) + 2) if not (y == level).any()]


def gap_outcome(score_gap: pd.Series, boundaries: list[float]) -> np.ndarray:
    """Y = 1 + number of boundaries strictly below the gap (gap == boundary stays in the lower bin)."""
    gaps = score_gap.to_numpy()
    return 1 + sum((gaps > b).astype(int) for b in boundaries)


def design_matrix(pairs: pd.DataFrame, survey: pd.DataFrame, spec: CovariateSpec):
    """(rows kept, X, reference levels, dropped counts, excluded covariates) for the pairs joined to their users'
    covariates. A covariate that cannot be fitted (constant, or a single usable level) is excluded, with its
    reason; pairs with a missing or non-finite value of a fitted continuous covariate are dropped and counted."""
    columns = [*spec.categorical, *spec.continuous]
    missing = [c for c in columns if c not in survey.columns]
    if missing:
        raise ValueError(f"covariates not in the survey table: {missing}; available: {sorted(survey.columns)}")
    users = survey.set_index("user_id")[columns]
    joined = pairs[["user_id", "score_gap"]].join(users, on="user_id")
    keep = np.ones(len(joined), dtype=bool)
    dropped: dict[str, int] = {}
    excluded: dict[str, str] = {}
    continuous = []
    for column in spec.continuous:
        values = pd.to_numeric(joined[column], errors="coerce").astype(float)
        finite = np.isfinite(values.to_numpy())
        distinct = values[finite].unique()
        if len(distinct) < 2:
            excluded[column] = (
                f"constant ({distinct[0]:g} for every user with pairs)" if len(distinct) else "no values"
            )
            continue
        continuous.append(column)
        joined[column] = values
        missing, nonfinite = values.isna().to_numpy(), ~finite & values.notna().to_numpy()
        dropped[f"pairs_missing_{column}"] = int((keep & missing).sum())
        if nonfinite.any():
            dropped[f"pairs_nonfinite_{column}"] = int((keep & nonfinite).sum())
        keep &= finite
    references: dict[str, str] = {}
    # A level's users are counted among the users whose pairs are still in the fit (its clustered SE rests on
    # them, not on survey respondents without pairs); dropping one covariate's rare levels can make another's
    # level rare, so until no level is.
    rare_or_missing = dict.fromkeys(spec.categorical, 0)
    changed = True
    while changed:
        changed = False
        for column in spec.categorical:
            users_per_level = joined[keep].drop_duplicates("user_id")[column].value_counts(dropna=True)
            rare = set(users_per_level[users_per_level < spec.min_level_users].index)
            bad = keep & (joined[column].isna() | joined[column].isin(rare)).to_numpy()
            if bad.any():
                rare_or_missing[column] += int(bad.sum())
                keep &= ~bad
                changed = True
    dropped.update({f"pairs_rare_or_missing_{column}": n for column, n in rare_or_missing.items()})
    kept = joined[keep].reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"no pair is left to fit: all {len(joined)} were dropped ({dropped}); excluded: {excluded}")
    blocks = []
    for column in spec.categorical:
        counts = kept.drop_duplicates("user_id")[column].value_counts()
        if len(counts) < 2:
            excluded[column] = f"one usable level ({', '.join(map(str, counts.index)) or 'none'})"
            continue
        reference = str(counts.index[0])
        references[column] = reference
        for level in sorted(counts.index[1:], key=str):
            blocks.append(pd.Series((kept[column] == level).astype(float), name=term_name(column, str(level))))
    for column in continuous:
        blocks.append(kept[column].astype(float).rename(column))
    if not blocks:
        raise ValueError(f"no covariate can be fitted: {excluded}")
    X = pd.concat(blocks, axis=1)
    return kept, X, references, dropped, excluded


SEPARATES = "separates the outcome"


def unfittable_terms(X: pd.DataFrame, y: np.ndarray) -> dict[str, str]:
    """Dummy terms whose pairs all fall in the lowest or all in the highest outcome (their β has no finite
    maximum-likelihood estimate), and columns left constant, each with its reason."""
    reasons = {}
    for term in X.columns:
        values = X[term].to_numpy()
        if np.unique(values).size < 2:
            reasons[term] = "constant among the pairs left in the fit"
        elif "[" in term:
            outcomes = np.unique(y[values == 1])
            if outcomes.size == 1 and outcomes[0] in (y.min(), y.max()):
                reasons[term] = f"{SEPARATES}: all its {int(values.sum())} pairs have Y = {outcomes[0]}"
    return reasons


def rebase_empty_references(X: pd.DataFrame, references: dict[str, str]) -> list[str]:
    """Dummies to drop because their variable's reference level has no pairs left (the dummies would sum to one,
    a constant beside the thresholds): its most frequent remaining level becomes the reference."""
    dropped = []
    for variable in references:
        dummies = [c for c in X.columns if c.startswith(f"{variable}[")]
        if dummies and (X[dummies].sum(axis=1) >= 1).all():
            new = str(X[dummies].sum().idxmax())
            references[variable] = new[len(variable) + 1 : -1]
            dropped.append(new)
    return dropped


def cluster_robust_ordered_logit(
    pairs: pd.DataFrame,
    survey: pd.DataFrame,
    spec: CovariateSpec | None = None,
    boundaries: str | Sequence[float] = QUARTILES,
    alpha_ci: float = 0.05,
) -> OrderedLogitResult:
    """The fit of Y (score_gap binned at `boundaries`: "quartiles" or fixed numbers, strictly increasing) on the
    spec's covariates; fixed boundaries must leave every bin with pairs, since statsmodels would silently merge an
    empty one into its neighbour and the thresholds would no longer match the boundaries."""
    spec = spec or CovariateSpec()
    fixed = fixed_boundaries(boundaries)
    if len(pairs) == 0:
        raise ValueError("no pairs to fit: within_model_pairs is empty")
    kept, X, references, dropped, excluded = design_matrix(pairs, survey, spec)
    used = quartile_boundaries(kept["score_gap"]) if fixed is None else fixed
    y = gap_outcome(kept["score_gap"], used)
    if fixed is not None and empty_bins(y, used):
        gaps = kept["score_gap"]
        raise ValueError(
            f"boundaries {used} leave Y = {empty_bins(y, used)} without pairs "
            f"(score_gap of the pairs in the fit spans {gaps.min():g}..{gaps.max():g})"
        )
    if len(np.unique(y)) < 2:
        raise ValueError(f"the binned score gap has a single level (boundaries {used})")
    # A separating level's pairs leave the fit with it (counted); that can leave another column constant.
    # A separating level leaves the fit with its pairs (counted); a column left constant leaves alone; a
    # variable whose reference level lost its pairs gets another reference. Each round removes a column.
    while True:
        reasons = unfittable_terms(X, y)
        if not reasons:
            rebased = rebase_empty_references(X, references)
            if not rebased:
                break
            X = X.drop(columns=rebased)
            continue
        excluded.update(reasons)
        rows = np.zeros(len(X), dtype=bool)
        for term, reason in reasons.items():
            if reason.startswith(SEPARATES):
                rows |= X[term].to_numpy() == 1
        dropped["pairs_of_separating_levels"] = dropped.get("pairs_of_separating_levels", 0) + int(rows.sum())
        kept, y = kept[~rows].reset_index(drop=True), y[~rows]
        X = X[~rows].drop(columns=list(reasons)).reset_index(drop=True)
    if X.empty or len(np.unique(y)) < 2:
        raise ValueError(f"nothing left to fit after excluding {excluded}")
    if fixed is not None and empty_bins(y, used):
        raise ValueError(f"boundaries {used} leave Y = {empty_bins(y, used)} without pairs after excluding {excluded}")
    # Continuous covariates are fitted per 100 points (better conditioned) and reported per point.
    scale = pd.Series(1.0, index=X.columns)
    scale[[c for c in spec.continuous if c in X.columns]] = 100.0
    model = LogitOrderedModel(y, X / scale)
    groups = pd.factorize(kept["user_id"])[0]
    fit = model.fit(method="bfgs", cov_type="cluster", cov_kwds={"groups": groups}, disp=False, maxiter=2000)
    k = X.shape[1]
    beta = np.asarray(fit.params[:k]) / scale.to_numpy()
    se = np.asarray(fit.bse[:k]) / scale.to_numpy()
    z = beta / se
    critical = stats.norm.ppf(1 - alpha_ci / 2)
    coefficients = pd.DataFrame(
        {
            "term": X.columns,
            "variable": [c.split("[", 1)[0] for c in X.columns],
            "level": [c.split("[", 1)[1][:-1] if "[" in c else None for c in X.columns],
            "kind": ["categorical" if "[" in c else "continuous" for c in X.columns],
            "beta": beta,
            "se": se,
            "z": z,
            "p": 2 * stats.norm.sf(np.abs(z)),
            "ci_low": beta - critical * se,
            "ci_high": beta + critical * se,
        }
    )
    thresholds = model.transform_threshold_params(fit.params)[1:-1]
    return OrderedLogitResult(
        coefficients=coefficients,
        thresholds=[float(t) for t in thresholds],
        boundaries=used,
        reference_levels=references,
        num_pairs=len(kept),
        num_users=int(kept["user_id"].nunique()),
        converged=bool(fit.mle_retvals.get("converged", False)),
        dropped=dropped,
        excluded=excluded,
        outcome_counts={int(level): int((y == level).sum()) for level in np.unique(y)},
    )
