"""`correspondence_table`: every experiment's verdicts, from the `group_dpo_run` partitions that exist.

The asset wires `provenance` (which runs count, and the grid they make) into `statistics.correspondence` (the test),
and shows the result: per experiment the table, what it rests on (runs, seeds, random splits, data, the runs' own
settings), learning curves and the null plot; across experiments, the splits two of them share. Markdown and
parquet, plots embedded and written under `reports_dir`.
"""

import hashlib
import json
import sys
from pathlib import Path
from typing import Literal

import dagster as dg
import pandas as pd

from prism_assets import cells, keys, partitions, plots, provenance, versions, writeup
from prism_assets.assets.data import markdown_table
from prism_assets.experiments import VERDICT_FIELDS, Experiment
from prism_assets.statistics import calibration, correspondence
from prism_assets.training import run_folder as folder
from prism_assets.training.settings import LEARNING_FIELDS, fingerprint
from resources.storage import DpoStorage


class ReportConfig(dg.Config):
    curve_metric: Literal[
        "heldout_acc", "heldout_margin", "pref_acc", "margin", "loss", "reward_chosen", "reward_rejected"
    ] = "pref_acc"  # the curve column the learning-curve plots draw (held-out: only where evaluated)


# Every metric of a run the table and the write-up read.
RUN_METRICS = list(dict.fromkeys([*correspondence.METRICS, *writeup.DETAIL_METRICS, "heldout_acc_se"]))


def heldout_results(runs: dict, kept: pd.DataFrame) -> pd.DataFrame:
    """The kept runs' per-pair held-out results at the steps the primary metric reads, with their cell and seed."""
    wanted = set(zip(kept["cell"], kept["seed"]))
    frames = [
        run["heldout"].assign(
            cell=run["cell"],
            split=run["split"],
            group=run["group"],
            seed=int(run["seed"]),
            correct=lambda f: f["margin"] > 0,
        )
        for run in runs.values()
        if (run["cell"], int(run["seed"])) in wanted
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def curves_table(runs: dict, kept: pd.DataFrame) -> pd.DataFrame:
    wanted = set(zip(kept["cell"], kept["seed"]))
    frames = [
        run["curve"].assign(cell=run["cell"], split=run["split"], group=run["group"], seed=int(run["seed"]))
        for run in runs.values()
        if (run["cell"], int(run["seed"])) in wanted
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_settings(runs: dict, kept: pd.DataFrame) -> dict:
    """The DPO settings the kept runs ran with, from their own records (run.json): one set, by construction."""
    for run in runs.values():
        if (run["cell"], int(run["seed"])) in set(zip(kept["cell"], kept["seed"])):
            record = run["run_config"]
            return {name: record.get(name) for name in LEARNING_FIELDS}
    return {}


def split_groups(splits: dict) -> dict[str, tuple]:
    """split → (digest of A's users, digest of B's users): what makes two experiments' splits the same."""
    table = splits["splits"]
    predicted = table.loc[~table["random"], "split"]
    return {
        split: tuple(cells.membership_digest(splits, split, group) for group in partitions.GROUPS)
        for split in predicted  # random splits are draws of the null: nothing to compare
    }


def split_run_ids(runs: pd.DataFrame) -> dict[str, frozenset]:
    """split → the ids and seeds of the runs its numbers rest on (two experiments sharing them measured once)."""
    grouped = runs[runs["split"].notna()]
    return {
        split: frozenset(zip(rows["group"], rows["run_id"], rows["seed"]))
        for split, rows in grouped.groupby("split", sort=False)
    }


def experiment_result(
    context: dg.AssetExecutionContext, experiment: Experiment, values: dict, splits: dict, data_digest: str
) -> dict:
    """One experiment's table, seed differences, kept runs, curves and the basis they rest on."""
    spec = experiment.spec
    runs = provenance.runs_table(values, RUN_METRICS)
    kept, left_out = provenance.current_runs(runs, splits, fingerprint(experiment.settings), data_digest)
    for why, which in left_out.items():
        context.log.warning(f"{experiment.name}: runs left out of the table, {why}: {which}")
    split_table = splits["splits"]
    grid = provenance.grid(kept, split_table, spec.random_splits)
    reason = grid.completeness.reason()
    if reason:
        context.log.warning(f"{experiment.name}: {reason}; no verdicts (missing: {grid.missing[:20]})")
    users = calibration.user_table(heldout_results(values, kept), splits["membership"])
    table, diffs = correspondence.correspondence(
        users,
        kept,
        split_table,
        spec.verdict_alpha,
        grid.completeness,
        spec.min_effect,
        experiment.settings.heldout_share,
    )
    basis = {
        "experiment": experiment.name,
        "runs": len(kept),
        "seeds": json.dumps(grid.seeds),
        "random_done": grid.completeness.random_done,
        "random_expected": grid.completeness.random_expected,
        "splits_done": grid.completeness.predicted_done,
        "splits_expected": grid.completeness.predicted_expected,
        "complete": grid.completeness.complete,
        "reason": reason or "",
        "missing": json.dumps(grid.missing),
        "left_out": json.dumps(left_out),
        "data_digest": data_digest,
        "settings_fingerprint": fingerprint(experiment.settings),
        "settings": json.dumps(run_settings(values, kept), default=str),
        "verdict_alpha": spec.verdict_alpha,
        "min_effect": spec.min_effect,
        "heldout_share": experiment.settings.heldout_share,
    }
    return {
        "table": table,
        "diffs": diffs,
        "runs": kept,
        "curves": curves_table(values, kept),
        "basis": basis,
        "run_ids": split_run_ids(kept),
    }


def basis_line(basis: dict) -> str:
    """What a table rests on, in one line."""
    seeds = json.loads(basis["seeds"])
    line = (
        f"{basis['runs']} runs, seeds {seeds}, {basis['random_done']} of {basis['random_expected']} random splits, "
        f"{basis['splits_done']} of {basis['splits_expected']} splits; pairs {basis['data_digest'][:12]}"
    )
    return line + (f" — **{basis['reason']}: no verdicts**" if basis["reason"] else "")


def build_correspondence_table(experiments: list[Experiment]) -> dg.AssetsDefinition:
    """`correspondence_table`: every experiment's table, and the splits experiments share compared side by side."""
    ins = {
        "within_model_pairs": dg.AssetIn(),
        **{
            f"{e.name}__runs": dg.AssetIn(key=keys.group_dpo_run(e.name), metadata={"allow_missing_partitions": True})
            for e in experiments
        },
        **{f"{e.name}__splits": dg.AssetIn(key=keys.significant_splits(e.name)) for e in experiments},
    }
    # what the verdicts depend on beyond the runs: each experiment's α, min_effect and settings
    verdicts = {e.name: {**e.spec.fields(VERDICT_FIELDS), "settings": fingerprint(e.settings)} for e in experiments}

    @dg.asset(
        group_name="report",
        kinds={"pandas"},
        owners=versions.OWNERS,
        code_version=versions.source_version(sys.modules[__name__], plots, provenance, correspondence)
        + "-"
        + hashlib.sha256(json.dumps(verdicts, sort_keys=True).encode()).hexdigest()[:8],
        ins=ins,
        description="Per experiment and split: does the DPO difference between groups A and B (held-out accuracy "
        "primary) follow the direction the ordered logit predicted, over seeds, against a calibrated null of random "
        "splits? Only over a complete grid; what each table rests on is stated. For every split two experiments "
        "share: both side by side. Markdown tables, parquet and plots.",
    )
    def correspondence_table(
        context: dg.AssetExecutionContext, config: ReportConfig, dpo_storage: DpoStorage, **inputs
    ) -> dict:
        reports = Path(dpo_storage.reports_dir)
        pairs = inputs["within_model_pairs"]
        data_digest = folder.pairs_digest(pairs["pair_id"], folder.text_digests(pairs))
        metadata: dict = {}
        results, primaries, groups, run_ids = {}, {}, {}, {}
        for experiment in experiments:
            name = experiment.name
            splits = inputs[f"{name}__splits"]
            result = experiment_result(context, experiment, inputs[f"{name}__runs"], splits, data_digest)
            metadata[f"{name}__runs_left_out"] = dg.MetadataValue.json(json.loads(result["basis"]["left_out"]))
            metadata[f"{name}__basis"] = basis_line(result["basis"])
            if result["runs"].empty:
                context.log.warning(f"{name}: no DPO run fits its current splits, settings and data yet")
                continue
            results[name] = result
            table = result["table"]
            primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
            primaries[name], groups[name], run_ids[name] = primary, split_groups(splits), result["run_ids"]
            curves = result["curves"]
            png = plots.learning_curve_plot(curves[curves["split"].notna()], splits["splits"], config.curve_metric)
            (reports / name).mkdir(parents=True, exist_ok=True)
            (reports / name / "learning_curves.png").write_bytes(png)
            metadata[name] = dg.MetadataValue.md(
                f"**{experiment.description}** — {correspondence.METRICS[correspondence.PRIMARY_METRIC]}; "
                f"{basis_line(result['basis'])}\n\n" + markdown_table(writeup.summary_display(primary))
            )
            metadata[f"{name}__secondary_metrics"] = dg.MetadataValue.md(
                "Exploratory (no verdicts):\n\n"
                + "\n\n".join(
                    f"**{correspondence.METRICS[m]}**\n\n"
                    + markdown_table(writeup.estimate_display(table[table["metric"] == m]))
                    for m in correspondence.SECONDARY
                )
            )
            metadata[f"{name}__learning_curves"] = dg.MetadataValue.md(plots.markdown_image(png, "learning curves"))
            null_png = plots.null_plot(
                primary, correspondence.METRICS[correspondence.PRIMARY_METRIC], experiment.spec.verdict_alpha
            )
            (reports / name / "null.png").write_bytes(null_png)
            metadata[f"{name}__null"] = dg.MetadataValue.md(plots.markdown_image(null_png, "splits against the null"))
            metadata[f"{name}__verdicts"] = dg.MetadataValue.json(dict(zip(primary["split"], primary["verdict"])))
        if not results:
            raise dg.Failure("no experiment has a DPO run that fits its current splits, settings and data yet")
        comparison = correspondence.compare_experiments(primaries, groups, run_ids)
        if not comparison.empty:
            png = plots.comparison_plot(comparison, correspondence.METRICS[correspondence.PRIMARY_METRIC])
            (reports / "comparison.png").write_bytes(png)
            metadata["comparison_plot"] = dg.MetadataValue.md(plots.markdown_image(png, "comparison"))
        metadata["comparison"] = dg.MetadataValue.md(
            markdown_table(writeup.comparison_display(comparison))
            if not comparison.empty
            else "no split is shared by two experiments"
        )
        all_runs = pd.concat([r["runs"].assign(experiment=n) for n, r in results.items()], ignore_index=True)
        metadata["num_runs"] = len(all_runs)
        distinct = all_runs.drop_duplicates(["run_id", "seed"])  # a shared run is paid for once
        metadata["num_distinct_runs"] = len(distinct)
        # What the grid cost where SLURM's accounting recorded it (a run's every job, failed attempts included).
        metadata["gpu_hours"] = float(distinct["gpu_hours"].sum())
        metadata["runs_with_cost"] = int(distinct["gpu_hours"].notna().sum())
        metadata["complete"] = all(r["basis"]["complete"] for r in results.values())
        context.add_output_metadata(metadata)

        def joined(part: str) -> pd.DataFrame:
            return pd.concat([r[part].assign(experiment=n) for n, r in results.items()], ignore_index=True)

        return {
            "table": joined("table"),
            "seed_differences": joined("diffs"),
            "runs": all_runs,
            "comparison": comparison,
            "curves": joined("curves"),
            "basis": pd.DataFrame([r["basis"] for r in results.values()]),
        }

    return correspondence_table
