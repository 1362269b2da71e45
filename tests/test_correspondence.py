"""The correspondence table's statistics and verdict rule, on runs whose numbers are known."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from prism_assets.statistics import correspondence as corr


def _runs(per_split: dict[str, list[tuple[float, float]]], se: float | dict[str, float] = 0.0) -> pd.DataFrame:
    """Runs with every metric equal to the given (A, B) value per seed; `se`: each group's held-out standard error,
    for every split or per split."""
    rows = []
    for split, seeds in per_split.items():
        split_se = se.get(split, 0.0) if isinstance(se, dict) else se
        for seed, (a, b) in enumerate(seeds):
            for group, value in (("A", a), ("B", b)):
                rows.append(
                    {
                        "split": split,
                        "group": group,
                        "seed": seed,
                        **dict.fromkeys(corr.METRICS, value),
                        "heldout_acc_se": split_se,
                        "heldout_margin_se": split_se,
                    }
                )
    rows.append({"split": None, "group": None, "seed": 0, **dict.fromkeys(corr.METRICS, 0.5)})  # baseline
    return pd.DataFrame(rows)


SPLITS = pd.DataFrame(
    {
        "split": ["S1", "S2", "S3", "S4", "NULL", "R1", "R2", "R3", "R4"],
        "predicted": ["A>B", "A<B", "A>B", "A>B", "A≈B", "A≈B", "A≈B", "A≈B", "A≈B"],
        "null_control": [False, False, False, False, True, False, False, False, False],
        "random": [False] * 5 + [True] * 4,
    }
)
RANDOM = {  # four draws of the null: small differences, both signs
    "R1": [(0.61, 0.60), (0.60, 0.61), (0.62, 0.60)],
    "R2": [(0.60, 0.61), (0.61, 0.61), (0.60, 0.62)],
    "R3": [(0.62, 0.61), (0.60, 0.60), (0.61, 0.62)],
    "R4": [(0.60, 0.62), (0.62, 0.61), (0.61, 0.60)],
}


def _primary(table):
    return table[table["metric"] == corr.PRIMARY_METRIC].set_index("split")


def test_verdicts_follow_the_documented_rule():
    runs = _runs(
        {
            "S1": [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)],  # clearly A > B, as predicted
            "S2": [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)],  # clearly A > B, predicted A < B
            "S3": [(0.70, 0.60), (0.60, 0.70), (0.66, 0.64)],  # spans 0
            "S4": [(0.70, 0.69)],  # one seed: tested with the pooled seed variance
            "NULL": [(0.60, 0.61), (0.62, 0.60), (0.61, 0.61)],
            **RANDOM,
        }
    )
    table = _primary(corr.correspondence(corr.seed_differences(runs), SPLITS))
    assert table.loc["S1", "verdict"] == corr.MATCH
    assert table.loc["S2", "verdict"] == corr.MISMATCH
    assert table.loc["S3", "verdict"] == corr.INCONCLUSIVE
    assert table.loc["S4", "verdict"] == corr.INCONCLUSIVE and table.loc["S4", "n_seeds"] == 1
    assert table.loc["NULL", "verdict"] == corr.NULL_OK
    assert (table.loc[list(RANDOM), "verdict"] == "random").all()
    assert table.loc["S1", "sign_consistency"] == "3/3" and table.loc["S2", "sign_consistency"] == "0/3"
    assert table.loc["NULL", "sign_consistency"] == "—"  # the null control predicts no sign
    assert table.loc["S1", "per_seed_d"] == pytest.approx([0.20, 0.21, 0.17])
    # the statistic: mean over the pooled se, scaled by the random splits' RMS statistic; t with K = 4 df
    scale = np.sqrt(np.mean(table.loc[list(RANDOM), "t"] ** 2))
    assert table.loc["S1", "null_scale"] == pytest.approx(scale) and table.loc["S1", "null_df"] == 4
    z = table.loc["S1", "mean_d"] / table.loc["S1", "se"] / scale
    assert table.loc["S1", "p_two"] == pytest.approx(2 * stats.t.sf(abs(z), 4))
    assert table.loc["S1", "p_predicted"] == pytest.approx(stats.t.sf(z, 4))
    # Holm over the four predicted splits (S1..S4), the null control and the random splits outside the family
    p = table.loc[["S1", "S2", "S3", "S4"], "p_two"].to_numpy()
    assert table.loc[["S1", "S2", "S3", "S4"], "p_adjusted"].to_numpy() == pytest.approx(corr.calibration.holm(p))
    assert np.isnan(table.loc["NULL", "p_adjusted"])


def test_a_difference_no_larger_than_the_random_splits_is_not_significant():
    """The same difference is MATCH against quiet random splits and INCONCLUSIVE against noisy ones: the null's
    scale comes from the random splits, not from the noise model alone."""
    seeds = [(0.65, 0.60), (0.66, 0.60), (0.65, 0.61)]
    quiet = _primary(corr.correspondence(corr.seed_differences(_runs({"S1": seeds, **RANDOM}, se=0.005)), SPLITS))
    noisy_random = {
        name: [(a + 0.05 * sign, b) for a, b in values] for (name, values), sign in zip(RANDOM.items(), (1, -1, 1, -1))
    }
    noisy = _primary(
        corr.correspondence(corr.seed_differences(_runs({"S1": seeds, **noisy_random}, se=0.005)), SPLITS)
    )
    assert quiet.loc["S1", "verdict"] == corr.MATCH
    assert noisy.loc["S1", "null_scale"] > quiet.loc["S1", "null_scale"]
    assert noisy.loc["S1", "verdict"] == corr.INCONCLUSIVE


def test_heldout_sampling_noise_widens_the_interval():
    """A split whose held-out sets are smaller than the random splits' (a larger se) gets a wider interval; the same
    se everywhere changes nothing, as the null's scale absorbs it."""
    seeds = [(0.65, 0.60), (0.66, 0.60), (0.65, 0.61)]
    same = dict.fromkeys(["S1", *RANDOM], 0.01)
    narrow = _primary(corr.correspondence(corr.seed_differences(_runs({"S1": seeds, **RANDOM}, se=same)), SPLITS))
    wide = _primary(
        corr.correspondence(corr.seed_differences(_runs({"S1": seeds, **RANDOM}, se={**same, "S1": 0.05})), SPLITS)
    )
    assert (
        wide.loc["S1", "ci_high"] - wide.loc["S1", "ci_low"] > narrow.loc["S1", "ci_high"] - narrow.loc["S1", "ci_low"]
    )
    assert wide.loc["S1", "eval_se"] == pytest.approx(np.sqrt(2) * 0.05)
    train_metric = corr.correspondence(corr.seed_differences(_runs({"S1": seeds, **RANDOM}, se=0.05)), SPLITS)
    train_metric = train_metric[(train_metric["metric"] == "mean_pref_acc_tail") & (train_metric["split"] == "S1")]
    assert train_metric["eval_se"].iloc[0] == 0  # no held-out noise for training-batch metrics


def test_a_split_too_small_to_train_gets_the_power_line_it_would_have():
    seeds = [(0.65, 0.60), (0.66, 0.60), (0.65, 0.61)]
    runs = _runs({"S1": seeds, **RANDOM}, se=0.02)
    splits = SPLITS.assign(trained=SPLITS["split"] != "S2")  # S2: too small, no runs
    heldout = dict.fromkeys(["S1", *RANDOM], 100.0)
    tables = {
        size: _primary(corr.correspondence(corr.seed_differences(runs), splits, 0.05, heldout, {"S2": size}))
        for size in (25.0, 100.0)
    }
    small, same = tables[25.0], tables[100.0]
    assert small.loc["S2", "verdict"] == corr.calibration.NOT_TRAINED and small.loc["S2", "n_seeds"] == 0
    assert small.loc["S2", "planned_seeds"] == 3 and np.isnan(small.loc["S2", "p_two"])
    # as large as S1's held-out sets: S1's own line; a quarter of them: twice the held-out se, a larger MDE
    assert same.loc["S2", "mde"] == pytest.approx(same.loc["S1", "mde"])
    assert small.loc["S2", "eval_se"] == pytest.approx(2 * same.loc["S1", "eval_se"])
    assert small.loc["S2", "mde"] > same.loc["S1", "mde"]
    assert np.isnan(small.loc["S3", "mde"]) and small.loc["S3", "verdict"] == corr.INCONCLUSIVE  # trained, no runs


def test_without_random_splits_the_test_is_uncalibrated_and_says_so():
    seeds = [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)]
    table = _primary(corr.correspondence(corr.seed_differences(_runs({"S1": seeds})), SPLITS))
    assert table.loc["S1", "null_df"] == 0 and table.loc["S1", "null_scale"] == 1.0  # a normal reference
    assert table.loc["S2", "n_seeds"] == 0 and table.loc["S2", "verdict"] == corr.INCONCLUSIVE


def test_a_split_missing_one_groups_runs_has_no_differences():
    runs = _runs({"S1": [(0.8, 0.6)]})
    runs = runs[~((runs["split"] == "S1") & (runs["group"] == "B"))]
    assert corr.seed_differences(runs).empty
