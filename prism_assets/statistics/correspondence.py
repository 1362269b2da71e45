"""Does the DPO difference between a split's groups follow the direction the ordered logit predicted?

Owns the per-seed differences d = metric(A) − metric(B), the table of each split's differences with the calibrated
null's test (`calibration`: its p-values, verdict and power line), and the comparison of experiments' shared splits
(README, "Reading the correspondence table").
"""

import numpy as np
import pandas as pd

from prism_assets.statistics import calibration

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
MATCH, MISMATCH, INCONCLUSIVE = calibration.MATCH, calibration.MISMATCH, calibration.INCONCLUSIVE
NULL_OK, NULL_NOT_OK = calibration.NULL_OK, calibration.NULL_NOT_OK


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


def correspondence(
    diffs: pd.DataFrame,
    splits: pd.DataFrame,
    alpha: float = 0.05,
    heldout_pairs: dict[str, float] | None = None,
    planned_heldout: dict[str, float] | None = None,
) -> pd.DataFrame:
    """One row per split and metric: predicted direction, per-seed d, sign consistency, and from the calibrated
    null (`calibration`): mean d, its se, z against the random splits, one- and two-sided p, Holm-adjusted p, a
    95% CI on the null's scale, the verdict and the power line. A split without runs has n_seeds 0; one the
    experiment does not train (`splits`' trained column) is NOT_TRAINED, with the power line it would have
    (`planned_heldout`: its held-out pairs per group, `heldout_pairs` those of the trained splits)."""
    splits = splits.assign(
        random=splits["random"] if "random" in splits else False,
        trained=splits["trained"] if "trained" in splits else True,
    )
    statistics = calibration.split_statistics(diffs) if len(diffs) else pd.DataFrame()
    calibrated = pd.DataFrame()
    if len(statistics):
        calibrated = calibration.calibrated_verdicts(statistics, splits, alpha, heldout_pairs)
    projected = (
        calibration.projected_power(
            calibrated, heldout_pairs or {}, planned_heldout, int(statistics["n"].max()), alpha
        ).set_index(["split", "metric"])
        if len(calibrated) and planned_heldout
        else pd.DataFrame()
    )
    calibrated = calibrated.set_index(["split", "metric"]) if len(calibrated) else calibrated
    rows = []
    for metric in METRICS:
        metric_diffs = diffs[diffs["metric"] == metric] if len(diffs) else diffs
        for split in splits.itertuples():
            values = (
                metric_diffs[metric_diffs["split"] == split.split].sort_values("seed")["d"].to_numpy()
                if len(metric_diffs)
                else np.array([])
            )
            sign = {"A>B": 1, "A<B": -1}.get(split.predicted)  # None for the null and random splits: no sign
            row = {
                "split": split.split,
                "metric": metric,
                "predicted": split.predicted,
                "null_control": bool(split.null_control),
                "random": bool(split.random),
                "n_seeds": len(values),
                "per_seed_d": [round(float(v), 4) for v in values],
                "sign_consistency": f"{int(np.sum(np.sign(values) == sign))}/{len(values)}" if sign else "—",
                **dict.fromkeys(CALIBRATED_COLUMNS, np.nan),
                "verdict": calibration.RANDOM
                if split.random
                else (INCONCLUSIVE if split.trained else calibration.NOT_TRAINED),
            }
            if (split.split, metric) in calibrated.index:
                found = calibrated.loc[(split.split, metric)]
                row.update({column: found[column] for column in CALIBRATED_COLUMNS if column in found.index})
                row["verdict"] = found["verdict"]
                half = _quantile(found, 0.975) * found["null_scale"] * found["se"]
                row["ci_low"], row["ci_high"] = found["mean_d"] - half, found["mean_d"] + half
            elif (split.split, metric) in projected.index:
                found = projected.loc[(split.split, metric)]
                row.update({column: found[column] for column in CALIBRATED_COLUMNS if column in found.index})
            rows.append(row)
    return pd.DataFrame(rows)


CALIBRATED_COLUMNS = [
    "mean_d",
    "se",
    "eval_se",
    "seed_var",
    "t",
    "null_scale",
    "null_df",
    "z",
    "p_predicted",
    "p_two",
    "p_adjusted",
    "ci_low",
    "ci_high",
    "mde",
    "seeds_needed",
    "heldout_needed",
    "effect_for_seeds",
    "planned_seeds",
]


def _quantile(row, q: float) -> float:
    return calibration.Null(row["null_scale"], int(row["null_df"]), np.nan).quantile(q)


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
