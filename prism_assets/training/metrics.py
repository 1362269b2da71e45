"""The one definition of a DPO run's summary metrics, computed from its learning curve.

A curve has one row per logged step (training loss, margin and pref_acc as TRL logs them; held-out accuracy
and margin where `heldout_evaluated`). Owns the summaries: final_*, mean_*_tail (last 20% of rows), mid_*
(steps in 10–40% of the run), steps_to_60pct, and the held-out sampling errors.
"""

import math

import pandas as pd

CURVE_METRICS = {
    "loss": "loss",
    "margin": "margin",
    "pref_acc": "pref_acc",
    "heldout_acc": "heldout_acc",
    "heldout_margin": "heldout_margin",
}
TAIL_FRACTION = 0.2
MID_WINDOW = (0.10, 0.40)
HELDOUT_METRICS = ("heldout_acc", "heldout_margin")
EVALUATED = "heldout_evaluated"  # the rows where the held-out metrics were evaluated (absent: every row)
REQUIRED_COLUMNS = ("step", *CURVE_METRICS)
SAMPLING_ERRORS = ("heldout_acc_se", "heldout_margin_se")


def summarize_curve(curve: pd.DataFrame, max_steps: int) -> dict:
    missing = [c for c in REQUIRED_COLUMNS if c not in curve.columns]
    if missing:
        raise ValueError(f"learning curve lacks columns {missing}")
    if curve.empty:
        raise ValueError("learning curve has no logged steps")
    curve = curve.sort_values("step").reset_index(drop=True)
    evaluated = curve[curve[EVALUATED].astype(bool)] if EVALUATED in curve.columns else curve
    if evaluated.empty:
        raise ValueError("learning curve has no held-out evaluation")
    metrics: dict = {"logged_steps": len(curve), "last_step": int(curve["step"].iloc[-1])}
    for name, column in CURVE_METRICS.items():
        rows = evaluated if column in HELDOUT_METRICS else curve  # a NaN where measured (divergence) stays visible
        metrics.update(_summaries(name, rows["step"], rows[column], max_steps))
    reached = curve[curve["pref_acc"] >= 0.6]
    metrics["steps_to_60pct"] = int(reached["step"].iloc[0]) if len(reached) else None
    for column in SAMPLING_ERRORS:
        if column in evaluated.columns:
            metrics[column] = float(evaluated[column].iloc[-1])
    return metrics


def _summaries(name: str, steps: pd.Series, values: pd.Series, max_steps: int) -> dict:
    """final_, mean_…_tail and mid_ of one metric over the rows where it is measured."""
    tail = values.tail(max(1, math.ceil(TAIL_FRACTION * len(values))))
    low, high = (fraction * max_steps for fraction in MID_WINDOW)
    mid = values[(steps >= low) & (steps <= high)]
    if mid.empty:
        mid = values.loc[[(steps - (low + high) / 2).abs().idxmin()]]
    return {
        f"final_{name}": float(values.iloc[-1]),
        f"mean_{name}_tail": float(tail.mean()),
        f"mid_{name}": float(mid.mean()),
    }
