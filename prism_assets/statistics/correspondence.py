"""Does the DPO difference between a split's groups follow the direction the ordered logit predicted?

Owns the table a researcher reads (docs/statistics.md, "Reading the correspondence table"): per split, the primary
metric — held-out accuracy of each group's models on its own held-out users' pairs — tested against the calibrated
null (`calibration`: p-values, Holm, verdict, the 2×2 mechanism, a bootstrap interval, the power line), and the
secondary metrics as exploratory estimates without verdicts; and the comparison of experiments' shared splits.
"""

import numpy as np
import pandas as pd
from scipy import stats

from prism_assets.statistics import calibration

PRIMARY_METRIC = "mean_heldout_acc_tail"
METRICS = {
    "mean_heldout_acc_tail": "held-out accuracy (tail mean), primary",
    "mean_heldout_margin_tail": "held-out margin (tail mean)",
    "mean_pref_acc_tail": "train-batch accuracy (tail mean), the original metric",
    "mean_margin_tail": "train-batch margin (tail mean), the original metric",
    "mid_pref_acc": "train-batch accuracy, 10–40% of training",
}
SECONDARY = [m for m in METRICS if m != PRIMARY_METRIC]
EXPLORATORY = "exploratory"  # a secondary metric's verdict: an estimate only, never a test
MATCH, MISMATCH, INCONCLUSIVE = calibration.MATCH, calibration.MISMATCH, calibration.INCONCLUSIVE
NULL_OK, NULL_NOT_OK = calibration.NULL_OK, calibration.NULL_NOT_OK
MECHANISM_COLUMNS = ["acc_aa", "acc_ab", "acc_ba", "acc_bb", "acc_0a", "acc_0b", "pairs_part", "model_part"]


def metric_differences(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per split and seed with both groups' runs: the groups' values of one run metric and d = A − B."""
    grouped = runs[runs["split"].notna()]
    wide = grouped.pivot_table(index=["split", "seed"], columns="group", values=metric, aggfunc="first")
    for group in calibration.GROUPS:
        if group not in wide:
            wide[group] = np.nan
    wide = wide.dropna(subset=list(calibration.GROUPS)).reset_index()
    return wide.assign(d=wide["A"] - wide["B"])[["split", "seed", "d"]]


def _per_seed(diffs: pd.DataFrame) -> dict[str, list[float]]:
    ordered = diffs.sort_values("seed") if len(diffs) else diffs
    return {split: [round(float(v), 4) for v in rows["d"]] for split, rows in ordered.groupby("split", sort=False)}


def correspondence(
    users: pd.DataFrame,
    runs: pd.DataFrame,
    splits: pd.DataFrame,
    alpha: float,
    completeness: calibration.Completeness,
    min_effect: float,
    heldout_share: float,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per split and metric, one row per split and seed of the primary metric's 2×2 and differences).

    `users`: calibration.user_table of the runs' held-out results; `runs`: one row per run (split, group, seed and
    every metric of METRICS); `splits`: significant_splits' table (split, predicted, null_control, random, trained,
    users_a, users_b). A split without runs has n_seeds 0; one the experiment does not train is NOT_TRAINED, with the
    power line it would have."""
    splits = splits.assign(
        random=splits["random"] if "random" in splits else False,
        trained=splits["trained"] if "trained" in splits else True,
    )
    diffs = calibration.seed_differences(users)
    primary = pd.DataFrame()
    if len(diffs):
        statistics = calibration.split_statistics(diffs)
        primary = calibration.calibrated_verdicts(statistics, splits, alpha, completeness)
        primary = primary.merge(calibration.mechanism(diffs), on="split", how="left", suffixes=("", "_mechanism"))
        primary = primary.merge(calibration.bootstrap_interval(users), on="split", how="left")
        primary = primary.merge(
            calibration.power_lines(primary, min_effect, heldout_share, alpha), on="split", how="left"
        )
        held_out = diffs.groupby("split")[["users_a", "users_b", "pairs_a", "pairs_b"]].mean()
        primary = primary.merge(held_out.add_prefix("heldout_").reset_index(), on="split", how="left")
    primary = primary.set_index("split") if len(primary) else primary
    per_seed = _per_seed(diffs)
    rows = []
    for split in splits.itertuples():
        values = per_seed.get(split.split, [])
        sign = {"A>B": 1, "A<B": -1}.get(split.predicted)  # None for the null and random splits: no sign
        row = {
            "split": split.split,
            "metric": PRIMARY_METRIC,
            "predicted": split.predicted,
            "null_control": bool(split.null_control),
            "random": bool(split.random),
            "n_seeds": len(values),
            "per_seed_d": values,
            "sign_consistency": f"{int(np.sum(np.sign(values) == sign))}/{len(values)}" if sign else "—",
            **dict.fromkeys(TABLE_COLUMNS, np.nan),
            "verdict": calibration.RANDOM
            if split.random
            else (completeness.reason() or INCONCLUSIVE if split.trained else calibration.NOT_TRAINED),
        }
        if split.split in primary.index:
            found = primary.loc[split.split]
            row.update({column: found[column] for column in TABLE_COLUMNS if column in found.index})
            row["verdict"] = found["verdict"]
            row["ci_low"], row["ci_high"] = found["mean_d"] - found["ci_half"], found["mean_d"] + found["ci_half"]
        rows.append(row)
    table = pd.DataFrame(rows)
    table = _projected(table, splits, min_effect, heldout_share, alpha, completeness)
    return pd.concat([table, _secondary(runs, splits)], ignore_index=True), diffs


def _projected(table, splits, min_effect, heldout_share, alpha, completeness) -> pd.DataFrame:
    """The power line of the splits not trained (too small), as if trained with the experiment's seeds: the pooled
    training variance and the null of the trained splits, the held-out variance scaled from theirs by held-out users
    (v ∝ 1/users_A + 1/users_B)."""
    untrained = splits[~splits["trained"]]
    trained = table[table["n_seeds"] > 0]
    if untrained.empty or trained.empty:
        return table
    sizes = splits.set_index("split")
    known = trained[trained["v"].notna()]
    inverse = 1 / sizes.loc[known["split"], "users_a"].to_numpy(float) + 1 / sizes.loc[
        known["split"], "users_b"
    ].to_numpy(float)
    per_inverse = float(np.median(known["v"].to_numpy(float) / inverse))
    first = trained.iloc[0]
    rows = pd.DataFrame(
        {
            "split": untrained["split"].to_numpy(),
            "n": int(trained["n_seeds"].max()),
            "tau2": first["tau2"],
            "omega2": first["omega2"],
            "v": per_inverse * (1 / untrained["users_a"].to_numpy(float) + 1 / untrained["users_b"].to_numpy(float)),
            "null_scale": first["null_scale"],
            "family_size": first["family_size"],
            "crit": calibration.critical_shift(int(first["null_df"]), int(first["family_size"]), alpha),
        }
    )
    rows["se"] = np.sqrt((rows["tau2"] + rows["v"]) / rows["n"])
    lines = calibration.power_lines(rows, min_effect, heldout_share, alpha).set_index("split")
    table = table.set_index("split")
    for column in lines.columns:
        table.loc[lines.index, column] = lines[column]
    table.loc[lines.index, "planned_seeds"] = rows.set_index("split")["n"]
    return table.reset_index()


def _secondary(runs: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """The secondary metrics as estimates: per split, the per-seed A − B, their mean and a t-interval over seeds.
    Exploratory: no verdict, so that five correlated readings of the same runs are never counted as support."""
    rows = []
    for metric in SECONDARY:
        diffs = metric_differences(runs, metric) if metric in runs else pd.DataFrame(columns=["split", "seed", "d"])
        per_seed = _per_seed(diffs)
        for split in splits.itertuples():
            values = np.array(per_seed.get(split.split, []), dtype=float)
            n = len(values)
            mean = float(values.mean()) if n else np.nan
            half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
            rows.append(
                {
                    "split": split.split,
                    "metric": metric,
                    "predicted": split.predicted,
                    "null_control": bool(split.null_control),
                    "random": bool(split.random),
                    "n_seeds": n,
                    "per_seed_d": [round(float(v), 4) for v in values],
                    "mean_d": mean,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "verdict": calibration.RANDOM if split.random else EXPLORATORY,
                }
            )
    return pd.DataFrame(rows)


TABLE_COLUMNS = [
    "mean_d",
    "se",
    "v",
    "tau2",
    "omega2",
    "seed_var",
    "t",
    "null_scale",
    "null_df",
    "family_size",
    "z",
    "p_predicted",
    "p_two",
    "p_rank",
    "p_adjusted",
    "ci_low",
    "ci_high",
    "boot_low",
    "boot_high",
    "mde",
    "min_effect",
    "seeds_needed",
    "heldout_share_needed",
    "random_splits_needed",
    "heldout_floor",
    "planned_seeds",
    "heldout_users_a",
    "heldout_users_b",
    "heldout_pairs_a",
    "heldout_pairs_b",
    *MECHANISM_COLUMNS,
    "baseline_pairs",
]


def compare_experiments(
    tables: dict[str, pd.DataFrame], groups: dict[str, dict[str, tuple]], run_ids: dict[str, dict[str, frozenset]]
) -> pd.DataFrame:
    """Every split two experiments share by definition, side by side: for each pair of experiments (in the order
    given) and each split of the first whose groups hold the same users as a split of the second (`groups`:
    experiment → split → (users of A, users of B), any comparable identity), each one's mean A − B with its CI and
    verdict (from `tables`: experiment → its primary rows). Where both rest on the very same runs (`run_ids`:
    experiment → split → the runs' ids and seeds), the comparison says so: the numbers are one measurement, and only
    the predictions differ; otherwise whether the direction is stable (same sign of the mean) or flips."""
    rows = []
    names = list(tables)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            by_users = {users: split for split, users in groups[second].items()}
            one, two = tables[first].set_index("split"), tables[second].set_index("split")
            for split, users in groups[first].items():
                other = by_users.get(users)
                if other is None or split not in one.index or other not in two.index:
                    continue
                a, b = one.loc[split], two.loc[other]
                if not (a["n_seeds"] and b["n_seeds"]):  # no runs on one side yet: nothing to compare
                    continue
                same = run_ids[first].get(split) == run_ids[second].get(other)
                if same:
                    direction = "same runs"
                else:
                    direction = "stable" if np.sign(a["mean_d"]) == np.sign(b["mean_d"]) else "flip"
                rows.append(
                    {
                        "experiment_1": first,
                        "split_1": split,
                        "experiment_2": second,
                        "split_2": other,
                        "predicted_1": a["predicted"],
                        "predicted_2": b["predicted"],
                        "n_seeds_1": int(a["n_seeds"]),
                        "n_seeds_2": int(b["n_seeds"]),
                        "mean_d_1": a["mean_d"],
                        "ci_low_1": a["ci_low"],
                        "ci_high_1": a["ci_high"],
                        "mean_d_2": b["mean_d"],
                        "ci_low_2": b["ci_low"],
                        "ci_high_2": b["ci_high"],
                        "verdict_1": a["verdict"],
                        "verdict_2": b["verdict"],
                        "direction": direction,
                        "verdicts_agree": a["verdict"] == b["verdict"],
                    }
                )
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


COMPARISON_COLUMNS = [
    "experiment_1",
    "split_1",
    "experiment_2",
    "split_2",
    "predicted_1",
    "predicted_2",
    "n_seeds_1",
    "n_seeds_2",
    "mean_d_1",
    "ci_low_1",
    "ci_high_1",
    "mean_d_2",
    "ci_low_2",
    "ci_high_2",
    "verdict_1",
    "verdict_2",
    "direction",
    "verdicts_agree",
]
