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

from prism_assets import cells, keys, partitions, plots, versions, writeup
from prism_assets.assets.data import markdown_table
from prism_assets.experiments import Experiment
from prism_assets.statistics import correspondence
from prism_assets.training.run_folder import write_atomic
from prism_assets.training.settings import LEARNS, TrainingSettings, fields_where, fingerprint
from resources.prism_source import SYNTHETIC
from resources.storage import DpoStorage


class ReportConfig(dg.Config):
    curve_metric: Literal[
        "heldout_acc", "heldout_margin", "pref_acc", "margin", "loss", "reward_chosen", "reward_rejected"
    ] = "heldout_acc"  # the curve column the learning-curve plots draw


# Every metric of a run the table and the write-up read.
RUN_METRICS = list(dict.fromkeys([*correspondence.METRICS, *correspondence.EVAL_SE.values(), *writeup.DETAIL_METRICS]))


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
            **{m: run["metrics"].get(m) for m in RUN_METRICS},
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
    expected = {(s, g): cells.membership_digest(splits, s, g) for s in names for g in partitions.GROUPS}
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


def experiment_table(
    context: dg.AssetExecutionContext, experiment: Experiment, group_dpo_run: dict, significant_splits: dict
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """One experiment's (correspondence rows, seed differences, runs, curves, runs left out by reason)."""
    runs, left_out = (
        current_runs(runs_table(group_dpo_run), significant_splits, fingerprint(experiment.settings))
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
        split: tuple(cells.membership_digest(splits, split, group) for group in partitions.GROUPS)
        for split in predicted  # random splits are draws of the null: nothing to compare
    }


def build_correspondence_table(experiments: list[Experiment]) -> dg.AssetsDefinition:
    """`correspondence_table`: every experiment's table, and the splits experiments share compared side by side."""
    ins = {
        **{
            f"{e.name}__runs": dg.AssetIn(key=keys.group_dpo_run(e.name), metadata={"allow_missing_partitions": True})
            for e in experiments
        },
        **{f"{e.name}__splits": dg.AssetIn(key=keys.significant_splits(e.name)) for e in experiments},
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
        context: dg.AssetExecutionContext, config: ReportConfig, dpo_storage: DpoStorage, **inputs
    ) -> dict:
        reports = Path(dpo_storage.reports_dir)
        metadata: dict = {}
        tables, diffs, runs, all_curves, primaries, groups = [], [], [], [], {}, {}
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
            all_curves.append(curves.assign(experiment=name))
            primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
            primaries[name], groups[name] = primary, split_groups(splits)
            png = plots.learning_curve_plot(curves[curves["split"].notna()], splits["splits"], config.curve_metric)
            (reports / name).mkdir(parents=True, exist_ok=True)
            (reports / name / "learning_curves.png").write_bytes(png)
            metadata[name] = dg.MetadataValue.md(
                f"**{experiment.description}** — primary metric: "
                f"{correspondence.METRICS[correspondence.PRIMARY_METRIC]} ({len(run)} runs, seeds "
                f"{sorted(run['seed'].unique().tolist())})\n\n" + markdown_table(writeup.summary_display(primary))
            )
            metadata[f"{name}__secondary_metrics"] = dg.MetadataValue.md(
                "\n\n".join(
                    f"**{correspondence.METRICS[m]}**\n\n"
                    + markdown_table(writeup.summary_display(table[table["metric"] == m]))
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
            markdown_table(writeup.comparison_display(comparison))
            if not comparison.empty
            else "no split is shared by two experiments"
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
            "curves": pd.concat(all_curves, ignore_index=True),
        }

    return correspondence_table


REPORT_FILES = {"markdown": "report.md", "html": "report.html", "figures": "figures"}


def build_research_report(experiments: list[Experiment]) -> dg.AssetsDefinition:
    """`research_report`: the write-up of every experiment (`writeup`), as markdown and self-contained HTML under
    `reports_dir`. Materialized again only when what it is made of changed (a digest of its inputs)."""
    ins = {
        "correspondence_table": dg.AssetIn(),
        "raw_prism": dg.AssetIn(),
        "within_model_pairs": dg.AssetIn(),
        **{f"{e.name}__fit": dg.AssetIn(key=keys.ordered_logit_fit(e.name)) for e in experiments},
        **{f"{e.name}__splits": dg.AssetIn(key=keys.significant_splits(e.name)) for e in experiments},
    }
    code_version = versions.source_version(sys.modules[__name__], writeup, plots, correspondence)
    shown = fields_where(TrainingSettings, LEARNS)  # the settings the write-up shows, not where runs report to
    described = {
        e.name: {
            "settings": e.settings.model_dump(mode="json", include=set(shown)),
            "spec": e.spec.model_dump(mode="json"),
        }
        for e in experiments
    }
    code_version += "-" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:8]

    @dg.asset(
        group_name="report",
        kinds={"html"},
        owners=versions.OWNERS,
        code_version=code_version,
        ins=ins,
        output_required=False,  # nothing new to say: no new materialization
        description="The write-up researchers read, for every experiment: setup, splits, baseline, group comparison, "
        "a table per split, the correspondence check, the experiments compared and observations. Markdown and a "
        "self-contained HTML file under storage/reports/.",
    )
    def research_report(context: dg.AssetExecutionContext, config: ReportConfig, dpo_storage: DpoStorage, **inputs):
        table = inputs["correspondence_table"]
        pairs, raw = inputs["within_model_pairs"], inputs["raw_prism"]
        data = {
            "source": raw["source"],
            "synthetic": str(raw["source"]).startswith(SYNTHETIC),
            "dropped_rows": int(sum(raw["dropped"].values())),
            "survey": len(raw["survey"]),
            "conversations": len(raw["conversations"]),
            "utterances": len(raw["utterances"]),
            "pairs": len(pairs),
            "users_with_pairs": int(pairs["user_id"].nunique()),
            "median_gap": float(pairs["score_gap"].median()),
            "mean_gap": float(pairs["score_gap"].mean()),
        }
        results = [
            _experiment_results(e, table, inputs[f"{e.name}__fit"], inputs[f"{e.name}__splits"]["splits"])
            for e in experiments
            if (table["table"]["experiment"] == e.name).any()
        ]
        digest = _digest(code_version, config.curve_metric, data, table, [r.fit for r in results], results)
        reports = Path(dpo_storage.reports_dir)
        paths = {kind: reports / name for kind, name in REPORT_FILES.items()}
        latest = context.instance.get_latest_materialization_event(context.asset_key)
        last = (
            latest.asset_materialization.metadata.get("inputs_digest")
            if latest and latest.asset_materialization
            else None
        )
        if last is not None and last.value == digest and paths["markdown"].exists() and paths["html"].exists():
            context.log.info(f"research_report: its inputs are unchanged since {paths['markdown']} was written; kept")
            return
        built = writeup.build(data, results, table["comparison"], config.curve_metric)
        paths["figures"].mkdir(parents=True, exist_ok=True)
        for name, png in built.document.figures.items():
            (paths["figures"] / name).write_bytes(png)
        write_atomic(paths["markdown"], built.document.markdown(REPORT_FILES["figures"]))
        write_atomic(paths["html"], built.document.html("PRISM DPO splits: the write-up"))
        context.log.info(f"research_report written: {paths['html']}")
        yield dg.Output(
            {**built.tables, "markdown": str(paths["markdown"]), "html": str(paths["html"]), "inputs_digest": digest},
            data_version=dg.DataVersion(digest),
            metadata={
                "html": dg.MetadataValue.path(str(paths["html"])),
                "markdown": dg.MetadataValue.path(str(paths["markdown"])),
                "inputs_digest": digest,
                "experiments": dg.MetadataValue.json([r.name for r in results]),
                "report": dg.MetadataValue.md(built.document.markdown(None)),
            },
        )

    return research_report


def _experiment_results(
    experiment: Experiment, table: dict, fit: dict, splits: pd.DataFrame
) -> writeup.ExperimentResults:
    name = experiment.name
    learns = fields_where(TrainingSettings, LEARNS)
    settings = experiment.settings.model_dump()
    return writeup.ExperimentResults(
        name=name,
        description=experiment.description,
        base_model=experiment.settings.base_model,
        hyperparameters={k: settings[k] for k in learns if k != "base_model"},
        spec=experiment.spec.model_dump(),
        fit=fit,
        splits=splits,
        table=table["table"][table["table"]["experiment"] == name].reset_index(drop=True),
        runs=table["runs"][table["runs"]["experiment"] == name].reset_index(drop=True),
        curves=table["curves"][table["curves"]["experiment"] == name].reset_index(drop=True),
    )


def _digest(*parts) -> str:
    """A digest of what the write-up is made of: DataFrames by their JSON, everything else by its repr."""

    def canonical(value):
        if isinstance(value, pd.DataFrame):
            return value.to_json(orient="split", date_format="iso", default_handler=str)
        if isinstance(value, dict):
            return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, list | tuple):
            return [canonical(v) for v in value]
        if isinstance(value, writeup.ExperimentResults):
            return canonical(vars(value))
        return repr(value)

    return hashlib.sha256(json.dumps(canonical(list(parts))).encode()).hexdigest()[:24]
