"""Automation: more seeds on a schedule, runs for new split cells, and the report once runs are done.

Owns the jobs the automation launches (`<experiment>_dpo_runs`, `correspondence_report`) and the instigators, stopped
unless turned on: `<experiment>_add_seeds` (a schedule per experiment, since a schedule launches one job: the next
seeds, shared by every experiment, and every partition of the experiment neither materialized nor in flight; the
seeds of a tick are recorded under its time, so the experiments' schedules of one tick, or a tick evaluated again,
add them once), `new_cells` (sensor: partitions of every experiment's newly registered cells),
`report_when_runs_done` (sensor: one table per batch of finished runs) and `slurm_orphans` (sensor: SLURM jobs no
Dagster run follows, listed, and cancelled past the launcher's orphan_grace_s). README, "Automation".
"""

import functools
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from prism_assets import keys, partitions
from resources.launcher import RunLauncher
from resources.slurm import SlurmLauncher

NOT_FINISHED_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.SUSPENDED,
    dg.DagsterRunStatus.CANCELING,
]


@functools.cache  # one definition per name: the schedules, the sensor and Definitions share it
def dpo_job(experiment: str):
    return dg.define_asset_job(
        f"{experiment}_dpo_runs",
        selection=[keys.group_dpo_run(experiment)],
        description=f"{experiment}'s group_dpo_run partitions (cell × seed), one run each.",
        tags={"experiment": experiment},
    )


report_job = dg.define_asset_job(
    "correspondence_report",
    selection=[keys.CORRESPONDENCE_TABLE, keys.RESEARCH_REPORT],
    description="correspondence_table from every finished DPO partition, and the write-up when it changed.",
)
SEED_TICK_KEY = "prism_assets/add_seeds/{tick}"


def partition_key(cell: str, seed: str) -> str:
    return str(partitions.partition_key(cell, seed))


def in_flight(instance: dg.DagsterInstance, assets: Sequence[dg.AssetKey]) -> list[dg.DagsterRun]:
    """Runs that are queued or running and materialize one of `assets`."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=NOT_FINISHED_STATUSES))
    return [run for run in runs if set(assets) & set(run.asset_selection or set())]


def missing_partitions(
    instance: dg.DagsterInstance, experiment: str, cells: Sequence[str], seeds: Sequence[str]
) -> list[tuple[str, str]]:
    """(cell, seed) pairs of the experiment's group_dpo_run neither materialized nor in a queued or running run."""
    asset = keys.group_dpo_run(experiment)
    done = instance.get_materialized_partitions(asset)
    busy = {run.tags.get("dagster/partition") for run in in_flight(instance, [asset])}
    return [(cell, seed) for cell in cells for seed in seeds if partition_key(cell, seed) not in done | busy]


def newest_materialization(instance: dg.DagsterInstance, assets: Sequence[dg.AssetKey]):
    """The newest materialization record of any of `assets` (any partition), or None."""
    records = [
        record
        for asset in assets
        for record in instance.fetch_materializations(asset, limit=1, ascending=False).records
    ]
    return max(records, key=lambda record: record.storage_id, default=None)


def run_requests(
    experiment: str, pairs: list[tuple[str, str]], suffix: str = "", job: bool = False, **tags: str
) -> list[dg.RunRequest]:
    """One request per partition; `job`: name the experiment's job (an instigator that launches several)."""
    return [
        dg.RunRequest(
            partition_key=partition_key(cell, seed),
            run_key=f"{experiment}|{cell}|{seed}{suffix}",
            job_name=f"{experiment}_dpo_runs" if job else None,
            tags={"experiment": experiment, **tags},
        )
        for cell, seed in pairs
    ]


def next_seeds(existing: Sequence[str], count: int) -> list[str]:
    start = max((int(s) for s in existing), default=-1) + 1
    return [partitions.seed_key(s) for s in range(start, start + count)]


def _default_status(running: bool):
    return dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED


def build_add_seeds_schedule(
    experiment: str, cron: str, seeds_per_tick: int, running: bool = False
) -> dg.ScheduleDefinition:
    if seeds_per_tick < 1:
        raise ValueError(f"seeds per tick must be ≥ 1, got {seeds_per_tick}")

    @dg.schedule(
        name=f"{experiment}_add_seeds",
        cron_schedule=cron,
        job=dpo_job(experiment),
        default_status=_default_status(running),
        description=f"Adds the next {seeds_per_tick} seeds (once per tick, for every experiment) and requests every "
        f"missing DPO partition of {experiment} (all cells × all seeds, failed ones included); idempotent per tick.",
    )
    def add_seeds(context: dg.ScheduleEvaluationContext):
        instance = context.instance
        tick_time = context.scheduled_execution_time or datetime.now(UTC)
        tick = SEED_TICK_KEY.format(tick=tick_time.isoformat())
        recorded = instance.run_storage.get_cursor_values({tick}).get(tick)
        seeds = instance.get_dynamic_partitions(partitions.SEED)
        if recorded is None:
            added = next_seeds(seeds, seeds_per_tick)
            instance.add_dynamic_partitions(partitions.SEED, added)
            instance.run_storage.set_cursor_values({tick: json.dumps(added)})
            seeds = [*seeds, *added]
        else:
            added = json.loads(recorded)
        cells = instance.get_dynamic_partitions(partitions.cells_name(experiment))
        if not cells:
            return dg.SkipReason(
                f"seeds {added} added, but {experiment} has no cells yet: materialize its significant_splits first"
            )
        missing = missing_partitions(instance, experiment, cells, seeds)
        if not missing:
            return dg.SkipReason(f"seeds {added}: every partition of {experiment} is materialized or in flight")
        context.log.info(f"seeds added this tick: {added}; requesting {len(missing)} missing partitions")
        return run_requests(experiment, missing, requested_by="add_seeds")

    return add_seeds


def build_new_cells_sensor(experiments: Sequence[str], running: bool = False, interval_s: int = 60):
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name="new_cells",
        jobs=[dpo_job(experiment) for experiment in experiments],
        default_status=status,
        minimum_interval_seconds=interval_s,
        description="Requests the missing DPO partitions (every seed) of every experiment's split cells not seen "
        "before.",
    )
    def new_cells(context: dg.SensorEvaluationContext):
        state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {"cells": {}, "generation": 0}
        instance = context.instance
        seeds = instance.get_dynamic_partitions(partitions.SEED)
        cells = {e: instance.get_dynamic_partitions(partitions.cells_name(e)) for e in experiments}
        new = {e: [c for c in cells[e] if c not in set(state["cells"].get(e, []))] for e in experiments}
        if not any(new.values()):
            context.update_cursor(json.dumps({**state, "cells": cells}))
            return dg.SkipReason(f"no new cells among {sum(map(len, cells.values()))}")
        generation = state["generation"] + 1
        context.update_cursor(json.dumps({"cells": cells, "generation": generation}))
        requests = [
            request
            for e in experiments
            for request in run_requests(
                e, missing_partitions(instance, e, new[e], seeds), f"#{generation}", job=True, requested_by="new_cells"
            )
        ]
        if not requests:
            return dg.SkipReason(f"new cells {new}: every partition is materialized or in flight (or no seeds yet)")
        return requests

    return new_cells


def build_report_sensor(dpo_assets: Sequence[dg.AssetKey], running: bool = False, interval_s: int = 60):
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name="report_when_runs_done",
        job=report_job,
        default_status=status,
        minimum_interval_seconds=interval_s,
        description="Rebuilds correspondence_table (and research_report, where that changes it) once no DPO "
        "partition is in flight and one is newer.",
    )
    def report_when_runs_done(context: dg.SensorEvaluationContext):
        instance = context.instance
        latest = newest_materialization(instance, dpo_assets)
        if latest is None:
            return dg.SkipReason("no group_dpo_run partition has materialized yet")
        table = newest_materialization(instance, [keys.CORRESPONDENCE_TABLE])
        if table is not None and table.storage_id > latest.storage_id:
            return dg.SkipReason("correspondence_table is newer than every DPO run")
        busy = in_flight(instance, dpo_assets)
        if busy:
            return dg.SkipReason(f"{len(busy)} DPO runs queued or running")
        return dg.RunRequest(run_key=f"after-{latest.storage_id}", tags={"requested_by": "report_when_runs_done"})

    return report_when_runs_done


def orphans_report(orphans: list[dict], cancelled: Sequence[str] = ()) -> str:
    if not orphans:
        return "every queued or running SLURM job of this project is followed by a Dagster run"
    lines = [
        f"{o['job_id']} {o['job_name']} ({o['state']}): {o['why']}; run directory {o['run_dir'] or 'unknown'}"
        + (" — cancelled" if o["job_id"] in cancelled else "")
        for o in orphans
    ]
    return f"{len(orphans)} SLURM jobs no Dagster run follows (launching a partition again adopts its job):\n" + (
        "\n".join(lines)
    )


def build_orphans_sensor(runs_dir: str, running: bool = False, interval_s: int = 300):
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name="slurm_orphans",
        default_status=status,
        minimum_interval_seconds=interval_s,
        description="Lists this project's SLURM jobs that no Dagster run follows (their Dagster process went away): "
        "launching the partition again adopts such a job; once seen unwatched for the launcher's orphan_grace_s "
        "it is cancelled.",
    )
    def slurm_orphans(context: dg.SensorEvaluationContext, launcher: RunLauncher):
        if not isinstance(launcher, SlurmLauncher):
            return dg.SkipReason("the launcher is not SLURM: every job ends with its Dagster run")
        orphans = launcher.orphans(context.instance, Path(runs_dir))
        # The grace counts from the tick that first saw a job unwatched (the cursor: job id → that time).
        now, seen = time.time(), json.loads(context.cursor) if context.cursor else {}
        seen = {o["job_id"]: seen.get(o["job_id"], now) for o in orphans}
        grace = launcher.orphan_grace_s
        cancelled = [job for job, since in seen.items() if grace is not None and now - since > grace]
        for job in cancelled:
            context.log.warning(f"cancelling SLURM job {job}: unwatched for over orphan_grace_s={grace:.0f} s")
            launcher.commands.run(["scancel", job], check=False)
        context.update_cursor(json.dumps({job: since for job, since in seen.items() if job not in cancelled}))
        report = orphans_report(orphans, cancelled)
        if orphans:
            context.log.warning(report)
        return dg.SkipReason(report)

    return slurm_orphans
