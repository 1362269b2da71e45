"""Report asset: `correspondence_table`, built from every `group_dpo_run` partition that exists.

Owns turning finished runs into what a researcher reads: the per-split table (predicted direction,
per-seed A − B differences, mean ± 95% CI, sign consistency, the null control's difference, verdict) as
markdown and parquet, and PNG learning curves of each split's groups (mean and min–max band over
seeds) embedded in the materialization and written under the DPO settings' `reports_dir`.
"""

import sys
from pathlib import Path
from typing import Literal

import dagster as dg
import pandas as pd

from prism_assets import partitions, plots, versions
from prism_assets.assets import dpo
from prism_assets.assets.data import markdown_table
from prism_assets.statistics import correspondence


class ReportConfig(dg.Config):
    curve_metric: Literal[
        "heldout_acc", "heldout_margin", "pref_acc", "margin", "loss", "reward_chosen", "reward_rejected"
    ] = "heldout_acc"  # the curve column the learning-curve plots draw


def runs_table(runs: dict) -> pd.DataFrame:
    rows = [
        {
            "cell": run["cell"],
            "split": run["split"],
            "group": run["group"],
            "seed": int(run["seed"]),
            "membership_digest": run["membership_digest"],
            "settings_fingerprint": run["settings_fingerprint"],
            **{m: run["metrics"].get(m) for m in [*correspondence.METRICS, *set(correspondence.EVAL_SE.values())]},
        }
        for run in runs.values()
    ]
    return pd.DataFrame(rows)


def current_runs(runs: pd.DataFrame, splits: dict, settings_fingerprint: str) -> tuple[pd.DataFrame, dict]:
    """(the runs the table is made of, the others as reason → "cell seed N" list). Left out: a run whose split
    `significant_splits` no longer has, one that trained on other users than the split's group now holds (a split
    name is reused by another preset, α or fit), and one trained under other DPO settings than the code location's
    — each would be scored against a prediction or averaged with runs it was not made for."""
    names = set(splits["splits"]["split"])
    expected = {(s, g): dpo.membership_digest(splits, s, g) for s in names for g in partitions.GROUPS}
    reasons = pd.Series(None, index=runs.index, dtype="object")
    gone = runs["split"].notna() & ~runs["split"].isin(names)
    reasons[gone] = "split no longer in significant_splits"
    expected_digest = pd.Series([expected.get((s, g)) for s, g in zip(runs["split"], runs["group"])], index=runs.index)
    other_users = ~gone & runs["split"].notna() & (runs["membership_digest"] != expected_digest)
    reasons[other_users] = "trained on other users than the group now holds"
    other_settings = reasons.isna() & (runs["settings_fingerprint"] != settings_fingerprint)
    reasons[other_settings] = "trained under other DPO settings"
    left_out = {
        reason: [f"{cell} seed {seed}" for cell, seed in zip(group["cell"], group["seed"])]
        for reason, group in runs[reasons.notna()].groupby(reasons[reasons.notna()], sort=True)
    }
    return runs[reasons.isna()].reset_index(drop=True), left_out


def curves_table(runs: dict) -> pd.DataFrame:
    frames = [
        run["curve"].assign(cell=run["cell"], split=run["split"], group=run["group"], seed=int(run["seed"]))
        for run in runs.values()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _format_table(table: pd.DataFrame) -> pd.DataFrame:
    def ci(row):
        if pd.isna(row["ci_low"]):
            return f"{row['mean_d']:+.3f} (CI needs ≥ 2 seeds)"
        return f"{row['mean_d']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"

    return pd.DataFrame(
        {
            "split": table["split"],
            "predicted": table["predicted"],
            "per-seed A−B": table["per_seed_d"].map(lambda v: ", ".join(f"{x:+.3f}" for x in v)),
            "mean A−B [95% CI]": table.apply(ci, axis=1),
            "sign k/n": table["sign_consistency"],
            "verdict": table["verdict"],
        }
    )


@dg.asset(
    group_name="report",
    kinds={"pandas"},
    owners=versions.OWNERS,
    code_version=versions.source_version(sys.modules[__name__], plots, correspondence),
    ins={"group_dpo_run": dg.AssetIn(metadata={"allow_missing_partitions": True})},
    description="Per split: does the DPO difference between groups A and B (held-out accuracy primary) follow "
    "the direction the ordered logit predicted, over seeds, against the null control? Markdown table, "
    "parquet and learning-curve plots.",
)
def correspondence_table(
    context: dg.AssetExecutionContext,
    config: ReportConfig,
    dpo_settings: dpo.DpoSettings,
    group_dpo_run: dict,
    significant_splits: dict,
) -> dict:
    if not group_dpo_run:
        raise dg.Failure("no group_dpo_run partition has been materialized yet")
    splits = significant_splits["splits"]
    runs, left_out = current_runs(runs_table(group_dpo_run), significant_splits, dpo_settings.fingerprint())
    for reason, which in left_out.items():
        context.log.warning(f"runs left out of the table, {reason}: {which}")
    if runs.empty:
        raise dg.Failure(f"no group_dpo_run partition fits the current splits and DPO settings: {left_out}")
    diffs = correspondence.seed_differences(runs)
    table = correspondence.correspondence(diffs, splits)
    primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
    kept = set(zip(runs["cell"], runs["seed"]))
    curves = curves_table({key: run for key, run in group_dpo_run.items() if (run["cell"], int(run["seed"])) in kept})
    png = plots.learning_curve_plot(curves[curves["split"].notna()], splits, config.curve_metric)
    reports = Path(dpo_settings.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "learning_curves.png").write_bytes(png)
    secondary = {
        metric: markdown_table(_format_table(table[table["metric"] == metric]))
        for metric in correspondence.METRICS
        if metric != correspondence.PRIMARY_METRIC
    }
    context.add_output_metadata(
        {
            "correspondence": dg.MetadataValue.md(
                f"**Primary metric: {correspondence.METRICS[correspondence.PRIMARY_METRIC]}** "
                f"({len(runs)} runs, seeds {sorted(runs['seed'].unique().tolist())})\n\n"
                + markdown_table(_format_table(primary))
            ),
            "secondary_metrics": dg.MetadataValue.md(
                "\n\n".join(f"**{correspondence.METRICS[m]}**\n\n{t}" for m, t in secondary.items())
            ),
            "learning_curves": dg.MetadataValue.md(plots.markdown_image(png, "learning curves")),
            "learning_curves_png": dg.MetadataValue.path(str((reports / "learning_curves.png").resolve())),
            "num_runs": len(runs),
            "runs_left_out": dg.MetadataValue.json(left_out),
            "verdicts": dg.MetadataValue.json(dict(zip(primary["split"], primary["verdict"]))),
        }
    )
    return {"table": table, "seed_differences": diffs, "runs": runs}
