"""A calibrated null for the split differences: a statistic per split, its null from random splits, Holm, power.

Owns the test (README, "A calibrated null"): per split and metric, t = mean d / se with se² = s²/n + se_eval²
(s² the seed variance pooled over every split of the experiment, n the split's seeds, se_eval the sampling error of
its groups' fixed held-out sets); the random splits' t give the null's scale σ₀ (σ₀² = mean t_r², the null's mean
being 0), so z = t / σ₀ follows Student's t with K degrees of freedom under the null when the K random splits'
statistics and a null split's are exchangeable. Two-sided p-values, Holm-adjusted over the experiment's predicted
splits, decide the verdicts; the power line says what the seeds can detect and how many would be needed.
"""

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

MATCH, MISMATCH, INCONCLUSIVE = "MATCH", "MISMATCH", "INCONCLUSIVE"
NULL_OK, NULL_NOT_OK, RANDOM = "null OK", "null NOT OK", "random"
NOT_TRAINED = "not trained: too small"
POWER = 0.8  # the power the power line is stated at


@dataclass(frozen=True)
class Null:
    """The null's scale from K random splits: σ₀ and its degrees of freedom (K), and the null's typical |A − B|."""

    scale: float
    df: int
    typical_abs_d: float

    @property
    def calibrated(self) -> bool:
        return self.df >= 2

    def pdf(self, z):
        """The null's density: Student t with K df, or a normal where there are too few random splits."""
        return stats.t.pdf(z, self.df) if self.calibrated else stats.norm.pdf(z)

    def quantile(self, q: float) -> float:
        return float(stats.t.ppf(q, self.df) if self.calibrated else stats.norm.ppf(q))


def critical_shift(df: int, family: int, alpha: float) -> float:
    """The shift of z (in units of the null's scale) that exceeds Holm's strictest level for `family` tests with
    probability POWER: under an effect, z follows a noncentral t with the null's df (its scale is estimated), whose
    heavier tails need a larger shift than the normal's quantile sum; a normal where the null is not calibrated."""
    return _shift(df if df >= 2 else 0, 1 - alpha / (2 * max(family, 1)), POWER)


@functools.cache  # a root search per split and metric otherwise; the arguments take few values
def _shift(df: int, level: float, power: float) -> float:
    if df == 0:
        return float(stats.norm.ppf(level) + stats.norm.ppf(power))
    critical = float(stats.t.ppf(level, df))
    return float(optimize.brentq(lambda shift: stats.nct.sf(critical, df, shift) - power, 0.0, 1e3))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted in the family)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def split_statistics(diffs: pd.DataFrame) -> pd.DataFrame:
    """Per split and metric: n seeds, mean d, the pooled seed variance, se_eval, se and t = mean / se.

    `diffs`: one row per split, metric and seed with d and eval_se (correspondence.seed_differences)."""
    keys = ["split", "metric"]
    squares = (diffs["d"] - diffs.groupby(keys, sort=False)["d"].transform("mean")) ** 2
    grouped = diffs.assign(ss=squares).groupby(keys, sort=False)
    table = grouped.agg(
        n=("d", "size"), mean_d=("d", "mean"), eval_se=("eval_se", "mean"), ss=("ss", "sum")
    ).reset_index()
    # A split's own few seeds give a variance too noisy to divide by: pool it over the experiment's splits.
    degrees = (table["n"] - 1).groupby(table["metric"]).transform("sum")
    pooled = table["ss"].groupby(table["metric"]).transform("sum") / degrees.where(degrees > 0)
    table["seed_var"] = pooled
    table["se"] = np.sqrt(pooled / table["n"] + table["eval_se"].fillna(0) ** 2)
    table["t"] = table["mean_d"] / table["se"]
    return table.drop(columns="ss")


def power_line(rows, scale, crit, effect, heldout_pairs) -> dict[str, np.ndarray]:
    """The smallest |A − B| the split's seeds detect with POWER at Holm's strictest level, the seeds needed for
    `effect`, or why seeds cannot reach it (inf) and the held-out pairs per group that would be needed.

    `rows`: seed_var, n and eval_se of one split (a dict) or of many (a table's columns); `scale`: the null's σ₀;
    `crit`: critical_shift; each argument one split's or an array of them."""
    columns = (rows["seed_var"], rows["n"], rows["eval_se"], heldout_pairs, scale, crit, effect)
    seed_var, n, eval_se, heldout, scale, crit, effect = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in columns)
    )
    trained = np.isfinite(seed_var) & (n > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = crit * scale
        mde = np.where(trained, unit * np.sqrt(seed_var / n + eval_se**2), np.nan)
        limit = np.where(np.isfinite(effect) & (effect > 0), effect / unit, np.nan)
        room = limit**2 - eval_se**2
        # room ≤ 0: the fixed held-out sets' own error is above what the effect allows, seeds cannot help
        blocked = trained & (room <= 0)
        seeds = np.where(trained & (room > 0), np.maximum(2, np.ceil(seed_var / room)), np.nan)
        return {
            "mde": mde,
            "seeds_needed": np.where(blocked, np.inf, seeds),
            "heldout_needed": np.where(blocked, np.ceil(heldout * (eval_se / limit) ** 2), np.nan),
        }


def calibrated_verdicts(
    statistics: pd.DataFrame,
    splits: pd.DataFrame,
    alpha: float,
    heldout_pairs: dict[str, float] | None = None,
    effect: float | None = None,
) -> pd.DataFrame:
    """statistics (split_statistics) with σ₀, z, one- and two-sided p, Holm-adjusted p, verdict and power line per
    split and metric. `splits`: split, predicted ("A>B", "A<B", "A≈B"), null_control, random; `heldout_pairs`:
    split → held-out pairs per group; `effect`: the |A − B| the seeds-needed line is for (default: the null's
    typical |A − B|). Each metric is a family of its own: its own null, its own Holm correction."""
    if statistics.empty:
        return statistics.assign(verdict=[])
    table = statistics.reset_index(drop=True)
    kinds = splits.set_index("split")
    metric = table["metric"]
    random = table["split"].map(kinds["random"]).fillna(False).astype(bool).to_numpy()
    control = table["split"].map(kinds["null_control"]).fillna(False).astype(bool).to_numpy()
    sign = table["split"].map(kinds["predicted"]).map({"A>B": 1.0, "A<B": -1.0}).to_numpy(dtype=float)
    # The null of each metric from its random splits: σ₀² = mean t_r², K = how many, typical |A − B|.
    t_random = table["t"].where(random)
    by_metric = pd.DataFrame({"t2": t_random**2, "d2": (table["mean_d"].where(t_random.notna())) ** 2}).groupby(
        metric, sort=False
    )
    df = by_metric["t2"].transform("count").to_numpy()
    scale = np.where(df > 0, np.sqrt(by_metric["t2"].transform("mean").to_numpy()), 1.0)
    typical = np.where(df > 0, np.sqrt(by_metric["d2"].transform("mean").to_numpy()), np.nan)
    calibrated = df >= 2

    def sf(z):  # P(Z > z) under each row's null: Student t with K df, a normal where K is too small
        return np.where(calibrated, stats.t.sf(z, np.maximum(df, 1)), stats.norm.sf(z))

    z = table["t"].to_numpy(dtype=float) / scale
    p_two = 2 * sf(np.abs(z))
    predicted = ~np.isnan(sign) & ~np.isnan(p_two)
    p_adjusted = pd.Series(np.where(predicted, p_two, np.nan)).groupby(metric, sort=False).transform(holm).to_numpy()
    family = pd.Series(predicted).groupby(metric, sort=False).transform("sum").to_numpy()
    crit = [critical_shift(int(k), int(f), alpha) for k, f in zip(df, family)]
    goal = typical if effect is None else np.full(len(table), effect, dtype=float)
    held_out = table["split"].map(heldout_pairs or {}).to_numpy(dtype=float)
    table = table.assign(
        null_scale=scale,
        null_df=df,
        z=z,
        p_two=p_two,
        p_predicted=np.where(np.isnan(sign), np.nan, sf(np.nan_to_num(sign, nan=1.0) * z)),
        p_adjusted=p_adjusted,
        **power_line(table, scale, crit, goal, held_out),
        effect_for_seeds=goal,
    )
    table["verdict"] = np.select(
        [
            random,
            control & np.isnan(p_two),
            control & (p_two < alpha),
            control,
            ~(p_adjusted < alpha),  # NaN: not significant
            np.sign(z) == sign,
        ],
        [RANDOM, INCONCLUSIVE, NULL_NOT_OK, NULL_OK, INCONCLUSIVE, MATCH],
        default=MISMATCH,
    )
    return table


def projected_power(
    calibrated: pd.DataFrame, heldout_pairs: dict[str, float], planned: dict[str, float], seeds: int, alpha: float
) -> pd.DataFrame:
    """The power line of splits without runs (too small to train), as if trained with `seeds` seeds: the pooled
    seed variance and the null of the trained splits (`calibrated`: calibrated_verdicts), and a held-out se scaled
    from theirs by held-out size (se² ∝ 1 / pairs; `heldout_pairs`, `planned`: split → held-out pairs per group,
    the harmonic mean of its two groups')."""
    rows = []
    for metric, table in calibrated.groupby("metric", sort=False):
        sizes = table["split"].map(heldout_pairs)
        known = table[sizes.notna() & (table["eval_se"] > 0)]
        per_pair = float(np.median(known["eval_se"] ** 2 * known["split"].map(heldout_pairs))) if len(known) else 0.0
        first = table.iloc[0]
        null = Null(float(first["null_scale"]), int(first["null_df"]), float(first["effect_for_seeds"]))
        family = int(table["p_adjusted"].notna().sum())
        for split, pairs in planned.items():
            row = {"seed_var": first["seed_var"], "n": seeds, "eval_se": np.sqrt(per_pair / max(pairs, 1.0))}
            crit = critical_shift(null.df, family, alpha)
            line = {k: float(v) for k, v in power_line(row, null.scale, crit, null.typical_abs_d, pairs).items()}
            rows.append(
                {"split": split, "metric": metric, **row, **line, "effect_for_seeds": null.typical_abs_d}
                | {"planned_seeds": seeds}
            )
    return pd.DataFrame(rows)
