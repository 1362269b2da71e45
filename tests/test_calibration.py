"""The calibrated null, proven on simulated seed differences with known truth (no DPO): its false-positive rate
under the null, and its power against a planted effect as the power line states it."""

import numpy as np
import pandas as pd
import pytest

from prism_assets.statistics import calibration

METRIC = "mean_heldout_acc_tail"
PREDICTED = [f"S{i}" for i in range(1, 8)]  # seven predicted splits, as v3 has


def _splits(k: int) -> pd.DataFrame:
    random = [f"R{i}" for i in range(1, k + 1)]
    names = [*PREDICTED, "NULL", *random]
    return pd.DataFrame(
        {
            "split": names,
            "predicted": ["A>B"] * len(PREDICTED) + ["A≈B"] * (1 + k),
            "null_control": [name == "NULL" for name in names],
            "random": [name in random for name in names],
        }
    )


def _experiments(rng, splits, trials, seeds, effects, train_sd, heldout_sd, reported_se) -> pd.DataFrame:
    """Seed differences of `trials` simulated experiments, each under a metric of its own (the statistics pool,
    calibrate and correct per metric, so one call judges them all, independently): d = effect + the split's fixed
    held-out error + training noise per seed; every run reports `reported_se` as its held-out standard error (the
    truth is `heldout_sd`)."""
    names = splits["split"].to_numpy()
    effect = np.array([effects.get(name, 0.0) for name in names])
    fixed = rng.normal(0, heldout_sd, (trials, len(names), 1))  # the groups' held-out sets: the same every seed
    d = effect[None, :, None] + fixed + rng.normal(0, train_sd, (trials, len(names), seeds))
    return pd.DataFrame(
        {
            "split": np.tile(np.repeat(names, seeds), trials),
            "metric": np.repeat([f"{METRIC}#{trial}" for trial in range(trials)], len(names) * seeds),
            "seed": np.tile(np.arange(seeds), trials * len(names)),
            "d": d.ravel(),
            "eval_se": reported_se,
        }
    )


def _verdicts(diffs, splits, alpha=0.05) -> pd.DataFrame:
    """The calibrated verdicts, one row per (trial's) metric and split."""
    return calibration.calibrated_verdicts(calibration.split_statistics(diffs), splits, alpha)


def _by_trial(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per simulated experiment, one column per split."""
    return table.pivot(index="metric", columns="split", values=column)


def _rate(hits: int, n: int) -> tuple[float, float, float]:
    """The rate and its 95% Wilson interval."""
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


@pytest.mark.parametrize(
    ("k", "reported_se"),
    [(4, 0.03), (8, 0.03), (4, 0.01)],  # 0.01: a noise model three times too optimistic, corrected by the null
)
def test_under_the_null_the_rate_of_match_or_mismatch_is_at_most_alpha(k, reported_se):
    rng = np.random.default_rng(k * 1000 + int(reported_se * 1000))
    splits, trials = _splits(k), 4000
    table = _verdicts(
        _experiments(rng, splits, trials, 3, {}, train_sd=0.02, heldout_sd=0.03, reported_se=reported_se), splits
    )
    verdicts = _by_trial(table, "verdict")
    assert len(verdicts) == trials
    flagged = int(verdicts[PREDICTED].isin([calibration.MATCH, calibration.MISMATCH]).any(axis=1).sum())
    null_flagged = int((verdicts["NULL"] == calibration.NULL_NOT_OK).sum())
    rate, low, high = _rate(flagged, trials)
    print(f"K={k}, reported se {reported_se}: any MATCH/MISMATCH in {rate:.3f} [{low:.3f}, {high:.3f}] of {trials}")
    assert low <= 0.05  # the family-wise rate is not above α (Holm over seven splits)
    null_rate, null_low, _ = _rate(null_flagged, trials)
    assert null_low <= 0.05, null_rate  # the null control flagged as a two-sided test at α


def test_a_planted_effect_of_the_stated_size_is_found_with_the_stated_power():
    rng = np.random.default_rng(7)
    splits, seeds = _splits(8), 3
    settings = {"train_sd": 0.02, "heldout_sd": 0.03, "reported_se": 0.03}
    # the power line's smallest detectable |A − B| (power 0.8, Holm's strictest level) at the true noise: the noise
    # model is right here, so the null's scale is 1
    truth = {"seed_var": settings["train_sd"] ** 2, "n": seeds, "eval_se": settings["heldout_sd"]}
    crit = calibration.critical_shift(8, len(PREDICTED), 0.05)
    effect = float(calibration.power_line(truth, 1.0, crit, np.nan, 64)["mde"])
    # what the table states from each experiment's own estimates is near it
    mdes = _by_trial(_verdicts(_experiments(rng, splits, 200, seeds, {}, **settings), splits), "mde")["S1"]
    assert np.median(mdes) == pytest.approx(effect, rel=0.1)
    trials = 2000
    verdicts = _by_trial(
        _verdicts(_experiments(rng, splits, trials, seeds, {"S1": effect}, **settings), splits), "verdict"
    )
    found = int((verdicts["S1"] == calibration.MATCH).sum())
    power, low, high = _rate(found, trials)
    print(f"planted effect {effect:.4f}: MATCH in {power:.3f} [{low:.3f}, {high:.3f}] of {trials} (stated 0.8)")
    assert low <= calibration.POWER + 0.05 and high >= calibration.POWER - 0.05


def test_holm_adjusts_step_down_and_keeps_missing_values_out_of_the_family():
    adjusted = calibration.holm(np.array([0.01, 0.04, np.nan, 0.03]))
    assert adjusted[0] == pytest.approx(0.03)  # 3 tests: 3 × 0.01
    assert adjusted[3] == pytest.approx(0.06)  # 2 × 0.03
    assert adjusted[1] == pytest.approx(0.06)  # max(0.04, the previous step's 0.06)
    assert np.isnan(adjusted[2])


def test_seeds_cannot_reach_an_effect_below_the_heldout_sets_own_error():
    rng = np.random.default_rng(3)
    splits = _splits(4)
    diffs = _experiments(rng, splits, 1, 3, {}, train_sd=0.02, heldout_sd=0.05, reported_se=0.05)
    table = calibration.calibrated_verdicts(
        calibration.split_statistics(diffs),
        splits,
        0.05,
        heldout_pairs=dict.fromkeys(splits["split"], 64),
        effect=0.01,
    ).set_index("split")
    assert table.loc["S1", "seeds_needed"] == np.inf
    assert table.loc["S1", "heldout_needed"] > 64  # more held-out pairs would shrink the held-out error
    easy = calibration.calibrated_verdicts(calibration.split_statistics(diffs), splits, 0.05, effect=1.0)
    assert easy.set_index("split").loc["S1", "seeds_needed"] == 2
