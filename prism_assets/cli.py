"""The project CLI. `python -m prism_assets run`: materialize the whole pipeline, every DPO partition included.

Dagster's CLI refuses partitioned assets without `--partition`, so the main job has this entry point. It
materializes the data and every experiment's statistics, registers the seeds, materializes every experiment's
`group_dpo_run` partitions (cell × seed; `--parallel` at a time, each its own Dagster run; experiment after
experiment, so a run two experiments share is trained by the first and adopted by the second), then
`correspondence_table` — all through Dagster's API into the instance at DAGSTER_HOME, so `dagster dev` shows every
run.
"""

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg


def materialize_partition(experiment: str, cell: str, seed: str) -> tuple[str, bool, bool]:
    """One group_dpo_run partition as its own Dagster run (in a worker process: Dagster's in-process execution is
    not thread-safe, and a worker imports the project once for all its partitions): (key, success, trained)."""
    from prism_assets import partitions
    from prism_assets.definitions import ASSETS, RESOURCES

    result = dg.materialize(
        ASSETS,
        selection=[dg.AssetKey([experiment, "group_dpo_run"])],
        partition_key=partitions.partition_key(cell, seed),
        instance=dg.DagsterInstance.get(),
        resources=RESOURCES,
        raise_on_error=False,
        tags={"experiment": experiment},  # the UI's runs list shows whose run it is
    )
    events = result.get_asset_materialization_events() if result.success else []
    trained = bool(events) and bool(events[0].materialization.metadata["trained"].value)
    return f"{experiment}/{cell}|{seed}", result.success, trained


def _print_tables(output: dict) -> None:
    from prism_assets.statistics import correspondence

    table = output["table"]
    primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
    for experiment, rows in primary.groupby("experiment", sort=False):
        print(f"\n{experiment}: {correspondence.METRICS[correspondence.PRIMARY_METRIC]}")
        print(
            rows[
                ["split", "predicted", "n_seeds", "mean_d", "ci_low", "ci_high", "p_predicted", "p_adjusted"]
                + ["verdict", "mde", "seeds_needed", "heldout_needed"]
            ].to_string(index=False, float_format=lambda v: f"{v:.3g}")
        )
    comparison = output["comparison"]
    if not comparison.empty:
        print("\nsplits shared by two experiments (the same users in each group):")
        print(
            comparison[
                ["experiment_1", "split_1", "experiment_2", "split_2", "mean_d_1", "mean_d_2", "verdict_1"]
                + ["verdict_2", "direction"]
            ].to_string(index=False, float_format=lambda v: f"{v:+.3f}")
        )


def run(args: argparse.Namespace) -> int:
    # Runs side by side share the cores: one run's torch threads must not oversubscribe them.
    os.environ.setdefault("DPO_THREADS_PER_RUN", str(max(1, (os.cpu_count() or 1) // args.parallel)))
    if args.experiments:
        os.environ["PRISM_EXPERIMENTS"] = args.experiments  # the worker processes read it too
    from prism_assets import partitions
    from prism_assets.assets import report

    try:
        from prism_assets.definitions import ASSETS, CHECKS, EXPERIMENTS, RESOURCES, UNPARTITIONED
    except ValueError as error:  # a setting in the environment or the experiments file: one line, not a traceback
        print(f"prism_assets: {error}", file=sys.stderr)
        return 2
    from resources.launcher import LocalLauncher

    instance = dg.DagsterInstance.get()
    started = time.perf_counter()
    # The reference precompute runs alone in this phase: a local one may use every core.
    alone = (
        {**RESOURCES, "launcher": LocalLauncher()} if isinstance(RESOURCES["launcher"], LocalLauncher) else RESOURCES
    )
    result = dg.materialize([*UNPARTITIONED, *CHECKS], instance=instance, resources=alone, raise_on_error=False)
    if not result.success:
        print(f"run {result.run_id} failed; see `dagster dev` or the log above", file=sys.stderr)
        return 1
    for experiment in EXPERIMENTS:
        splits = result.output_for_node(f"{experiment.name}__significant_splits")["splits"]
        print(f"\n{experiment.description}")
        print(splits[["split", "predicted", "users_a", "users_b", "pairs_a", "pairs_b"]].to_string(index=False))
    print(f"data and statistics: {time.perf_counter() - started:.1f} s")

    seeds = [partitions.seed_key(s) for s in range(args.seeds)]
    known = set(instance.get_dynamic_partitions(partitions.SEED))
    instance.add_dynamic_partitions(partitions.SEED, [s for s in seeds if s not in known])
    keys = [
        (experiment.name, cell, seed)
        for experiment in EXPERIMENTS
        for cell in instance.get_dynamic_partitions(partitions.cells_name(experiment.name))
        for seed in seeds
    ]
    storage = RESOURCES["dpo_storage"]
    for experiment in EXPERIMENTS:  # build the tiny models once, before runs start in parallel
        storage.resolved_base_model(experiment.settings.base_model)
    failed, trained = [], 0
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done, (key, success, was_trained) in enumerate(pool.map(materialize_partition, *zip(*keys)), start=1):
            trained += was_trained
            print(
                f"[{done}/{len(keys)}] group_dpo_run {key}: "
                f"{('trained' if was_trained else 'shared') if success else 'FAILED'} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if not success:
                failed.append(key)
    table = dg.materialize(
        ASSETS,
        selection=[dg.AssetKey("correspondence_table"), dg.AssetKey("research_report")],
        instance=instance,
        resources=RESOURCES,
        raise_on_error=False,
    )
    if not table.success:
        print("correspondence_table or research_report failed", file=sys.stderr)
        return 1
    _print_tables(table.output_for_node("correspondence_table"))
    print(
        f"\nthe write-up: {Path(storage.reports_dir, report.REPORT_FILES['html']).resolve()} (and report.md beside it)"
    )
    print(
        f"\nmain job finished in {time.perf_counter() - started:.0f} s: {len(keys)} DPO partitions, {trained} trained "
        f"here, {len(keys) - trained - len(failed)} shared or already done; {len(failed)} failed {failed or ''}"
    )
    return 1 if failed else 0


def orphans(args: argparse.Namespace) -> int:
    from prism_assets import automation
    from prism_assets.definitions import RESOURCES
    from resources.slurm import SlurmLauncher

    launcher = RESOURCES["launcher"]
    if not isinstance(launcher, SlurmLauncher):
        print("prism_assets: orphans are SLURM jobs; set DPO_LAUNCHER=slurm (and PRISM_SLURM_*)", file=sys.stderr)
        return 2
    found = launcher.orphans(dg.DagsterInstance.get(), Path(RESOURCES["dpo_storage"].runs_dir))
    cancelled = [orphan["job_id"] for orphan in found] if args.cancel else []
    for job in cancelled:
        launcher.commands.run(["scancel", job], check=False)
    print(automation.orphans_report(found, cancelled))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prism_assets")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="materialize every asset and DPO partition into DAGSTER_HOME")
    run_parser.add_argument(
        "--experiments", default=None, help="comma-separated experiments of experiments.toml (default: the enabled)"
    )
    run_parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every DPO cell (default 3)")
    run_parser.add_argument("--parallel", type=int, default=2, help="DPO partitions run at once (default 2)")
    orphans_parser = commands.add_parser(
        "orphans", help="list the SLURM jobs no Dagster run follows (DPO_LAUNCHER=slurm); --cancel: scancel them"
    )
    orphans_parser.add_argument("--cancel", action="store_true", help="cancel every orphan now, whatever its grace")
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else orphans(args)
