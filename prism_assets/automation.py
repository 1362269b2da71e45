"""Automation: more seeds on a schedule, runs for new split cells, and the report once runs are done.

Owns the jobs the automation launches (`dpo_runs`, `correspondence_report`) and three instigators, stopped
unless turned on: `add_seeds` (schedule: the next seeds, and every DPO partition neither materialized nor in
flight; the seeds a tick added are recorded under its time, so a tick evaluated again adds none),
`new_cells` (sensor: partitions of newly registered cells) and `report_when_runs_done` (sensor: one table
per batch of finished runs). README, "Automation".
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from prism_assets import partitions

DPO_ASSET, TABLE_ASSET = dg.AssetKey("group_dpo_run"), dg.AssetKey("correspondence_table")
NOT_FINISHED_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.SUSPENDED,
    dg.DagsterRunStatus.CANCELING,
]
dpo_job = dg.define_asset_job(
    "dpo_runs",
    selection=[DPO_ASSET],
    description="group_dpo_run partitions (cell × seed), one run each.",
)
report_job = dg.define_asset_job(
    "correspondence_report",
    selection=[TABLE_ASSET],
    description="correspondence_table from every finished DPO partition.",
)
SEED_TICK_KEY = "prism_assets/add_seeds/{tick}"


def partition_key(cell: str, seed: str) -> str:
    return str(dg.MultiPartitionKey({partitions.CELL: cell, partitions.SEED: seed}))


def in_flight(instance: dg.DagsterInstance, asset: dg.AssetKey) -> list[dg.DagsterRun]:
    """Runs that are queued or running and materialize `asset`."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=NOT_FINISHED_STATUSES))
    return [run for run in runs if asset in (run.asset_selection or set())]


def missing_partitions(
    instance: dg.DagsterInstance, cells: Sequence[str], seeds: Sequence[str]
) -> list[tuple[str, str]]:
    """(cell, seed) pairs of group_dpo_run neither materialized nor in a queued or running run."""
    done = instance.get_materialized_partitions(DPO_ASSET)
    busy = {run.tags.get("dagster/partition") for run in in_flight(instance, DPO_ASSET)}
    return [(cell, seed) for cell in cells for seed in seeds if partition_key(cell, seed) not in done | busy]


def newest_materialization(instance: dg.DagsterInstance, asset: dg.AssetKey):
    """The newest materialization record of `asset` (any partition), or None."""
    records = instance.fetch_materializations(asset, limit=1, ascending=False).records
    return records[0] if records else None


def run_requests(pairs: list[tuple[str, str]], suffix: str = "", **tags: str) -> list[dg.RunRequest]:
    return [
        dg.RunRequest(partition_key=partition_key(cell, seed), run_key=f"{cell}|{seed}{suffix}", tags=tags)
        for cell, seed in pairs
    ]


def next_seeds(existing: Sequence[str], count: int) -> list[str]:
    start = max((int(s) for s in existing), default=-1) + 1
    return [partitions.seed_key(s) for s in range(start, start + count)]


def _default_status(running: bool):
    return dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED


def build_add_seeds_schedule(cron: str, seeds_per_tick: int, running: bool = False) -> dg.ScheduleDefinition:
    if seeds_per_tick < 1:
        raise ValueError(f"seeds per tick must be ≥ 1, got {seeds_per_tick}")

    @dg.schedule(
        name="add_seeds",
        cron_schedule=cron,
        job=dpo_job,
        default_status=_default_status(running),
        description=f"Adds the next {seeds_per_tick} seeds and requests every missing DPO partition "
        "(all cells × all seeds, failed ones included); idempotent per tick.",
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
        cells = instance.get_dynamic_partitions(partitions.CELL)
        if not cells:
            return dg.SkipReason(f"seeds {added} added, but no cells yet: materialize significant_splits first")
        missing = missing_partitions(instance, cells, seeds)
        if not missing:
            return dg.SkipReason(f"seeds {added}: every partition is materialized or in flight")
        context.log.info(f"seeds added this tick: {added}; requesting {len(missing)} missing partitions")
        return run_requests(missing, requested_by="add_seeds")

    return add_seeds


def build_new_cells_sensor(running: bool = False, interval_s: int = 60) -> dg.SensorDefinition:
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name="new_cells",
        job=dpo_job,
        default_status=status,
        minimum_interval_seconds=interval_s,
        description="Requests the missing DPO partitions (every seed) of split cells not seen before.",
    )
    def new_cells(context: dg.SensorEvaluationContext):
        state: dict[str, Any] = json.loads(context.cursor) if context.cursor else {"cells": [], "generation": 0}
        instance = context.instance
        cells = instance.get_dynamic_partitions(partitions.CELL)
        new = [cell for cell in cells if cell not in set(state["cells"])]
        if not new:
            context.update_cursor(json.dumps({**state, "cells": cells}))
            return dg.SkipReason(f"no new cells among {len(cells)}")
        generation = state["generation"] + 1
        context.update_cursor(json.dumps({"cells": cells, "generation": generation}))
        missing = missing_partitions(instance, new, instance.get_dynamic_partitions(partitions.SEED))
        if not missing:
            return dg.SkipReason(f"new cells {new}: every partition is materialized or in flight (or no seeds yet)")
        return run_requests(missing, suffix=f"#{generation}", requested_by="new_cells")

    return new_cells


def build_report_sensor(running: bool = False, interval_s: int = 60) -> dg.SensorDefinition:
    status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name="report_when_runs_done",
        job=report_job,
        default_status=status,
        minimum_interval_seconds=interval_s,
        description="Rebuilds correspondence_table once no DPO partition is in flight and one is newer.",
    )
    def report_when_runs_done(context: dg.SensorEvaluationContext):
        instance = context.instance
        latest = newest_materialization(instance, DPO_ASSET)
        if latest is None:
            return dg.SkipReason("no group_dpo_run partition has materialized yet")
        table = newest_materialization(instance, TABLE_ASSET)
        if table is not None and table.storage_id > latest.storage_id:
            return dg.SkipReason("correspondence_table is newer than every DPO run")
        busy = in_flight(instance, DPO_ASSET)
        if busy:
            return dg.SkipReason(f"{len(busy)} DPO runs queued or running")
        return dg.RunRequest(run_key=f"after-{latest.storage_id}", tags={"requested_by": "report_when_runs_done"})

    return report_when_runs_done
