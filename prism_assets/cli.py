"""The project CLI. `python -m prism_assets run`: materialize the whole pipeline, every DPO partition included.

Dagster's CLI refuses partitioned assets without `--partition`, so the main job has this entry
point. It materializes the data and statistics assets, registers the seeds, materializes every
`group_dpo_run` partition (cell × seed; `--parallel` at a time, each its own Dagster run), then
`correspondence_table` — all through Dagster's API into the instance at DAGSTER_HOME, so `dagster dev`
shows every run.
"""

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import dagster as dg


def materialize_partition(cell: str, seed: str) -> tuple[str, bool]:
    """One group_dpo_run partition as its own Dagster run (in a worker process: Dagster's in-process
    execution is not thread-safe, and a worker imports the project once for all its partitions)."""
    from prism_assets import partitions
    from prism_assets.definitions import ASSETS, RESOURCES

    key = dg.MultiPartitionKey({partitions.CELL: cell, partitions.SEED: seed})
    result = dg.materialize(
        ASSETS,
        selection=[dg.AssetKey("group_dpo_run")],
        partition_key=key,
        instance=dg.DagsterInstance.get(),
        resources=RESOURCES,
        raise_on_error=False,
    )
    return str(key), result.success


def run(args: argparse.Namespace) -> int:
    # Runs side by side share the cores: one run's torch threads must not oversubscribe them.
    os.environ.setdefault("DPO_THREADS_PER_RUN", str(max(1, (os.cpu_count() or 1) // args.parallel)))
    from prism_assets import partitions

    try:
        from prism_assets.definitions import ASSETS, CHECKS, DPO_SETTINGS, RESOURCES, UNPARTITIONED
    except ValueError as error:  # a setting in the environment: one line naming it, not a traceback
        print(f"prism_assets: {error}", file=sys.stderr)
        return 2
    from resources.launcher import LocalLauncher

    instance = dg.DagsterInstance.get()
    started = time.perf_counter()
    run_config = {"ops": {"significant_splits": {"config": {"preset": args.preset}}}} if args.preset else None
    # The reference precompute runs alone in this phase: a local one may use every core.
    alone = (
        {**RESOURCES, "launcher": LocalLauncher()} if isinstance(RESOURCES["launcher"], LocalLauncher) else RESOURCES
    )
    result = dg.materialize(
        [*UNPARTITIONED, *CHECKS], instance=instance, resources=alone, run_config=run_config, raise_on_error=False
    )
    if not result.success:
        print(f"run {result.run_id} failed; see `dagster dev` or the log above", file=sys.stderr)
        return 1
    splits = result.output_for_node("significant_splits")["splits"]
    print(splits[["split", "predicted", "users_a", "users_b", "pairs_a", "pairs_b"]].to_string(index=False))
    print(f"data and statistics: {time.perf_counter() - started:.1f} s")

    seeds = [partitions.seed_key(s) for s in range(args.seeds)]
    known = set(instance.get_dynamic_partitions(partitions.SEED))
    instance.add_dynamic_partitions(partitions.SEED, [s for s in seeds if s not in known])
    cells = instance.get_dynamic_partitions(partitions.CELL)
    keys = [(cell, seed) for cell in cells for seed in seeds]
    DPO_SETTINGS.resolved_base_model()  # build the tiny model once, before runs start in parallel
    failed = []
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done, (key, success) in enumerate(pool.map(materialize_partition, *zip(*keys)), start=1):
            print(
                f"[{done}/{len(keys)}] group_dpo_run {key}: {'ok' if success else 'FAILED'} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if not success:
                failed.append(key)
    table = dg.materialize(
        ASSETS,
        selection=[dg.AssetKey("correspondence_table")],
        instance=instance,
        resources=RESOURCES,
        raise_on_error=False,
    )
    if not table.success:
        print("correspondence_table failed", file=sys.stderr)
        return 1
    primary = table.output_for_node("correspondence_table")["table"]
    primary = primary[primary["metric"] == "mean_heldout_acc_tail"]
    print(
        primary[
            ["split", "predicted", "n_seeds", "mean_d", "ci_low", "ci_high", "sign_consistency", "verdict"]
        ].to_string(index=False, float_format=lambda v: f"{v:+.3f}")
    )
    print(
        f"main job finished in {time.perf_counter() - started:.0f} s; "
        f"{len(failed)} DPO partitions failed {failed or ''}"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prism_assets")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="materialize every asset and DPO partition into DAGSTER_HOME")
    run_parser.add_argument("--preset", choices=["auto", "v3"], default=None, help="split preset (default: auto)")
    run_parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every DPO cell (default 3)")
    run_parser.add_argument("--parallel", type=int, default=2, help="DPO partitions run at once (default 2)")
    args = parser.parse_args(argv)
    return run(args)
