"""The project CLI: `python -m prism_assets run | orphans | settings`.

`run` is the main job. Dagster's CLI refuses partitioned assets without `--partition`, so it has this entry point: it
materializes the data and every experiment's statistics, registers the seeds, materializes every experiment's
`group_dpo_run` partitions (cell × seed; `--parallel` at a time, each its own Dagster run, in worker processes that get
the settings as an argument; experiment after experiment, so a run two experiments share is trained by the first and
adopted by the second), then `correspondence_table` and `research_report` — all through Dagster's API into the
instance at DAGSTER_HOME, so `dagster dev` shows every run. Before anything else it marks failed the runs a killed main
job left unfinished and frees their pool slots (`dead_runs`); its workers die with it however it dies, and SIGTERM or
SIGINT stops it and them, interrupting their runs (`stopping`). `settings` prints every setting with its value and
where it came from; `orphans` lists (and cancels) SLURM jobs no Dagster run follows.
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import dagster as dg

from prism_assets import dead_runs, stopping
from prism_assets.platform import Configuration, PlatformSettings

_WORKER: dict = {}  # a worker process's code location, built once from its parent's configuration, and its signals
# How long the workers of a stopped main job have to interrupt their runs (a local trainer gets 30 s to checkpoint).
WORKER_GRACE_S = 90.0


def start_worker(configuration: Configuration, parent: int) -> None:
    """A worker's initializer: it dies with the main job (`parent`), builds its code location from the configuration
    the main job read (not the environment), and stops on SIGTERM or SIGINT."""
    stopping.end_with_parent(parent)
    from prism_assets.location import build

    _WORKER["location"] = build(configuration)
    _WORKER["signals"] = stopping.StopSignals()


def materialize_partition(experiment: str, cell: str, seed: str) -> tuple[str, bool, bool]:
    """One group_dpo_run partition as its own Dagster run (in a worker process: Dagster's in-process execution is
    not thread-safe, and a worker imports the project once for all its partitions): (key, success, trained). A stop
    signal interrupts the run (Dagster stops its job and fails it) and ends the worker: it takes no further one."""
    from prism_assets import keys, partitions

    location = _WORKER["location"]
    try:
        result = dg.materialize(
            location.assets,
            selection=[keys.group_dpo_run(experiment)],
            partition_key=partitions.partition_key(cell, seed),
            instance=dg.DagsterInstance.get(),
            resources=location.resources,
            raise_on_error=False,
            # the UI's runs list shows whose run it is; the next main job, whether its process is gone
            tags={"experiment": experiment, **dead_runs.process_tags()},
        )
        _WORKER["signals"].check()
    except stopping.Stopped as stop:
        # Not raised: the pool would hand it to the main job as this partition's error, and go on to the next one.
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(stop.signum + 128)
    events = result.get_asset_materialization_events() if result.success else []
    trained = bool(events) and bool(events[0].materialization.metadata["trained"].value)
    return f"{experiment}/{cell}|{seed}", result.success, trained


def _print_tables(output: dict) -> None:
    from prism_assets.assets.table import basis_line
    from prism_assets.statistics import correspondence

    table = output["table"]
    primary = table[table["metric"] == correspondence.PRIMARY_METRIC]
    bases = output["basis"].set_index("experiment")
    for experiment, rows in primary.groupby("experiment", sort=False):
        print(f"\n{experiment}: {correspondence.METRICS[correspondence.PRIMARY_METRIC]}")
        print(f"  rests on {basis_line(bases.loc[experiment].to_dict()).replace('**', '')}")
        rows = rows.rename(columns={"null_df": "K"})
        print(
            rows[
                ["split", "predicted", "n_seeds", "mean_d", "ci_low", "ci_high", "boot_low", "boot_high"]
                + ["p_adjusted", "verdict", "K", "mde", "seeds_needed"]
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


def for_run(args: argparse.Namespace, configuration: Configuration) -> Configuration:
    """The main job's configuration: its flags over the environment's."""
    # Runs side by side share the cores: one run's torch threads must not oversubscribe them.
    changes: dict = {"threads_per_run": configuration.platform.threads_per_run or max(1, cpu_count() // args.parallel)}
    if args.experiments:
        changes["experiments"] = args.experiments
    return configuration.with_platform(**changes)


def run(args: argparse.Namespace, location) -> int:
    """The main job. SIGTERM or SIGINT stops it: the runs in flight are interrupted (their jobs stopped, the runs
    failed), the workers end, and it exits with 128 + the signal's number."""
    signals = stopping.StopSignals()
    try:
        return materialize_all(args, location, signals)
    except stopping.Stopped as stop:
        print(
            f"prism_assets: stopped by {stop.name}: the runs in flight were interrupted and marked failed, the "
            "workers stopped; `python -m prism_assets run` again goes on from what is done",
            file=sys.stderr,
        )
        return stop.signum + 128


def materialize_all(args: argparse.Namespace, location, signals: stopping.StopSignals) -> int:
    """The main job's work, in order: what a killed main job left freed, the data and statistics, every DPO
    partition, the table and the write-up."""
    from prism_assets import keys, partitions
    from prism_assets.assets import report
    from prism_assets.location import CHECKS
    from resources.launcher import LocalLauncher

    configuration = location.configuration
    instance = dg.DagsterInstance.get()
    # What a killed main job left: runs that stay STARTED, holding pool slots the runs below would wait for forever.
    for line in dead_runs.free_dead_runs(instance):
        print(line)
    started = time.perf_counter()
    # The reference precompute runs alone in this phase: a local one may use every core.
    resources = location.resources
    local = isinstance(resources["launcher"], LocalLauncher)
    alone = {**resources, "launcher": LocalLauncher()} if local else resources
    upstream = [*location.unpartitioned, *CHECKS]
    result = dg.materialize(
        upstream, instance=instance, resources=alone, raise_on_error=False, tags=dead_runs.process_tags()
    )
    signals.check()  # a signal during the run: Dagster's handler took it
    if not result.success:
        print(f"run {result.run_id} failed; see `dagster dev` or the log above", file=sys.stderr)
        return 1
    for experiment in location.experiments:
        splits = result.output_for_node(f"{experiment.name}__significant_splits")["splits"]
        print(f"\n{experiment.description}")
        print(splits[["split", "predicted", "users_a", "users_b", "pairs_a", "pairs_b"]].to_string(index=False))
    print(f"data and statistics: {time.perf_counter() - started:.1f} s")

    seeds = [partitions.seed_key(s) for s in range(args.seeds)]
    known = set(instance.get_dynamic_partitions(partitions.SEED))
    instance.add_dynamic_partitions(partitions.SEED, [s for s in seeds if s not in known])
    todo = [
        (experiment.name, cell, seed)
        for experiment in location.experiments
        for cell in instance.get_dynamic_partitions(partitions.cells_name(experiment.name))
        for seed in seeds
    ]
    for experiment in location.experiments:  # build the tiny models once, before runs start in parallel
        location.storage.resolved_base_model(experiment.settings.base_model)
    failed, trained, done = [], 0, 0
    pool = ProcessPoolExecutor(
        max_workers=args.parallel,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_worker,
        initargs=(configuration, os.getpid()),
    )
    try:
        for done, (key, success, was_trained) in enumerate(pool.map(materialize_partition, *zip(*todo)), start=1):
            trained += was_trained
            print(
                f"[{done}/{len(todo)}] group_dpo_run {key}: "
                f"{('trained' if was_trained else 'shared') if success else 'FAILED'} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if not success:
                failed.append(key)
    except BrokenProcessPool:
        stopping.stop_children(WORKER_GRACE_S)
        print(
            f"prism_assets: a worker process died (killed, or out of memory?) after {done} of {len(todo)} DPO "
            "partitions: the others stopped; `python -m prism_assets run` again goes on from what is done",
            file=sys.stderr,
        )
        return 1
    except BaseException:  # stopped (or failing): the workers interrupt their runs rather than train on
        stopping.stop_children(WORKER_GRACE_S)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    table = dg.materialize(
        location.assets,
        selection=[keys.CORRESPONDENCE_TABLE, keys.RESEARCH_REPORT],
        instance=instance,
        resources=resources,
        raise_on_error=False,
        tags=dead_runs.process_tags(),
    )
    signals.check()
    if not table.success:
        print("correspondence_table or research_report failed", file=sys.stderr)
        return 1
    _print_tables(table.output_for_node("correspondence_table"))
    html = Path(location.storage.reports_dir, report.REPORT_FILES["html"]).resolve()
    print(f"\nthe write-up: {html} (and report.md beside it)")
    print(
        f"\nmain job finished in {time.perf_counter() - started:.0f} s: {len(todo)} DPO partitions, {trained} trained "
        f"here, {len(todo) - trained - len(failed)} shared or already done; {len(failed)} failed {failed or ''}"
    )
    return 1 if failed else 0


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def orphans(args: argparse.Namespace, location) -> int:
    from prism_assets import automation
    from resources.slurm import MissingCommand, SlurmLauncher

    launcher = location.resources["launcher"]
    if not isinstance(launcher, SlurmLauncher):
        print("prism_assets: orphans are SLURM jobs; set DPO_LAUNCHER=slurm (and PRISM_SLURM_*)", file=sys.stderr)
        return 2
    try:
        found = launcher.orphans(dg.DagsterInstance.get(), Path(location.storage.runs_dir))
        cancelled = [orphan["job_id"] for orphan in found] if args.cancel else []
        for job in cancelled:
            launcher.commands.run(["scancel", job], check=False)
    except MissingCommand as error:
        print(f"prism_assets: {error}", file=sys.stderr)
        return 2
    print(automation.orphans_report(found, cancelled))
    return 0


def settings(args: argparse.Namespace, configuration: Configuration) -> int:
    """Every setting: its variable, value and where the value came from; with --help-text, what it means; with
    --markdown, the table of every setting's default and meaning that docs/configuration.md holds."""
    if args.markdown:
        print(settings_table())
        return 0
    rows = configuration.rows()
    width = max(len(row["variable"]) for row in rows)
    value_width = min(40, max(len(row["value"]) for row in rows))
    for row in rows:
        line = f"{row['variable']:<{width}}  {row['value']:<{value_width}}  {row['source']}"
        print(line + (f"\n    {row['help']}" if args.help_text and row["help"] else ""))
    home = os.environ.get("DAGSTER_HOME")
    print(f"{'DAGSTER_HOME':<{width}}  {home or '(unset)'}  {'environment' if home else 'Dagster needs it set'}")
    return 0


def settings_table() -> str:
    """Every setting with its default (no environment) and meaning, as a markdown table."""
    root = Path(__file__).resolve().parents[1]
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for row in Configuration.from_environ({}).rows():
        value = row["value"].replace(str(root) + "/", "")  # the repository's own files, wherever it is
        default = f"`{value}`" if value else "unset"
        meaning = row["help"].replace("|", "\\|")
        lines.append(f"| `{row['variable']}` | {default} | {meaning} |")
    return "\n".join(lines)


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prism_assets")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="materialize every asset and DPO partition into DAGSTER_HOME")
    run_parser.add_argument(
        "--experiments", default=None, help="comma-separated experiments of experiments.toml (default: the enabled)"
    )
    run_parser.add_argument("--seeds", type=positive, default=3, help="seeds 0..N-1 of every DPO cell (default 3)")
    run_parser.add_argument("--parallel", type=positive, default=2, help="DPO partitions run at once (default 2)")
    orphans_parser = commands.add_parser(
        "orphans", help="list the SLURM jobs no Dagster run follows (DPO_LAUNCHER=slurm); --cancel: scancel them"
    )
    orphans_parser.add_argument("--cancel", action="store_true", help="cancel every orphan now, whatever its grace")
    settings_parser = commands.add_parser("settings", help="print every setting, its value and where it came from")
    settings_parser.add_argument("--help-text", action="store_true", help="also print what each setting means")
    settings_parser.add_argument(
        "--markdown", action="store_true", help="every setting's default and meaning as a markdown table"
    )
    args = parser.parse_args(argv)
    try:  # a setting of the environment or the experiments file: one line, not a traceback
        configuration = Configuration.from_environ(os.environ)
        if args.command == "settings":
            return settings(args, configuration)
        from prism_assets.location import build

        location = build(for_run(args, configuration) if args.command == "run" else configuration)
        if args.command == "run":
            check_storage(location.configuration.platform)
        check_dagster_home()
    except ValueError as error:
        print(f"prism_assets: {error}", file=sys.stderr)
        return 2
    return run(args, location) if args.command == "run" else orphans(args, location)


def check_dagster_home() -> None:
    """DAGSTER_HOME names an existing directory: Dagster's own error otherwise is a traceback."""
    home = os.environ.get("DAGSTER_HOME", "")
    if not home:
        raise ValueError("DAGSTER_HOME is not set: set it to the instance's directory (the Makefile uses ./storage)")
    if not Path(home).is_dir():
        raise ValueError(f"DAGSTER_HOME={home!r} is not a directory: create it (with a dagster.yaml) or fix the path")


def check_storage(platform: PlatformSettings) -> None:
    """PRISM_STORAGE can hold the outputs: made if missing and a file written in it, before any work starts (a run
    would fail on it only once the data is read)."""
    directory = platform.storage_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ValueError(
            f"PRISM_STORAGE={platform.storage!r}: cannot write in {directory} ({error.strerror or error}): "
            "point PRISM_STORAGE at a directory this user can write"
        ) from None
