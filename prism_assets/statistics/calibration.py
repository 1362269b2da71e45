"""A calibrated null for the split differences, from every run's per-pair held-out results.

Owns the test of the primary metric (docs/statistics.md, "A calibrated null"). Per split and seed s, the groups' models
are read on the held-out users of s (a fold no run of s trains on): d_s = acc(A's model, A's held-out pairs) −
acc(B's model, B's held-out pairs), and v_s its sampling variance over those users (clustered by user: a user's pairs
are not independent). Over seeds (different folds), d̄ = mean d_s with se² = (τ² + mean v_s) / n, τ² the training
variance beyond v, pooled over every split of the experiment. t = d̄ / se; the K random splits' t give the null's scale
σ₀ (σ₀² = mean t_r²), z = t / σ₀ follows Student's t with K df under the null; two-sided p-values, Holm over the
predicted splits and the null control; with K ≥ 19 also a rank p-value that assumes no distribution. A verdict is
given only over a complete grid with a calibrated null (`Completeness`). The power line says what the seeds can
detect, and what it takes to detect `min_effect`. Also: the 2×2 of models × pairs per split, and a bootstrap interval
over seeds and users.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

MATCH, MISMATCH, INCONCLUSIVE = "MATCH", "MISMATCH", "INCONCLUSIVE"
NULL_OK, NULL_NOT_OK, RANDOM = "null OK", "null NOT OK", "random"
NOT_TRAINED = "not trained: too small"
POWER = 0.8  # the power the power line is stated at
RANK_P_MIN_K = 19  # random splits from which a rank p-value can reach 0.05
GROUPS = ("A", "B")
MODELS = (*GROUPS, "baseline")


# ---- per pair → per split and seed ----


def user_table(results: pd.DataFrame, membership: pd.DataFrame) -> pd.DataFrame:
    """Per split, seed, model (A, B, baseline), pair group (A, B) and held-out user: correct (the sum of the pairs'
    correctness) and pairs.

    `results`: the runs' held-out pairs (cell, split, group, seed, pair_id, user_id, correct — averaged over the steps
    the primary metric reads); `membership`: split, user_id, group (significant_splits')."""
    if results.empty:
        return pd.DataFrame(columns=["split", "seed", "model", "pairs_of", "user_id", "correct", "pairs"])
    per_pair = results.groupby(["cell", "split", "group", "seed", "pair_id", "user_id"], dropna=False, sort=False)[
        "correct"
    ].mean()
    per_pair = per_pair.reset_index()
    users = membership.rename(columns={"group": "pairs_of"})[["split", "user_id", "pairs_of"]]
    grouped = per_pair[per_pair["split"].notna()].merge(users, on=["split", "user_id"], how="inner")
    grouped = grouped.rename(columns={"group": "model"})
    baseline = per_pair[per_pair["split"].isna()].drop(columns=["split"]).merge(users, on="user_id", how="inner")
    baseline = baseline.assign(model="baseline").drop(columns=["group"])
    both = pd.concat([grouped.drop(columns=["cell"]), baseline.drop(columns=["cell"])], ignore_index=True)
    table = (
        both.groupby(["split", "seed", "model", "pairs_of", "user_id"], sort=False)["correct"]
        .agg(correct="sum", pairs="size")
        .reset_index()
    )
    return table


def clustered(correct: pd.Series, pairs: pd.Series, keys: list[pd.Series]) -> pd.DataFrame:
    """Per group of `keys`: the accuracy Σcorrect / Σpairs, its variance clustered by user (each row one user's sums;
    CR1: U / (U − 1) · Σ_u (c_u − p̂·n_u)² / N²), users and pairs."""
    frame = pd.DataFrame({"correct": correct, "pairs": pairs})
    grouped = frame.groupby(keys, sort=False)
    rate = grouped["correct"].transform("sum") / grouped["pairs"].transform("sum")
    frame["squares"] = (frame["correct"] - frame["pairs"] * rate) ** 2
    sums = frame.groupby(keys, sort=False).agg(
        correct=("correct", "sum"), pairs=("pairs", "sum"), users=("pairs", "size"), squares=("squares", "sum")
    )
    accuracy = sums["correct"] / sums["pairs"]
    users = sums["users"]
    variance = users / (users - 1).where(users > 1) * sums["squares"] / sums["pairs"] ** 2
    return pd.DataFrame({"accuracy": accuracy, "variance": variance, "users": users, "pairs": sums["pairs"]})


def seed_differences(users: pd.DataFrame) -> pd.DataFrame:
    """Per split and seed with both groups' runs: the 2×2 of models × held-out pairs (acc_<model><pairs>, e.g. acc_ab:
    A's model on B's held-out pairs; acc_0a, acc_0b: the baseline's), d = acc_aa − acc_bb, its variance v over the
    held-out users, and each group's held-out users and pairs."""
    if users.empty:
        return pd.DataFrame(columns=["split", "seed", "d", "v"])
    keys = [users["split"], users["seed"], users["model"], users["pairs_of"]]
    cells = clustered(users["correct"], users["pairs"], keys)
    wide = cells.unstack(["model", "pairs_of"])
    out = pd.DataFrame(index=wide.index)
    for model, tag in (("A", "a"), ("B", "b"), ("baseline", "0")):
        for pairs_of in GROUPS:
            column = ("accuracy", model, pairs_of)
            out[f"acc_{tag}{pairs_of.lower()}"] = wide[column] if column in wide else np.nan
    for group in GROUPS:
        own = ("variance", group, group)
        out[f"v_{group.lower()}"] = wide[own] if own in wide else np.nan
        out[f"users_{group.lower()}"] = wide[("users", group, group)] if ("users", group, group) in wide else np.nan
        out[f"pairs_{group.lower()}"] = wide[("pairs", group, group)] if ("pairs", group, group) in wide else np.nan
    out = out.dropna(subset=["acc_aa", "acc_bb"]).reset_index()
    out["d"] = out["acc_aa"] - out["acc_bb"]
    out["v"] = out["v_a"].fillna(0.0) + out["v_b"].fillna(0.0)
    return out


def mechanism(diffs: pd.DataFrame) -> pd.DataFrame:
    """Per split, over its seeds: the 2×2 of models × held-out pairs, and A − B split into the part that lies in the
    pairs (every model finds A's pairs easier: ½[(AA + BA) − (AB + BB)]) and the part that lies in what each model
    learned (½[(AA + AB) − (BA + BB)]); the two add up to A − B. The baseline's own reading of both: 0A − 0B."""
    columns = ["acc_aa", "acc_ab", "acc_ba", "acc_bb", "acc_0a", "acc_0b"]
    table = diffs.groupby("split", sort=False)[columns].mean()
    table["d"] = table["acc_aa"] - table["acc_bb"]
    table["pairs_part"] = ((table["acc_aa"] + table["acc_ba"]) - (table["acc_ab"] + table["acc_bb"])) / 2
    table["model_part"] = ((table["acc_aa"] + table["acc_ab"]) - (table["acc_ba"] + table["acc_bb"])) / 2
    table["baseline_pairs"] = table["acc_0a"] - table["acc_0b"]
    return table.reset_index()


# ---- over seeds ----


def split_statistics(diffs: pd.DataFrame, family: str | None = None) -> pd.DataFrame:
    """Per split: n seeds, mean d, mean v, the training variance τ² pooled over the splits, se and t = mean d / se.

    Var(d_s) = τ² + v_s, so E[Σ_s (d_s − d̄)²] = (n − 1)(τ² + v̄) in each split: τ² is estimated from all splits at
    once (method of moments, at least 0), a split's own few seeds being too few to divide by. With `family` (a column
    of `diffs`), each family of splits pools its own (one experiment each, or one simulated experiment)."""
    families = [diffs[family]] if family else []
    keys = [*families, diffs["split"]]
    grouped = diffs.groupby(keys, sort=False)
    table = grouped.agg(n=("d", "size"), mean_d=("d", "mean"), v=("v", "mean"))
    table["ss"] = ((diffs["d"] - grouped["d"].transform("mean")) ** 2).groupby(keys, sort=False).sum()
    table = table.reset_index()
    by = [table[family]] if family else [pd.Series(0, index=table.index)]
    degrees = (table["n"] - 1).groupby(by).transform("sum")
    excess = table["ss"].groupby(by).transform("sum") - ((table["n"] - 1) * table["v"]).groupby(by).transform("sum")
    table["tau2"] = (excess / degrees.where(degrees > 0)).clip(lower=0).fillna(0.0)
    table["seed_var"] = table["tau2"] + table["v"]  # one seed's variance: training and held-out users
    table["se"] = np.sqrt(table["seed_var"] / table["n"])
    table["t"] = table["mean_d"] / table["se"]
    return table.drop(columns="ss")


def bootstrap_interval(users: pd.DataFrame, draws: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per split: a percentile interval of mean d from a bootstrap stratified over seeds and held-out users (seeds
    drawn with replacement; within each drawn seed, each group's held-out users drawn with replacement), as rliable
    draws runs and tasks: it assumes no distribution and no noise model."""
    rng = np.random.default_rng(seed)
    own = users[users["model"] == users["pairs_of"]]
    rows = []
    for split, mine in own.groupby("split", sort=False):
        seeds = sorted(mine["seed"].unique())
        # per seed and group: the users' correct and pairs, as arrays
        cells = {
            (seed, group): (part["correct"].to_numpy(float), part["pairs"].to_numpy(float))
            for (seed, group), part in mine.groupby(["seed", "model"])
        }
        if not all((s, g) in cells for s in seeds for g in GROUPS):
            continue
        per_seed = np.empty((len(seeds), draws))
        for i, seed_key in enumerate(seeds):
            accuracy = []
            for group in GROUPS:
                correct, pairs = cells[(seed_key, group)]
                picks = rng.integers(0, len(correct), size=(draws, len(correct)))
                accuracy.append(correct[picks].sum(1) / pairs[picks].sum(1))
            per_seed[i] = accuracy[0] - accuracy[1]
        chosen = rng.integers(0, len(seeds), size=(draws, len(seeds)))
        means = per_seed[chosen, np.arange(draws)[:, None]].mean(1)
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        rows.append({"split": split, "boot_low": float(low), "boot_high": float(high)})
    return pd.DataFrame(rows, columns=["split", "boot_low", "boot_high"])


# ---- the null, the verdicts ----


@dataclass(frozen=True)
class Completeness:
    """What the verdicts rest on: the predicted splits and random splits with every seed of the grid, of those the
    experiment trains. A verdict needs all of both, and at least two random splits (a null with K < 2 is not
    calibrated: one split's t is its own scale)."""

    predicted_done: int
    predicted_expected: int
    random_done: int
    random_expected: int
    seeds: int

    @property
    def calibrated(self) -> bool:
        return self.random_done >= 2 and self.random_done == self.random_expected

    @property
    def complete(self) -> bool:
        return self.predicted_done == self.predicted_expected and self.calibrated

    def reason(self) -> str | None:
        """Why no verdict is given, or None."""
        if self.random_expected < 2:
            return f"null not calibrated ({self.random_done} of {self.random_expected} random splits)"
        if not self.complete:
            partial = (
                f"partial grid: {self.predicted_done} of {self.predicted_expected} splits, "
                f"{self.random_done} of {self.random_expected} random splits"
            )
            return partial + (" (null not calibrated)" if self.random_done < 2 else "")
        return None


def critical_shift(df: int, family: int, alpha: float) -> float:
    """The shift of z (in units of the null's scale) that exceeds Holm's strictest level for `family` tests with
    probability POWER: under an effect, z follows a noncentral t with the null's df (its scale is estimated), whose
    heavier tails need a larger shift than the normal's quantile sum; the normal's (σ₀ known) for df 0."""
    return _shift(df if df >= 2 else 0, 1 - alpha / (2 * max(family, 1)), POWER)


@functools.cache  # a root search per split otherwise; the arguments take few values
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


def calibrated_verdicts(
    statistics: pd.DataFrame,
    splits: pd.DataFrame,
    alpha: float,
    completeness: Completeness | None = None,
    family: str = "metric",
) -> pd.DataFrame:
    """`statistics` (split_statistics, one row per split; or many experiments' at once, each under its own `family`
    column value) with σ₀, K, z, one- and two-sided p, the rank p (K ≥ 19), Holm-adjusted p and the verdict.
    `splits`: split, predicted ("A>B", "A<B", "A≈B"), null_control, random. Without `completeness`, every family is
    taken as complete; with it, an incomplete or uncalibrated one gets no MATCH / MISMATCH / null verdict."""
    if statistics.empty:
        return statistics.assign(verdict=[])
    table = statistics.reset_index(drop=True)
    if family not in table:
        table[family] = "all"
    table[family] = table[family].astype(str)
    kinds = splits.set_index("split")
    random = table["split"].map(kinds["random"]).fillna(False).astype(bool).to_numpy()
    control = table["split"].map(kinds["null_control"]).fillna(False).astype(bool).to_numpy()
    sign = table["split"].map(kinds["predicted"]).map({"A>B": 1.0, "A<B": -1.0}).to_numpy(dtype=float)
    by_family = table.groupby(family, sort=False)
    t_random = table["t"].where(random)
    df = t_random.notna().groupby(table[family], sort=False).transform("sum").to_numpy()
    mean_t2 = (t_random**2).groupby(table[family], sort=False).transform("mean").to_numpy()
    scale = np.where(df > 0, np.sqrt(mean_t2), 1.0)
    calibrated = df >= 2
    # What the random splits vary by beyond se, fixed across seeds (a group's own users: what its models learn from
    # them): ω² = mean(d̄_r² − se_r²), at least 0. σ₀ carries it into the test; the power line projects with it.
    excess = (table["mean_d"] ** 2 - table["se"] ** 2).where(random)
    omega2 = excess.groupby(table[family], sort=False).transform("mean").clip(lower=0).fillna(0.0).to_numpy()

    def sf(z):  # P(Z > z) under each row's null: Student t with K df (a normal where K < 2: no verdict then)
        return np.where(calibrated, stats.t.sf(z, np.maximum(df, 1)), stats.norm.sf(z))

    z = table["t"].to_numpy(dtype=float) / scale
    p_two = 2 * sf(np.abs(z))
    # Holm's family: every split whose verdict can be a false flag, the null control too (tested alone at α beside
    # the predicted splits, any false flag would come ~2α of the time)
    tested = (~np.isnan(sign) | control) & ~np.isnan(p_two)
    p_adjusted = pd.Series(np.where(tested, p_two, np.nan)).groupby(table[family], sort=False).transform(holm)
    size = pd.Series(tested).groupby(table[family], sort=False).transform("sum").to_numpy()
    # the rank p-value: the share of the K random splits (and the split itself) at least as far from 0
    z_random = pd.Series(np.abs(z)).where(random)
    rank_p = np.full(len(table), np.nan)
    for _, rows in by_family.groups.items():
        rows = np.asarray(rows)
        null = z_random.iloc[rows].dropna().to_numpy()
        if len(null) >= RANK_P_MIN_K:
            rank_p[rows] = (1 + (null[None, :] >= np.abs(z[rows])[:, None]).sum(1)) / (len(null) + 1)
    table = table.assign(
        null_scale=scale,
        null_df=df,
        omega2=omega2,
        z=z,
        p_two=p_two,
        p_predicted=np.where(np.isnan(sign), np.nan, sf(np.nan_to_num(sign, nan=1.0) * z)),
        p_rank=np.where(random, np.nan, rank_p),
        p_adjusted=p_adjusted.to_numpy(),
        family_size=size,
        crit=[critical_shift(int(k), int(f), alpha) for k, f in zip(df, size)],
    )
    table["verdict"] = np.select(
        [
            random,
            control & np.isnan(p_two),
            control & (table["p_adjusted"].to_numpy() < alpha),
            control,
            ~(table["p_adjusted"].to_numpy() < alpha),  # NaN: not significant
            np.sign(z) == sign,
        ],
        [RANDOM, INCONCLUSIVE, NULL_NOT_OK, NULL_OK, INCONCLUSIVE, MATCH],
        default=MISMATCH,
    )
    if completeness is not None and not completeness.complete:
        reason = completeness.reason()
        assert reason is not None  # an incomplete grid always has one
        table["verdict"] = np.where(random, RANDOM, reason)
    table["ci_half"] = [
        _quantile(k, 0.975) * s * e for k, s, e in zip(table["null_df"], table["null_scale"], table["se"])
    ]
    return table


def _quantile(df: float, q: float) -> float:
    return float(stats.t.ppf(q, df) if df >= 2 else stats.norm.ppf(q))


# ---- power ----


def power_lines(table: pd.DataFrame, min_effect: float, heldout_share: float, alpha: float) -> pd.DataFrame:
    """Per split of a calibrated table: the MDE of its seeds (the smallest |A − B| detected with POWER at Holm's
    strictest level: λ·σ₀·se), and what would detect `min_effect` under the measured noise — the seeds at this
    held-out share and K, the held-out share at these seeds, the random splits at these seeds — or why no number of
    seeds can. Projected with the variance of mean d over n seeds: τ²/n + v/min(n, F) + ω² (after F = 1 / share seeds
    every user has been held out once; ω², what the random splits vary by beyond se, does not average over seeds)."""
    tau2, v, n, omega2 = (table[c].to_numpy(float) for c in ("tau2", "v", "n", "omega2"))
    crit = table["crit"].to_numpy(float)
    folds = max(1, math.floor(1 / heldout_share + 1e-9))
    with np.errstate(divide="ignore", invalid="ignore"):
        mde = crit * table["null_scale"].to_numpy(float) * np.sqrt((tau2 + v) / n)
        room = (min_effect / crit) ** 2 - omega2  # what the seeds' variance may be
        seeds = np.ceil((tau2 + v) / room)
        past_folds = np.ceil(tau2 / (room - v / folds))  # more seeds than folds: only τ² still averages
        seeds = np.where(seeds <= folds, seeds, np.where(room - v / folds > 0, past_folds, np.inf))
        seeds = np.where(room > 0, np.maximum(seeds, 2), np.inf)
        floor = crit * np.sqrt(omega2 + v / folds)  # the MDE of every user held out once, any number of seeds
        share = heldout_share * v / (n * room - tau2)
        share = np.where((room > 0) & (n * room - tau2 > 0) & (share <= 0.5), share, np.nan)
    random_needed = [
        _random_needed(float(se), float(w), int(f), alpha, min_effect)
        for se, w, f in zip(table["se"], omega2, table["family_size"])
    ]
    return pd.DataFrame(
        {
            "split": table["split"],
            "mde": mde,
            "min_effect": min_effect,
            "seeds_needed": seeds,
            "heldout_share_needed": share,
            "random_splits_needed": random_needed,
            "heldout_floor": floor,
        }
    )


def _random_needed(se: float, omega2: float, family: int, alpha: float, effect: float) -> float:
    """The fewest random splits (2..200) whose λ brings λ·√(se² + ω²) under `effect`, or inf."""
    for k in (2, 4, 8, 12, 16, 19, 24, 32, 48, 64, 100, 200):
        if critical_shift(k, family, alpha) * math.sqrt(se**2 + omega2) <= effect:
            return float(k)
    return math.inf
