"""The correspondence table's statistics and verdict rule, on held-out results whose numbers are known."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from prism_assets.statistics import calibration
from prism_assets.statistics import correspondence as corr

SPLITS = pd.DataFrame(
    {
        "split": ["S1", "S2", "S3", "S4", "NULL", "R1", "R2", "R3", "R4"],
        "predicted": ["A>B", "A<B", "A>B", "A>B", "A≈B", "A≈B", "A≈B", "A≈B", "A≈B"],
        "null_control": [False, False, False, False, True, False, False, False, False],
        "random": [False] * 5 + [True] * 4,
        "trained": True,
        "users_a": 100,
        "users_b": 100,
    }
)
COMPLETE = calibration.Completeness(5, 5, 4, 4, 3)


def _users(accuracy: dict[str, list[tuple[float, float]]], users: int = 40, pairs: int = 10, seed: int = 0):
    """A user table: per split and seed, `users` held-out users in each group with `pairs` pairs each, whose
    correctness averages the given (A's models on A's pairs, B's models on B's pairs) accuracy; each user's accuracy
    spread around it so that the clustered variance is not zero. The cross readings (A's models on B's pairs, …) and
    the baseline's are 0.5."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, per_seed in accuracy.items():
        for seed_index, own in enumerate(per_seed):
            for model in calibration.MODELS:
                for pairs_of, target in zip(calibration.GROUPS, own):
                    level = target if model == pairs_of else 0.5
                    spread = rng.normal(0, 0.1, users)
                    spread -= spread.mean()  # the group's accuracy is exactly the target
                    for user, offset in enumerate(spread):
                        rows.append((split, seed_index, model, pairs_of, f"u{user}", (level + offset) * pairs, pairs))
    return pd.DataFrame(rows, columns=["split", "seed", "model", "pairs_of", "user_id", "correct", "pairs"])


RANDOM = {  # four draws of the null: small differences, both signs
    "R1": [(0.61, 0.60), (0.60, 0.61), (0.62, 0.60)],
    "R2": [(0.60, 0.61), (0.61, 0.61), (0.60, 0.62)],
    "R3": [(0.62, 0.61), (0.60, 0.60), (0.61, 0.62)],
    "R4": [(0.60, 0.62), (0.62, 0.61), (0.61, 0.60)],
}


def _runs(splits: list[str], seeds: int = 3) -> pd.DataFrame:
    """Run rows with every secondary metric 0.6 for A and 0.5 for B."""
    rows = [
        {"split": split, "group": group, "seed": seed, **dict.fromkeys(corr.SECONDARY, 0.6 if group == "A" else 0.5)}
        for split in splits
        for group in ("A", "B")
        for seed in range(seeds)
    ]
    return pd.DataFrame(rows)


def _table(users, splits=SPLITS, completeness=COMPLETE, min_effect=0.03):
    table, diffs = corr.correspondence(
        users, _runs(list(splits["split"])), splits, 0.05, completeness, min_effect, 0.15
    )
    return table[table["metric"] == corr.PRIMARY_METRIC].set_index("split"), table, diffs


def test_verdicts_follow_the_documented_rule():
    users = _users(
        {
            "S1": [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)],  # clearly A > B, as predicted
            "S2": [(0.80, 0.60), (0.82, 0.61), (0.79, 0.62)],  # clearly A > B, predicted A < B
            "S3": [(0.70, 0.60), (0.60, 0.70), (0.66, 0.64)],  # spans 0
            "S4": [(0.70, 0.69)],  # one seed: tested with the pooled training variance
            "NULL": [(0.60, 0.61), (0.62, 0.60), (0.61, 0.61)],
            **RANDOM,
        }
    )
    table, _, diffs = _table(users)
    assert table.loc["S1", "verdict"] == corr.MATCH
    assert table.loc["S2", "verdict"] == corr.MISMATCH
    assert table.loc["S3", "verdict"] == corr.INCONCLUSIVE
    assert table.loc["S4", "verdict"] == corr.INCONCLUSIVE and table.loc["S4", "n_seeds"] == 1
    assert table.loc["NULL", "verdict"] == corr.NULL_OK
    assert (table.loc[list(RANDOM), "verdict"] == "random").all()
    assert table.loc["S1", "sign_consistency"] == "3/3" and table.loc["S2", "sign_consistency"] == "0/3"
    assert table.loc["NULL", "sign_consistency"] == "—"  # the null control predicts no sign
    assert table.loc["S1", "per_seed_d"] == pytest.approx([0.20, 0.21, 0.17])
    # the statistic: se² = (τ² + mean v) / n, τ² pooled over every split; scaled by the random splits' RMS t; t_K
    s1 = diffs[diffs["split"] == "S1"]
    assert table.loc["S1", "v"] == pytest.approx(s1["v"].mean())
    squares = diffs.groupby("split")["d"].apply(lambda d: ((d - d.mean()) ** 2).sum()).sum()
    degrees = (diffs.groupby("split").size() - 1).sum()
    weighted_v = (diffs.groupby("split")["v"].mean() * (diffs.groupby("split").size() - 1)).sum()
    assert table.loc["S1", "tau2"] == pytest.approx(max(0, (squares - weighted_v) / degrees))
    se = np.sqrt((table.loc["S1", "tau2"] + table.loc["S1", "v"]) / 3)
    assert table.loc["S1", "se"] == pytest.approx(se)
    scale = np.sqrt(np.mean(table.loc[list(RANDOM), "t"] ** 2))
    assert table.loc["S1", "null_scale"] == pytest.approx(scale) and table.loc["S1", "null_df"] == 4
    z = table.loc["S1", "mean_d"] / se / scale
    assert table.loc["S1", "p_two"] == pytest.approx(2 * stats.t.sf(abs(z), 4))
    assert table.loc["S1", "p_predicted"] == pytest.approx(stats.t.sf(z, 4))
    # Holm over the four predicted splits (S1..S4) and the null control, the random splits outside the family
    family = ["S1", "S2", "S3", "S4", "NULL"]
    p = table.loc[family, "p_two"].to_numpy()
    assert table.loc[family, "p_adjusted"].to_numpy() == pytest.approx(calibration.holm(p))
    assert table.loc[list(RANDOM), "p_adjusted"].isna().all() and (table.loc[family, "family_size"] == 5).all()
    # the 95% CI on the null's scale, and a bootstrap interval around the mean
    half = stats.t.ppf(0.975, 4) * scale * se
    assert table.loc["S1", "ci_low"] == pytest.approx(table.loc["S1", "mean_d"] - half)
    assert table.loc["S1", "boot_low"] < table.loc["S1", "mean_d"] < table.loc["S1", "boot_high"]


def test_the_mechanism_splits_a_minus_b_into_pairs_and_models():
    users = _users({"S1": [(0.8, 0.6)] * 2, "NULL": [(0.6, 0.6)] * 2, **RANDOM})
    table, _, _ = _table(users)
    row = table.loc["S1"]
    # A's models on A's pairs 0.8, B's on B's 0.6, every cross reading and the baseline's 0.5
    assert (row["acc_aa"], row["acc_bb"], row["acc_ab"], row["acc_ba"]) == pytest.approx((0.8, 0.6, 0.5, 0.5))
    assert row["pairs_part"] + row["model_part"] == pytest.approx(row["mean_d"])
    assert row["pairs_part"] == pytest.approx(0.1) and row["model_part"] == pytest.approx(0.1)
    assert row["acc_0a"] == pytest.approx(0.5) and row["baseline_pairs"] == pytest.approx(0.0)


def test_secondary_metrics_are_estimates_without_verdicts():
    users = _users({"S1": [(0.8, 0.6)] * 3, "NULL": [(0.6, 0.6)] * 3, **RANDOM})
    _, table, _ = _table(users)
    secondary = table[table["metric"].isin(corr.SECONDARY)]
    assert set(secondary.loc[~secondary["random"], "verdict"]) == {corr.EXPLORATORY}
    s1 = secondary[(secondary["split"] == "S1") & (secondary["metric"] == corr.SECONDARY[0])].iloc[0]
    assert s1["mean_d"] == pytest.approx(0.1) and s1["per_seed_d"] == pytest.approx([0.1, 0.1, 0.1])


def test_no_verdict_without_the_complete_family():
    users = _users({"S1": [(0.8, 0.6)] * 3, "NULL": [(0.6, 0.6)] * 3, "R1": RANDOM["R1"]})
    partial = calibration.Completeness(2, 5, 1, 4, 3)
    table, _, _ = _table(users, completeness=partial)
    why = "partial grid: 2 of 5 splits, 1 of 4 random splits (null not calibrated)"
    assert table.loc["S1", "verdict"] == why
    assert table.loc["S1", "mean_d"] == pytest.approx(0.2)  # the estimate is still there
    assert table.loc["S2", "verdict"] == why  # no runs: no verdict either


def test_a_split_too_small_to_train_gets_the_power_line_it_would_have():
    users = _users({"S1": [(0.7, 0.6)] * 3, "NULL": [(0.6, 0.6)] * 3, **RANDOM})
    splits = SPLITS.assign(trained=SPLITS["split"] != "S2", users_a=[100, 10, 100, 100, 100, 100, 100, 100, 100])
    table, _, _ = _table(users, splits=splits)
    assert table.loc["S2", "verdict"] == calibration.NOT_TRAINED and table.loc["S2", "n_seeds"] == 0
    # a group of a tenth of the users: a larger held-out variance, so a larger MDE than S1's
    assert table.loc["S2", "mde"] > table.loc["S1", "mde"] > 0


def test_the_power_line_is_for_min_effect():
    users = _users({"S1": [(0.7, 0.6)] * 3, "NULL": [(0.6, 0.6)] * 3, **RANDOM})
    table, _, _ = _table(users, min_effect=0.2)
    row = table.loc["S1"]
    assert row["min_effect"] == 0.2
    # seeds needed: (λ σ₀ / δ)² times one seed's variance, at least 2
    unit = calibration.critical_shift(4, int(row["family_size"]), 0.05) * row["null_scale"]
    assert row["seeds_needed"] == max(2, np.ceil(row["seed_var"] * (unit / 0.2) ** 2))
    assert row["mde"] == pytest.approx(unit * row["se"])


def test_experiments_compared_say_same_runs_where_the_runs_are_shared():
    one = pd.DataFrame(
        {
            "split": ["S1", "S2"],
            "predicted": ["A>B", "A>B"],
            "n_seeds": [3, 3],
            "mean_d": [0.1, 0.05],
            "ci_low": [0.0, -0.1],
            "ci_high": [0.2, 0.2],
            "verdict": ["MATCH", "INCONCLUSIVE"],
        }
    )
    two = one.assign(split=["T1", "T2"], mean_d=[0.1, -0.05], verdict=["MATCH", "INCONCLUSIVE"])
    groups = {"a": {"S1": ("x", "y"), "S2": ("p", "q")}, "b": {"T1": ("x", "y"), "T2": ("p", "q")}}
    runs = {"a": {"S1": frozenset({1}), "S2": frozenset({2})}, "b": {"T1": frozenset({1}), "T2": frozenset({3})}}
    comparison = corr.compare_experiments({"a": one, "b": two}, groups, runs).set_index("split_1")
    assert comparison.loc["S1", "direction"] == "same runs"  # one measurement, read twice
    assert comparison.loc["S2", "direction"] == "flip"  # other runs, the other sign
