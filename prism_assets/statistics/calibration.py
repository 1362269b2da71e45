"""A calibrated null for the split differences: a statistic per split, its null from random splits, Holm, power.

Owns the test (README, "A calibrated null"): per split and metric, t = mean d / se with se² = s²/n + se_eval²
(s² the seed variance pooled over every split of the experiment, n the split's seeds, se_eval the sampling error of
its groups' fixed held-out sets); the random splits' t give the null's scale σ₀ (σ₀² = mean t_r², the null's mean
being 0), so z = t / σ₀ follows Student's t with K degrees of freedom under the null when the K random splits'
statistics and a null split's are exchangeable. Two-sided p-values, Holm-adjusted over the experiment's predicted
splits, decide the verdicts; the power line says what the seeds can detect and how many would be needed.
"""

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

    def sf(self, z):
        """P(Z > z) under the null: Student t with K df, or a normal where there are too few random splits."""
        return stats.t.sf(z, self.df) if self.calibrated else stats.norm.sf(z)

    def pdf(self, z):
        return stats.t.pdf(z, self.df) if self.calibrated else stats.norm.pdf(z)

    def quantile(self, q: float) -> float:
        return float(stats.t.ppf(q, self.df) if self.calibrated else stats.norm.ppf(q))

    def detectable(self, level: float, power: float) -> float:
        """The shift of z (in units of the null's scale) that exceeds the `level` quantile with probability
        `power`: under an effect, z follows a noncentral t with K df (the null's scale is estimated), whose
        heavier tails need a larger shift than the normal's quantile sum."""
        critical = self.quantile(level)
        if not self.calibrated:
            return critical + float(stats.norm.ppf(power))
        return float(optimize.brentq(lambda shift: stats.nct.sf(critical, self.df, shift) - power, 0.0, 1e3))


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
    grouped = diffs.groupby(["split", "metric"], sort=False)
    table = grouped.agg(n=("d", "size"), mean_d=("d", "mean"), eval_se=("eval_se", "mean")).reset_index()
    # A split's own few seeds give a variance too noisy to divide by: pool it over the experiment's splits.
    squares = grouped["d"].agg(lambda d: float(((d - d.mean()) ** 2).sum())).rename("ss").reset_index()
    table = table.merge(squares, on=["split", "metric"])
    degrees = (table["n"] - 1).groupby(table["metric"]).transform("sum")
    pooled = table["ss"].groupby(table["metric"]).transform("sum") / degrees.where(degrees > 0)
    table["seed_var"] = pooled
    table["se"] = np.sqrt(pooled / table["n"] + table["eval_se"].fillna(0) ** 2)
    table["t"] = table["mean_d"] / table["se"]
    return table.drop(columns="ss")


def null_from(random: pd.DataFrame) -> Null:
    """The null of one metric from its random splits' rows of split_statistics."""
    t = random["t"].dropna().to_numpy()
    if len(t) == 0:
        return Null(scale=1.0, df=0, typical_abs_d=np.nan)
    return Null(
        scale=float(np.sqrt(np.mean(t**2))),
        df=len(t),
        typical_abs_d=float(np.sqrt(np.mean(random["mean_d"].dropna().to_numpy() ** 2))),
    )


def power_line(row, null: Null, family: int, alpha: float, effect: float, heldout_pairs: float) -> dict:
    """The smallest |A − B| the split's seeds detect with POWER at Holm's strictest level, the seeds needed for
    `effect`, or why seeds cannot reach it and the held-out pairs per group that would be needed."""
    crit = null.detectable(1 - alpha / (2 * max(family, 1)), POWER)
    seed_var, n, eval_se = row["seed_var"], row["n"], row["eval_se"]
    if not np.isfinite(seed_var) or n == 0:
        return {"mde": np.nan, "seeds_needed": np.nan, "heldout_needed": np.nan}
    mde = crit * null.scale * np.sqrt(seed_var / n + eval_se**2)
    limit = effect / (crit * null.scale) if np.isfinite(effect) and effect > 0 else np.nan
    if not np.isfinite(limit):
        return {"mde": mde, "seeds_needed": np.nan, "heldout_needed": np.nan}
    room = limit**2 - eval_se**2
    if room <= 0:  # the fixed held-out sets' own error is above what the effect allows: seeds cannot help
        return {
            "mde": mde,
            "seeds_needed": np.inf,
            "heldout_needed": float(np.ceil(heldout_pairs * (eval_se / limit) ** 2)),
        }
    return {"mde": mde, "seeds_needed": float(max(2, np.ceil(seed_var / room))), "heldout_needed": np.nan}


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
    typical |A − B|)."""
    kinds = splits.set_index("split")
    frames = []
    for _, table in statistics.groupby("metric", sort=False):
        table = table.copy()
        random = table[table["split"].map(kinds["random"]).fillna(False).astype(bool)]
        null = null_from(random)
        sign = table["split"].map(kinds["predicted"]).map({"A>B": 1.0, "A<B": -1.0})
        table["null_scale"], table["null_df"] = null.scale, null.df
        table["z"] = table["t"] / null.scale
        table["p_two"] = 2 * null.sf(table["z"].abs())
        table["p_predicted"] = np.where(sign.notna(), null.sf(sign.fillna(1) * table["z"]), np.nan)
        predicted = sign.notna() & table["p_two"].notna()
        table["p_adjusted"] = np.nan
        table.loc[predicted, "p_adjusted"] = holm(table.loc[predicted, "p_two"].to_numpy())
        family = int(predicted.sum())
        goal = null.typical_abs_d if effect is None else effect
        lines = [
            power_line(row, null, family, alpha, goal, (heldout_pairs or {}).get(row["split"], np.nan))
            for _, row in table.iterrows()
        ]
        table = pd.concat([table.reset_index(drop=True), pd.DataFrame(lines)], axis=1)
        table["effect_for_seeds"] = goal
        table["verdict"] = [
            _verdict(kinds.loc[s], z, p, p_adj, alpha)
            for s, z, p, p_adj in zip(table["split"], table["z"], table["p_two"], table["p_adjusted"])
        ]
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else statistics.assign(verdict=[])


def _verdict(split, z: float, p_two: float, p_adjusted: float, alpha: float) -> str:
    if bool(split["random"]):
        return RANDOM
    if bool(split["null_control"]):
        return INCONCLUSIVE if np.isnan(p_two) else (NULL_NOT_OK if p_two < alpha else NULL_OK)
    if np.isnan(p_adjusted) or p_adjusted >= alpha:
        return INCONCLUSIVE
    predicted = 1 if split["predicted"] == "A>B" else -1
    return MATCH if np.sign(z) == predicted else MISMATCH


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
            line = power_line(row, null, family, alpha, null.typical_abs_d, pairs)
            rows.append(
                {"split": split, "metric": metric, **row, **line, "effect_for_seeds": null.typical_abs_d}
                | {"planned_seeds": seeds}
            )
    return pd.DataFrame(rows)
