"""The run summary metrics, computed from a known learning curve."""

import math

import pandas as pd
import pytest

from prism_assets.training.metrics import summarize_curve


def _curve():
    steps = list(range(10, 110, 10))  # 10 logged steps of a 100-step run
    return pd.DataFrame(
        {
            "step": steps,
            "loss": [0.7, 0.69, 0.68, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3],
            "margin": [0.0, 0.01, 0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
            "pref_acc": [0.5, 0.5, 0.55, 0.625, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9],
            "heldout_acc": [0.5, 0.52, 0.54, 0.56, 0.58, 0.6, 0.62, 0.64, 0.66, 0.68],
            "heldout_margin": [0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18],
        }
    )


def test_final_tail_mid_and_steps_to_60pct():
    m = summarize_curve(_curve(), max_steps=100)
    assert m["final_loss"] == 0.3 and m["final_pref_acc"] == 0.9 and m["final_heldout_acc"] == 0.68
    assert m["mean_pref_acc_tail"] == pytest.approx((0.85 + 0.9) / 2)  # last 20% of 10 rows = 2 rows
    assert m["mean_heldout_margin_tail"] == pytest.approx((0.16 + 0.18) / 2)
    assert m["mid_heldout_acc"] == pytest.approx((0.5 + 0.52 + 0.54 + 0.56) / 4)  # steps 10..40
    assert m["steps_to_60pct"] == 40
    assert m["logged_steps"] == 10 and m["last_step"] == 100


def test_tail_of_a_short_curve_is_at_least_one_row_and_60pct_may_never_come():
    curve = _curve().head(3)
    m = summarize_curve(curve, max_steps=100)
    assert m["mean_loss_tail"] == 0.68
    assert m["steps_to_60pct"] is None
    assert m["mid_loss"] == pytest.approx((0.7 + 0.69 + 0.68) / 3)


def test_curve_without_a_column_is_refused():
    with pytest.raises(ValueError, match="heldout_acc"):
        summarize_curve(_curve().drop(columns="heldout_acc"), max_steps=100)


def test_heldout_sampling_errors_come_from_the_last_row():
    curve = _curve().assign(heldout_acc_se=[0.1] * 9 + [0.05], heldout_margin_se=0.01)
    m = summarize_curve(curve, max_steps=100)
    assert m["heldout_acc_se"] == 0.05 and m["heldout_margin_se"] == 0.01
    assert "heldout_acc_se" not in summarize_curve(_curve(), max_steps=100)


def test_heldout_summaries_use_only_the_evaluated_rows():
    # eval_steps 20 on a 10-step logging interval: held-out values at steps 20, 40, …, 100 only
    curve = _curve()
    evaluated = curve["step"] % 20 == 0
    curve.loc[~evaluated, ["heldout_acc", "heldout_margin"]] = float("nan")
    curve = curve.assign(heldout_evaluated=evaluated, heldout_acc_se=[0.03 if e else float("nan") for e in evaluated])
    m = summarize_curve(curve, max_steps=100)
    assert m["final_heldout_acc"] == 0.68 and m["heldout_acc_se"] == 0.03
    assert m["mean_heldout_acc_tail"] == 0.68  # last 20% of 5 evaluated rows = 1
    assert m["mid_heldout_margin"] == pytest.approx((0.02 + 0.06) / 2)  # steps 20 and 40
    assert m["mean_pref_acc_tail"] == pytest.approx((0.85 + 0.9) / 2)  # training metrics: every logged row
    assert m["logged_steps"] == 10


def test_a_diverged_run_shows_nan_and_a_curve_never_evaluated_is_refused():
    diverged = _curve()
    diverged.loc[diverged["step"] >= 60, ["loss", "heldout_margin"]] = float("nan")
    m = summarize_curve(diverged.assign(heldout_evaluated=True), max_steps=100)
    assert math.isnan(m["final_loss"]) and math.isnan(m["mean_loss_tail"]) and math.isnan(m["final_heldout_margin"])
    with pytest.raises(ValueError, match="no held-out evaluation"):
        summarize_curve(_curve().assign(heldout_evaluated=False), max_steps=100)
