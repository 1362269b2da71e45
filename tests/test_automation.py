"""The add_seeds schedule and the two sensors, evaluated against a real instance, and once under the daemon."""

import datetime
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import pytest
from builders import stop_session

from prism_assets import automation, keys, partitions
from prism_assets.definitions import ASSETS, RESOURCES

REPO = Path(__file__).resolve().parents[1]
TICK = datetime.datetime(2026, 11, 29, 2, tzinfo=datetime.UTC)


def _repository(*instigators):
    schedules = [i for i in instigators if isinstance(i, dg.ScheduleDefinition)]
    sensors = [i for i in instigators if isinstance(i, dg.SensorDefinition)]
    return dg.Definitions(
        assets=ASSETS,
        resources=RESOURCES,
        jobs=[automation.dpo_job("v3"), automation.dpo_job("v2"), automation.report_job],
        schedules=schedules,
        sensors=sensors,
    ).get_repository_def()


def _materialized(instance, *keys):
    for key in keys:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key[0], partition=key[1]))


def _queue(instance, repository, request, experiment="v3"):
    """What the daemon does with a run request: a run, not yet started, for that partition."""
    return instance.create_run_for_job(
        job_def=repository.get_job(f"{experiment}_dpo_runs"),
        run_config={},
        tags=request.tags,
        status=dg.DagsterRunStatus.NOT_STARTED,
        asset_selection=frozenset({keys.group_dpo_run(experiment)}),
    )


V3_RUNS, V2_RUNS = ["v3", "group_dpo_run"], ["v2", "group_dpo_run"]


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(partitions.cells_name("v3"), ["baseline", "S1_age.A", "S1_age.B"])
        instance.add_dynamic_partitions(partitions.cells_name("v2"), ["baseline", "S4_familiarity.A"])
        instance.add_dynamic_partitions(partitions.SEED, ["0"])
        yield instance


def test_a_tick_adds_the_next_seeds_and_requests_each_missing_partition_once(instance):
    schedule = automation.build_add_seeds_schedule("v3", "0 2 * * 0", seeds_per_tick=2)
    v2_schedule = automation.build_add_seeds_schedule("v2", "0 2 * * 0", seeds_per_tick=2)
    repository = _repository(schedule, v2_schedule)
    _materialized(instance, (V3_RUNS, "baseline|0"))

    def tick(when, schedule=schedule):
        return schedule.evaluate_tick(
            dg.build_schedule_context(instance=instance, scheduled_execution_time=when, repository_def=repository)
        )

    first = tick(TICK)
    assert instance.get_dynamic_partitions(partitions.SEED) == ["0", "1", "2"]
    requested = {r.partition_key for r in first.run_requests}
    assert len(requested) == 8 and "baseline|0" not in requested and "S1_age.A|0" in requested  # seed 0's holes too
    assert all(r.run_key == f"v3|{r.partition_key}" for r in first.run_requests)
    assert all(r.tags["dagster/schedule_name"] == "v3_add_seeds" for r in first.run_requests)
    # v2's schedule at the same tick: the seeds of the tick, not two more; v2's own partitions
    v2_tick = tick(TICK, v2_schedule)
    assert instance.get_dynamic_partitions(partitions.SEED) == ["0", "1", "2"]
    assert {r.partition_key for r in v2_tick.run_requests} == {
        f"{cell}|{seed}" for cell in ("baseline", "S4_familiarity.A") for seed in ("0", "1", "2")
    }
    assert all(r.tags["experiment"] == "v2" for r in v2_tick.run_requests)

    for request in first.run_requests[:5]:  # the daemon launched five before it died
        _queue(instance, repository, request)
    again = tick(TICK)  # failure recovery evaluates the same tick again
    assert instance.get_dynamic_partitions(partitions.SEED) == ["0", "1", "2"]  # no further seeds
    assert {r.partition_key for r in again.run_requests} == {r.partition_key for r in first.run_requests[5:]}

    for request in again.run_requests:
        _queue(instance, repository, request)
    assert tick(TICK).skip_message and not tick(TICK).run_requests  # everything in flight: nothing twice

    following = tick(TICK + datetime.timedelta(days=7))
    assert instance.get_dynamic_partitions(partitions.SEED) == ["0", "1", "2", "3", "4"]
    assert {r.partition_key for r in following.run_requests} == {
        f"{cell}|{seed}" for cell in ("baseline", "S1_age.A", "S1_age.B") for seed in ("3", "4")
    }


def test_the_schedule_is_off_by_default_and_validates_its_seed_count():
    schedule = automation.build_add_seeds_schedule("v3", "0 2 * * 0", 2)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    with pytest.raises(ValueError, match="seeds per tick"):
        automation.build_add_seeds_schedule("v3", "0 2 * * 0", 0)


def test_new_cells_sensor_requests_only_cells_it_has_not_seen(instance):
    sensor = automation.build_new_cells_sensor(["v3", "v2"])
    repository = _repository(sensor)
    instance.add_dynamic_partitions(partitions.SEED, ["1"])
    _materialized(instance, (V3_RUNS, "S1_age.B|1"), (V2_RUNS, "baseline|0"))

    def evaluate(cursor):
        context = dg.build_sensor_context(
            instance=instance, instance_ref=instance.get_ref(), cursor=cursor, repository_def=repository
        )
        return sensor.evaluate_tick(context)

    first = evaluate(None)  # turned on: every cell is new to it, materialized partitions are skipped
    assert {(r.job_name, r.partition_key) for r in first.run_requests} == {
        ("v3_dpo_runs", "baseline|0"),
        ("v3_dpo_runs", "baseline|1"),
        ("v3_dpo_runs", "S1_age.A|0"),
        ("v3_dpo_runs", "S1_age.A|1"),
        ("v3_dpo_runs", "S1_age.B|0"),
        ("v2_dpo_runs", "baseline|1"),
        ("v2_dpo_runs", "S4_familiarity.A|0"),
        ("v2_dpo_runs", "S4_familiarity.A|1"),
    }
    assert evaluate(first.cursor).run_requests == []

    instance.add_dynamic_partitions(partitions.cells_name("v3"), ["S2_gender.A", "S2_gender.B"])  # a new split
    second = evaluate(first.cursor)
    assert {r.partition_key for r in second.run_requests} == {
        "S2_gender.A|0",
        "S2_gender.A|1",
        "S2_gender.B|0",
        "S2_gender.B|1",
    }
    assert {r.run_key for r in second.run_requests} >= {"v3|S2_gender.A|0#2"}

    instance.delete_dynamic_partition(partitions.cells_name("v3"), "S2_gender.B")  # pruned by significant_splits …
    third = evaluate(second.cursor)
    instance.add_dynamic_partitions(partitions.cells_name("v3"), ["S2_gender.B"])  # … and back: requested again
    fourth = evaluate(third.cursor)
    assert {r.run_key for r in fourth.run_requests} == {"v3|S2_gender.B|0#3", "v3|S2_gender.B|1#3"}


def test_report_sensor_waits_for_runs_and_requests_one_table_per_batch(instance):
    sensor = automation.build_report_sensor([keys.group_dpo_run("v3"), keys.group_dpo_run("v2")])
    repository = _repository(sensor, automation.build_add_seeds_schedule("v3", "0 2 * * 0", 1))

    def evaluate():
        return sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), repository_def=repository)
        )

    assert "no group_dpo_run" in evaluate().skip_message
    _materialized(instance, (V3_RUNS, "baseline|0"))
    request = dg.RunRequest(partition_key="S4_familiarity.A|0", tags={"dagster/partition": "S4_familiarity.A|0"})
    run = _queue(instance, repository, request, "v2")  # any experiment's runs hold the table back
    assert "1 DPO runs queued or running" in evaluate().skip_message
    instance.report_run_canceled(run)
    [table_request] = evaluate().run_requests
    assert table_request.run_key.startswith("after-")
    assert evaluate().run_requests[0].run_key == table_request.run_key  # same batch, same key: launched once
    _materialized(instance, ("correspondence_table", None))
    assert "newer" in evaluate().skip_message
    _materialized(instance, (V2_RUNS, "baseline|0"))
    assert evaluate().run_requests  # a newer run of another experiment: a new table


@pytest.mark.slow
def test_the_daemon_runs_the_new_cells_sensor_and_launches_dpo_runs(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nconcurrency:\n  runs:\n    max_concurrent_runs: 1\n"
    )
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PRISM_STORAGE": str(tmp_path / "storage"),
        "PRISM_SYNTHETIC_USERS": "300",
        "PRISM_SYNTHETIC_SEED": "3",
        "PRISM_AUTOMATION": "running",
        "DPO_THREADS_PER_RUN": "1",
    }
    upstream = (
        "import dagster as dg\nfrom prism_assets import definitions as d\n"
        "dg.materialize(d.LOCATION.unpartitioned, instance=dg.DagsterInstance.get(), resources=d.RESOURCES)\n"
        "dg.DagsterInstance.get().add_dynamic_partitions('seed', ['0'])\n"
    )
    subprocess.run([sys.executable, "-c", upstream], cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        stdout=open(tmp_path / "daemon.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    os.environ["DAGSTER_HOME"], previous = str(home), os.environ.get("DAGSTER_HOME")
    try:
        instance = dg.DagsterInstance.get()
        expected = sorted(
            (f"{name}_dpo_runs", f"{cell}|0")
            for name in ("v3", "v2")
            for cell in instance.get_dynamic_partitions(partitions.cells_name(name))
        )
        deadline = time.time() + 420  # 78 requests (v3: 41 cells, v2: 37), submitted one after another
        runs: Sequence[dg.DagsterRun] = []
        while time.time() < deadline:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/sensor_name": "new_cells"}))
            started = any(r.status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS) for r in runs)
            if started and len(runs) >= len(expected):  # the daemon submits a tick's requests one after another
                break
            time.sleep(2)
        log = (tmp_path / "daemon.log").read_text()[-3000:]
        assert any(r.status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS) for r in runs), log
        assert sorted((r.job_name, r.tags["dagster/partition"]) for r in runs) == expected  # each once
    finally:
        stop_session(daemon)  # the daemon, its code server and the runs it launched
        if previous is None:
            del os.environ["DAGSTER_HOME"]
        else:
            os.environ["DAGSTER_HOME"] = previous
        shutil.rmtree(tmp_path / "storage", ignore_errors=True)
