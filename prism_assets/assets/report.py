"""Report asset: `correspondence_table`, built from every experiment's `group_dpo_run` partitions that exist.

Owns turning finished runs into what a researcher reads: per experiment, the per-split table (predicted direction,
per-seed A − B differences, mean ± 95% CI, sign consistency, the null control's difference, verdict) and PNG learning
curves of each split's groups (mean and min–max band over seeds); across experiments, every split two of them share
by definition compared side by side. Markdown and parquet, plots embedded and written under `reports_dir`.
"""

import hashlib
import json
import sys
from pathlib import Path
from typing import Literal

import dagster as dg
import pandas as pd

from prism_assets import partitions, plots, versions
from prism_assets.assets import dpo
from prism_assets.assets.data import markdown_table
from prism_assets.experiments import Experiment
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
            "run_id": run["run_id"],
            "membership_digest": run["membership_digest"],
            "settings_fingerprint": run["settings_fingerprint"],
            **{m: run["metrics"].get(m) for m in [*correspondence.METRICS, *set(correspondence.EVAL_SE.values())]},
            "num_heldout_pairs": run["metrics"].get("num_heldout_pairs"),
            "gpu_hours": (run.get("cost") or {}).get("gpu_hours"),  # None: the launcher recorded no cost
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


def _power(row) -> str:
    if pd.isna(row["mde"]):
        return "—"
    line = f"MDE {row['mde']:.3f}" + (f" with {row['planned_seeds']:.0f} seeds" if row["n_seeds"] == 0 else "")
    if pd.isna(row["effect_for_seeds"]) or pd.isna(row["seeds_needed"]):
        return line
    if row["seeds_needed"] == float("inf"):
        needed = f"{row['heldout_needed']:.0f} held-out pairs per group"
        return f"{line}; {row['effect_for_seeds']:.3f}: not reachable by seeds (needs {needed})"
    return f"{line}; {row['effect_for_seeds']:.3f} needs {row['seeds_needed']:.0f} seeds"


def _format_table(table: pd.DataFrame) -> pd.DataFrame:
    def ci(row):
        if pd.isna(row["mean_d"]):
            return "no runs"
        if pd.isna(row["ci_low"]):
            return f"{row['mean_d']:+.3f}"
        return f"{row['mean_d']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"

    def p(value):
        return "—" if pd.isna(value) else f"{value:.3g}"

    return pd.DataFrame(
        {
            "split": table["split"],
            "predicted": table["predicted"],
            "per-seed A−B": table["per_seed_d"].map(lambda v: ", ".join(f"{x:+.3f}" for x in v)),
            "mean A−B [95% CI]": table.apply(ci, axis=1),
            "sign k/n": table["sign_consistency"],
            "z": table["z"].map(lambda v: "—" if pd.isna(v) else f"{v:+.2f}"),
            "p (predicted side)": table["p_predicted"].map(p),
            "p (Holm)": table["p_adjusted"].map(p),
            "verdict": table["verdict"],
            "power": table.apply(_power, axis=1),
        }
    )


def experiment_table(
    context: dg.AssetExecutionContext, experiment: Experiment, group_dpo_run: dict, significant_splits: dict
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """One experiment's (correspondence rows, seed differences, runs, curves, runs left out by reason)."""
    runs, left_out = (
        current_runs(runs_table(group_dpo_run), significant_splits, dpo.fingerprint(experiment.settings))
        if group_dpo_run
        else (pd.DataFrame(), {})
    )
    for reason, which in left_out.items():
        context.log.warning(f"{experiment.name}: runs left out of the table, {reason}: {which}")
    if runs.empty:
        context.log.warning(f"{experiment.name}: no DPO run fits its current splits and settings yet")
        return pd.DataFrame(), pd.DataFrame(), runs, pd.DataFrame(), left_out
    diffs = correspondence.seed_differences(runs)
    splits = significant_splits["splits"]
    table = correspondence.correspondence(
        diffs, splits, experiment.spec.verdict_alpha, heldout_sizes(runs), planned_heldout(splits, experiment.settings)
    )
    kept = set(zip(runs["cell"], runs["seed"]))
    curves = curves_table({key: run for key, run in group_dpo_run.items() if (run["cell"], int(run["seed"])) in kept})
    return table, diffs, runs, curves, left_out


def heldout_sizes(runs: pd.DataFrame) -> dict[str, float]:
    """split → its groups' held-out pairs, harmonic mean (the d's held-out variance goes as 1/h_A + 1/h_B)."""
    groups = runs[runs["split"].notna()]
    return (1 / (1 / groups["num_heldout_pairs"].astype(float)).groupby(groups["split"]).mean()).to_dict()


def planned_heldout(splits: pd.DataFrame, settings) -> dict[str, float]:
    """split → held-out pairs per group (harmonic mean) it would have, for the splits too small to be trained."""
    if "trained" not in splits:
        return {}
    untrained = splits[~splits["trained"]]
    sizes = {
        group: (untrained[f"pairs_{group}"] * settings.heldout_fraction).clip(1, settings.heldout_max_pairs)
        for group in ("a", "b")
    }
    return dict(zip(untrained["split"], 2 / (1 / sizes["a"] + 1 / sizes["b"])))


def split_groups(splits: dict) -> dict[str, tuple]:
    """split → (digest of A's users, digest of B's users): what makes two experiments' splits the same."""
    table = splits["splits"]
    predicted = table["split"] if "random" not in table else table.loc[~table["random"], "split"]
    return {
        split: tuple(dpo.membership_digest(splits, split, group) for group in partitions.GROUPS)
        for split in predicted  # random splits are draws of the null: nothing to compare
    }


def _comparison_markdown(comparison: pd.DataFrame) -> str:
    def ci(mean, low, high):
        return f"{mean:+.3f}" + ("" if pd.isna(low) else f" [{low:+.3f}, {high:+.3f}]")

    return markdown_table(
        pd.DataFrame(
            {
                "experiments": comparison["experiment_1"] + " / " + comparison["experiment_2"],
                "split": comparison["split_1"] + " / " + comparison["split_2"],
                "predicted": comparison["predicted_1"] + " / " + comparison["predicted_2"],
                "mean A−B [95% CI] (1)": [
                    ci(*v) for v in zip(comparison["mean_d_1"], comparison["ci_low_1"], comparison["ci_high_1"])
                ],
                "mean A−B [95% CI] (2)": [
                    ci(*v) for v in zip(comparison["mean_d_2"], comparison["ci_low_2"], comparison["ci_high_2"])
                ],
                "verdicts": comparison["verdict_1"] + " / " + comparison["verdict_2"],
                "direction": comparison["direction"],
            }
        )
    )


def build_correspondence_table(experiments: list[Experiment]) -> dg.AssetsDefinition:
    """`correspondence_table`: every experiment's table, and the splits experiments share compared side by side."""
    ins = {
        **{
            f"{e.name}__runs": dg.AssetIn(key=[e.name, "group_dpo_run"], metadata={"allow_missing_partitions": True})
            for e in experiments
        },
        **{f"{e.name}__splits": dg.AssetIn(key=[e.name, "significant_splits"]) for e in experiments},
    }

    @dg.asset(
        group_name="report",
        kinds={"pandas"},
        owners=versions.OWNERS,
        # the verdicts' α of every experiment is part of what the table computes
        code_version=versions.source_version(sys.modules[__name__], plots, correspondence)
        + "-"
        + hashlib.sha256(json.dumps({e.name: e.spec.verdict_alpha for e in experiments}).encode()).hexdigest()[:8],
        ins=ins,
        description="Per experiment and split: does the DPO difference between groups A and B (held-out accuracy "
        "primary) follow the direction the ordered logit predicted, over seeds, against the null control? And "
        "for every split two experiments share (the same users in each group): both verdicts side by side, "
        "stable or flipped. Markdown tables, parquet and plots.",
    )
    def correspondence_table(
        context: dg.AssetExecutionContext, config: ReportConfig, dpo_storage: dpo.DpoStorage, **inputs
    ) -> dict:
        reports = Path(dpo_storage.reports_dir)
        metadata: dict = {}
        tables, diffs, runs, primaries, groups = [], [], [], {}, {}
        for experiment in experiments:
            name = experiment.name
            splits = inputs[f"{name}__splits"]
            table, diff, run, curves, left_out = experiment_table(context, experiment, inputs[f"{name}__runs"], splits)
            metadata[f"{name}__runs_left_out"] = dg.MetadataValue.json(left_out)
            if table.empty:
                continue
            tables.append(table.assign(experiment=name))
            diffs.append(diff.assign(experiment=name))
            runs.append(run.assign(experiment=name))
            primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
            primaries[name], groups[name] = primary, split_groups(splits)
            png = plots.learning_curve_plot(curves[curves["split"].notna()], splits["splits"], config.curve_metric)
            (reports / name).mkdir(parents=True, exist_ok=True)
            (reports / name / "learning_curves.png").write_bytes(png)
            metadata[name] = dg.MetadataValue.md(
                f"**{experiment.description}** — primary metric: "
                f"{correspondence.METRICS[correspondence.PRIMARY_METRIC]} ({len(run)} runs, seeds "
                f"{sorted(run['seed'].unique().tolist())})\n\n" + markdown_table(_format_table(primary))
            )
            metadata[f"{name}__secondary_metrics"] = dg.MetadataValue.md(
                "\n\n".join(
                    f"**{correspondence.METRICS[m]}**\n\n{markdown_table(_format_table(table[table['metric'] == m]))}"
                    for m in correspondence.METRICS
                    if m != correspondence.PRIMARY_METRIC
                )
            )
            metadata[f"{name}__learning_curves"] = dg.MetadataValue.md(plots.markdown_image(png, "learning curves"))
            null_png = plots.null_plot(table, correspondence.METRICS, experiment.spec.verdict_alpha)
            (reports / name / "null.png").write_bytes(null_png)
            metadata[f"{name}__null"] = dg.MetadataValue.md(plots.markdown_image(null_png, "splits against the null"))
            metadata[f"{name}__verdicts"] = dg.MetadataValue.json(dict(zip(primary["split"], primary["verdict"])))
        if not tables:
            raise dg.Failure("no experiment has a DPO run that fits its current splits and settings yet")
        comparison = correspondence.compare_experiments(primaries, groups)
        if not comparison.empty:
            png = plots.comparison_plot(comparison, correspondence.METRICS[correspondence.PRIMARY_METRIC])
            (reports / "comparison.png").write_bytes(png)
            metadata["comparison_plot"] = dg.MetadataValue.md(plots.markdown_image(png, "comparison"))
        metadata["comparison"] = dg.MetadataValue.md(
            _comparison_markdown(comparison) if not comparison.empty else "no split is shared by two experiments"
        )
        all_runs = pd.concat(runs, ignore_index=True)
        metadata["num_runs"] = len(all_runs)
        distinct = all_runs.drop_duplicates(["run_id", "seed"])  # a shared run is paid for once
        metadata["num_distinct_runs"] = len(distinct)
        # What the grid cost where SLURM's accounting recorded it (a run's every job, failed attempts included).
        metadata["gpu_hours"] = float(distinct["gpu_hours"].sum())
        metadata["runs_with_cost"] = int(distinct["gpu_hours"].notna().sum())
        context.add_output_metadata(metadata)
        return {
            "table": pd.concat(tables, ignore_index=True),
            "seed_differences": pd.concat(diffs, ignore_index=True),
            "runs": all_runs,
            "comparison": comparison,
        }

    return correspondence_table
