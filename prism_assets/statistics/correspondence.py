"""Does the DPO difference between a split's groups follow the direction the ordered logit predicted?

Owns the per-seed differences d = metric(A) − metric(B), their mean, sign consistency and 95% CI (training
noise across seeds plus the held-out sets' sampling noise), and the verdict rule against the null control
(README, "Reading the correspondence table").
"""

import numpy as np
import pandas as pd
from scipy import stats

PRIMARY_METRIC = "mean_heldout_acc_tail"
METRICS = {
    "mean_heldout_acc_tail": "held-out accuracy (tail mean), primary",
    "mean_heldout_margin_tail": "held-out margin (tail mean)",
    "mid_heldout_acc": "held-out accuracy, 10–40% of training",
    "mean_pref_acc_tail": "train-batch accuracy (tail mean), the original metric",
    "mean_margin_tail": "train-batch margin (tail mean), the original metric",
    "mid_pref_acc": "train-batch accuracy, 10–40% of training",
}
# The held-out standard error (reported by each run) that goes with a held-out metric.
EVAL_SE = {
    "mean_heldout_acc_tail": "heldout_acc_se",
    "mid_heldout_acc": "heldout_acc_se",
    "mean_heldout_margin_tail": "heldout_margin_se",
}
MATCH, MISMATCH, INCONCLUSIVE = "MATCH", "MISMATCH", "INCONCLUSIVE"
NULL_OK, NULL_NOT_OK = "null OK", "null NOT OK"


def seed_differences(runs: pd.DataFrame) -> pd.DataFrame:
    """Per split, metric and seed with both groups present: value_a, value_b, d = A − B, eval_se of d.

    `runs`: one row per finished run with columns split, group, seed, every metric in METRICS and the
    held-out standard errors named in EVAL_SE (missing ones count as 0).
    """
    grouped = runs[runs["split"].notna()]
    frames = []
    for metric in METRICS:
        se_column = EVAL_SE.get(metric)
        se = grouped[se_column] if se_column in grouped else pd.Series(0.0, index=grouped.index)
        frames.append(
            grouped[["split", "group", "seed"]].assign(metric=metric, value=grouped[metric], se=se.fillna(0.0))
        )
    long = pd.concat(frames, ignore_index=True)
    wide = long.pivot_table(index=["split", "metric", "seed"], columns="group", values=["value", "se"]).reset_index()
    wide.columns = [f"{a}_{b.lower()}" if b else a for a, b in wide.columns]
    for column in ("value_a", "value_b", "se_a", "se_b"):
        if column not in wide:
            wide[column] = np.nan
    wide = wide.dropna(subset=["value_a", "value_b"])
    wide["d"] = wide["value_a"] - wide["value_b"]
    wide["eval_se"] = np.sqrt(wide["se_a"] ** 2 + wide["se_b"] ** 2)
    return wide[["split", "metric", "seed", "value_a", "value_b", "d", "eval_se"]].reset_index(drop=True)


def mean_ci(values: np.ndarray, eval_se: float = 0.0) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high): seed noise (t, n − 1 df) and held-out sampling noise combined."""
    mean = float(np.mean(values)) if len(values) else np.nan
    if len(values) < 2:
        return mean, np.nan, np.nan
    seed_half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    half = float(np.hypot(seed_half, stats.norm.ppf(0.975) * eval_se))
    return mean, mean - half, mean + half


def verdict(predicted: str, ci_low: float, ci_high: float, mean: float, null_abs_mean: float) -> str:
    if np.isnan(ci_low):
        return INCONCLUSIVE
    if predicted == "A≈B":
        return NULL_OK if ci_low <= 0 <= ci_high else NULL_NOT_OK
    sign = 1 if predicted == "A>B" else -1
    if (sign > 0 and ci_low > 0) or (sign < 0 and ci_high < 0):
        # Without the null control's difference (its runs missing or failed) there is no yardstick to beat.
        return MATCH if not np.isnan(null_abs_mean) and abs(mean) > null_abs_mean else INCONCLUSIVE
    if (sign > 0 and ci_high < 0) or (sign < 0 and ci_low > 0):
        return MISMATCH
    return INCONCLUSIVE


def correspondence(diffs: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """One row per split and metric: predicted direction, per-seed d, mean ± CI, sign consistency, verdict."""
    rows = []
    null_splits = splits[splits["null_control"]]
    null_name = null_splits["split"].iloc[0] if len(null_splits) else None
    for metric in METRICS:
        metric_diffs = diffs[diffs["metric"] == metric]
        null_d = metric_diffs[metric_diffs["split"] == null_name]["d"].to_numpy()
        null_abs_mean = abs(float(np.mean(null_d))) if len(null_d) else np.nan
        for split in splits.itertuples():
            d = metric_diffs[metric_diffs["split"] == split.split].sort_values("seed")
            values = d["d"].to_numpy()
            eval_se = float(d["eval_se"].mean()) if len(d) else 0.0
            mean, low, high = mean_ci(values, eval_se)
            sign = {"A>B": 1, "A<B": -1}.get(split.predicted)  # None for the null control: it predicts no sign
            rows.append(
                {
                    "split": split.split,
                    "metric": metric,
                    "predicted": split.predicted,
                    "null_control": bool(split.null_control),
                    "n_seeds": len(values),
                    "per_seed_d": [round(float(v), 4) for v in values],
                    "mean_d": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "eval_se": eval_se,
                    "sign_consistency": f"{int(np.sum(np.sign(values) == sign))}/{len(values)}" if sign else "—",
                    "null_abs_mean_d": null_abs_mean,
                    "verdict": verdict(
                        split.predicted, low, high, mean, np.nan if split.null_control else null_abs_mean
                    ),
                }
            )
    return pd.DataFrame(rows)


def compare_experiments(tables: dict[str, pd.DataFrame], groups: dict[str, dict[str, tuple]]) -> pd.DataFrame:
    """Every split two experiments share by definition, side by side: for each pair of experiments (in the order
    given) and each split of the first whose groups hold the same users as a split of the second (`groups`:
    experiment → split → (users of A, users of B), any comparable identity), each one's mean A − B with its CI and
    verdict (from `tables`: experiment → its correspondence rows of one metric), whether the direction is stable
    (same sign of the mean) and whether the verdicts agree. A split without runs on one side is left out."""
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
                        "direction": "stable" if np.sign(a["mean_d"]) == np.sign(b["mean_d"]) else "flip",
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
