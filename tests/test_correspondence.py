"""The correspondence table's statistics and verdict rule, on runs whose numbers are known."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from prism_assets.statistics import correspondence as corr


def _runs(per_split: dict[str, list[tuple[float, float]]], se: float = 0.0) -> pd.DataFrame:
    """Runs with every metric equal to the given (A, B) value per seed."""
    rows = []
    for split, seeds in per_split.items():
        for seed, (a, b) in enumerate(seeds):
            for group, value in (("A", a), ("B", b)):
                rows.append(
                    {
                        "split": split,
                        "group": group,
                        "seed": seed,
                        **dict.fromkeys(corr.METRICS, value),
                        "heldout_acc_se": se,
                        "heldout_margin_se": se,
                    }
                )
    rows.append({"split": None, "group": None, "seed": 0, **dict.fromkeys(corr.METRICS, 0.5)})  # baseline
    return pd.DataFrame(rows)


SPLITS = pd.DataFrame(
    {
        "split": ["S1", "S2", "S3", "S4", "NULL"],
        "predicted": ["A>B", "A<B", "A>B", "A>B", "A≈B"],
        "null_control": [False, False, False, False, True],
    }
)


def _primary(table):
    return table[table["metric"] == corr.PRIMARY_METRIC].set_index("split")


def test_verdicts_follow_the_documented_rule():
    runs = _runs(
        {
            "S1": [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)],  # clearly A > B, as predicted
            "S2": [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)],  # clearly A > B, predicted A < B
            "S3": [(0.70, 0.60), (0.60, 0.70), (0.66, 0.64)],  # CI spans 0
            "S4": [(0.70, 0.69)],  # one seed
            "NULL": [(0.60, 0.61), (0.62, 0.60), (0.61, 0.61)],
        }
    )
    table = _primary(corr.correspondence(corr.seed_differences(runs), SPLITS))
    assert table.loc["S1", "verdict"] == corr.MATCH
    assert table.loc["S2", "verdict"] == corr.MISMATCH
    assert table.loc["S3", "verdict"] == corr.INCONCLUSIVE
    assert table.loc["S4", "verdict"] == corr.INCONCLUSIVE and np.isnan(table.loc["S4", "ci_low"])
    assert table.loc["NULL", "verdict"] == corr.NULL_OK
    assert table.loc["S1", "sign_consistency"] == "3/3" and table.loc["S2", "sign_consistency"] == "0/3"
    assert table.loc["NULL", "sign_consistency"] == "—"  # the null control predicts no sign
    assert table.loc["S1", "per_seed_d"] == pytest.approx([0.20, 0.21, 0.17])
    d = np.array([0.20, 0.21, 0.17])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert table.loc["S1", "ci_low"] == pytest.approx(d.mean() - half)


def test_a_significant_difference_no_larger_than_the_nulls_is_inconclusive():
    runs = _runs(
        {
            "S1": [(0.65, 0.60), (0.66, 0.60), (0.65, 0.61)],
            "NULL": [(0.66, 0.60), (0.67, 0.60), (0.66, 0.61)],
        }
    )
    table = _primary(corr.correspondence(corr.seed_differences(runs), SPLITS))
    assert table.loc["S1", "ci_low"] > 0
    assert table.loc["S1", "verdict"] == corr.INCONCLUSIVE
    assert table.loc["NULL", "verdict"] == corr.NULL_NOT_OK


def test_a_split_beyond_zero_is_not_a_match_while_the_null_control_has_no_difference():
    seeds = [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)]
    runs = _runs({"S1": seeds, "NULL": [(0.60, 0.61)] * 3})
    runs = runs[~((runs["split"] == "NULL") & (runs["group"] == "B"))]  # the null control's B runs failed
    table = _primary(corr.correspondence(corr.seed_differences(runs), SPLITS))
    assert table.loc["S1", "ci_low"] > 0 and np.isnan(table.loc["S1", "null_abs_mean_d"])
    assert table.loc["S1", "verdict"] == corr.INCONCLUSIVE
    assert table.loc["NULL", "verdict"] == corr.INCONCLUSIVE


def test_heldout_sampling_noise_widens_the_interval():
    seeds, null = [(0.65, 0.60), (0.66, 0.60), (0.65, 0.61)], [(0.60, 0.60)] * 3
    narrow = _primary(corr.correspondence(corr.seed_differences(_runs({"S1": seeds, "NULL": null})), SPLITS))
    wide = _primary(corr.correspondence(corr.seed_differences(_runs({"S1": seeds, "NULL": null}, se=0.05)), SPLITS))
    assert narrow.loc["S1", "verdict"] == corr.MATCH
    assert wide.loc["S1", "verdict"] == corr.INCONCLUSIVE  # 1.96·√2·0.05 ≈ 0.14 > the 0.05 difference
    assert wide.loc["S1", "eval_se"] == pytest.approx(np.sqrt(2) * 0.05)
    train_metric = corr.correspondence(corr.seed_differences(_runs({"S1": seeds}, se=0.05)), SPLITS)
    train_metric = train_metric[(train_metric["metric"] == "mean_pref_acc_tail") & (train_metric["split"] == "S1")]
    assert train_metric["eval_se"].iloc[0] == 0  # no held-out noise for training-batch metrics


def test_a_split_missing_one_groups_runs_has_no_differences():
    runs = _runs({"S1": [(0.8, 0.6)]})
    runs = runs[~((runs["split"] == "S1") & (runs["group"] == "B"))]
    assert corr.seed_differences(runs).empty
