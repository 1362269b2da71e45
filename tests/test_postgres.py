"""A team's deployment (README, "Operating it for a team"): the Dagster instance on PostgreSQL through
dagster-postgres, configured with the README's `storage:` block and the repository's dagster.yaml, the
webserver and the daemon as separate processes, driven from the CLI like a team would: data and splits
materialized, the pool `gpu` limited to 1, the seed schedule started and its tick launching the DPO partitions
through the daemon's run queue. What the processes recorded is then read from PostgreSQL itself and from the
webserver.

Needs the PostgreSQL of scripts/postgres-dev.sh (`make test` starts it as root; `make postgres-up`). Without it
the test is skipped, unless PRISM_REQUIRE_POSTGRES=1 (then it fails).
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import IO, TypedDict

import psycopg2
import pytest
import yaml
from builders import stop_session
from webserver import graphql, serve

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class _Server(TypedDict):
    host: str
    port: int
    user: str
    password: str


PG: _Server = {
    "host": os.environ.get("PRISM_PG_HOST", "127.0.0.1"),
    "port": int(os.environ.get("PRISM_PG_PORT", "5433")),
    "user": os.environ.get("PRISM_PG_USER", "dagster"),
    "password": os.environ.get("PRISM_PG_PASSWORD", "dagster"),
}
# One experiment with three cells (baseline and the region null control's two groups: no other covariate
# reaches p < 1e-6 and no random split), so a tick of one seed requests three DPO partitions.
EXPERIMENT = "tiny"
EXPERIMENTS_TOML = f"""[{EXPERIMENT}]
description = "the team deployment's test: three cells"
preset = "auto"
categorical = ["gender"]
continuous = []
alpha = 1e-6
random_splits = 0
"""
CELLS = {"baseline", "S1_region.A", "S1_region.B"}
SCHEDULE = f"{EXPERIMENT}_add_seeds"
JOB = f"{EXPERIMENT}_dpo_runs"
DPO_STEP = f"{EXPERIMENT}__group_dpo_run"
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")


def _connect(dbname: str):
    return psycopg2.connect(dbname=dbname, connect_timeout=5, **PG)


@pytest.fixture
def database():
    """A fresh database on the PostgreSQL server for one test, dropped afterwards."""
    try:
        admin = _connect(os.environ.get("PRISM_PG_DB", "dagster"))
    except psycopg2.OperationalError as error:
        problem = f"no PostgreSQL for the Dagster instance at {PG['host']}:{PG['port']}: {str(error).strip()}"
        if os.environ.get("PRISM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL tests required but {problem} (start it: make postgres-up)")
        pytest.skip(f"{problem} (start it: make postgres-up)")
    admin.autocommit = True
    name = f"prism_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _query(database: str, sql: str, *args) -> list[tuple]:
    with contextlib.closing(_connect(database)) as connection, connection.cursor() as cursor:
        cursor.execute(sql, args)
        return cursor.fetchall()


def readme_storage_block() -> dict:
    """The `storage:` block the README tells a team to add to dagster.yaml."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [
        yaml.safe_load(textwrap.dedent(block))
        for block in re.findall(r"^[ \t]*```yaml\n(.*?)^[ \t]*```", text, re.MULTILINE | re.DOTALL)
        if "postgres_db" in block
    ]
    assert len(blocks) == 1, "the README shows one dagster.yaml block with `postgres_db`"
    return blocks[0]


def instance_yaml(database: str) -> str:
    """The repository's dagster.yaml with the README's storage block, pointed at `database` on the test server."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text(encoding="utf-8"))
    storage = readme_storage_block()
    assert "storage" not in config and set(storage) == {"storage"}
    db = storage["storage"]["postgres"]["postgres_db"]
    assert db["password"] == {"env": "DAGSTER_PG_PASSWORD"}, "the password comes from the environment"
    db.update(hostname=PG["host"], port=PG["port"], username=PG["user"], db_name=database)
    return yaml.safe_dump({**config, **storage}, sort_keys=False)


def _cli(env: dict, *args: str, timeout: float = 900) -> str:
    done = subprocess.run(
        [str(BIN / "dagster"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"dagster {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _wait(what: str, condition, timeout: float, log: Path):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s; the daemon's log:\n{log.read_text()[-4000:]}")
        time.sleep(2)


RUNS_QUERY = """query($job: String!) { runsOrError(filter: {pipelineName: $job}) { ... on Runs {
  results { runId status tags { key value } } } } }"""
POOL_QUERY = """{ instance { concurrencyLimit(concurrencyKey: "gpu") { limit slotCount usingDefaultLimit } } }"""
SCHEDULES_QUERY = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
  schedules { id name scheduleState { status } } } } } }"""
STOP_SCHEDULE = """mutation($id: String!) { stopRunningSchedule(id: $id) {
  ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message } } }"""
PARTITIONS_QUERY = """query($key: [AssetKeyInput!]) { assetNodes(assetKeys: $key) {
  partitionStats { numMaterialized numFailed } } }"""


@pytest.mark.slow
def test_a_team_deployment_on_postgres_runs_the_seed_schedule_through_the_daemon(database, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml(database))
    (tmp_path / "experiments.toml").write_text(EXPERIMENTS_TOML)
    env = {
        # the deployment's own settings only: none of the caller's PRISM_* or DPO_* (a launcher, experiments …)
        **{key: value for key, value in os.environ.items() if not key.startswith(("PRISM_", "DPO_"))},
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_PASSWORD": PG["password"],
        "PRISM_STORAGE": str(tmp_path / "storage"),
        "PRISM_SYNTHETIC_USERS": "100",
        "PRISM_SYNTHETIC_SEED": "3",
        "PRISM_EXPERIMENTS_FILE": str(tmp_path / "experiments.toml"),
        "PRISM_SEED_SCHEDULE_CRON": "* * * * *",
        "PRISM_SEEDS_PER_TICK": "1",
        "DPO_MAX_STEPS": "5",
        "DPO_THREADS_PER_RUN": "1",  # one core per job: the reference job runs while the daemon and webserver load
    }
    code = ["-w", "workspace.yaml"]

    # The team's setup: the instance's tables in the new database, the pool `gpu` limited to one DPO step at a time.
    _cli(env, "instance", "concurrency", "set", "gpu", "1")

    # The daemon and the webserver, each its own process, come up while a team member materializes from the CLI
    # everything the DPO runs read (data, statistics, reference log-probs; the run's steps in one process).
    daemon_log, upstream_log = tmp_path / "daemon.log", tmp_path / "materialize.log"

    def spawn(command: list[str], log: IO[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    with daemon_log.open("w") as log:
        daemon = spawn([str(BIN / "dagster-daemon"), "run", *code], log)
    with upstream_log.open("w") as log:
        upstream = spawn(
            [
                *[str(BIN / "dagster"), "asset", "materialize", "-m", "prism_assets.definitions"],
                *["--select", f'+key:"{EXPERIMENT}/group_dpo_run" and not key:"{EXPERIMENT}/group_dpo_run"'],
                *["--config-json", json.dumps({"execution": {"config": {"in_process": {}}}})],
            ],
            log,
        )
    processes = [daemon, upstream]
    try:
        with serve(REPO, env) as url:
            assert upstream.wait(timeout=900) == 0, upstream_log.read_text()[-4000:]
            # The seed schedule, started from the CLI: its first tick (the next minute) adds seed 0 and requests
            # every cell's partition of that seed.
            _cli(env, "schedule", "start", SCHEDULE, *code)

            def scheduled_runs() -> list[tuple]:
                return _query(
                    database,
                    "SELECT r.run_id, r.status, r.partition FROM runs r JOIN run_tags t ON t.run_id = r.run_id "
                    "WHERE t.key = 'dagster/schedule_name' AND t.value = %s",
                    SCHEDULE,
                )

            _wait("the schedule's tick launched no runs", lambda: len(scheduled_runs()) >= len(CELLS), 240, daemon_log)
            # Stopped from the webserver, as in the UI, before a second tick adds another seed.
            [schedule_id] = [
                s["id"]
                for repository in graphql(url, SCHEDULES_QUERY)["repositoriesOrError"]["nodes"]
                for s in repository["schedules"]
                if s["name"] == SCHEDULE and s["scheduleState"]["status"] == "RUNNING"
            ]
            stopped = graphql(url, STOP_SCHEDULE, {"id": schedule_id})["stopRunningSchedule"]
            assert stopped.get("scheduleState") == {"status": "STOPPED"}, stopped
            _wait(
                "the DPO runs did not finish",
                lambda: all(row[1] in FINISHED for row in scheduled_runs()),
                600,
                daemon_log,
            )
            runs = scheduled_runs()

            # Runs, events, the schedule's tick and record, the seeds and the pool: all in PostgreSQL.
            assert sorted(row[2] for row in runs) == sorted(f"{cell}|0" for cell in CELLS)
            failed = [row[0] for row in runs if row[1] != "SUCCESS"]
            assert not failed, f"runs {failed} did not succeed; the daemon's log:\n{daemon_log.read_text()[-4000:]}"
            run_ids = {row[0] for row in runs}
            materialized = _query(
                database,
                "SELECT run_id, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                "AND asset_key = %s",
                json.dumps([EXPERIMENT, "group_dpo_run"]),
            )
            assert sorted(materialized) == sorted((row[0], row[2]) for row in runs)
            partitions = _query(database, "SELECT partitions_def_name, partition FROM dynamic_partitions")
            assert sorted(partitions) == sorted([("seed", "0"), *((f"{EXPERIMENT}_cell", cell) for cell in CELLS)])
            [(seeds,)] = _query(database, "SELECT value FROM kvs WHERE key LIKE 'prism_assets/add_seeds/%%'")
            assert json.loads(seeds) == ["0"]
            ticks = _query(database, "SELECT status, tick_body FROM job_ticks WHERE type = 'SCHEDULE'")
            launched = [json.loads(body)["run_ids"] for status, body in ticks if status == "SUCCESS"]
            assert [set(ids) for ids in launched] == [run_ids], ticks
            assert _query(database, 'SELECT concurrency_key, "limit" FROM concurrency_limits') == [("gpu", 1)]

            # The pool: the tick queued the three runs together, yet no two DPO steps ran at the same time.
            events = _query(
                database,
                "SELECT run_id, dagster_event_type, timestamp FROM event_logs WHERE run_id = ANY(%s) "
                "AND (dagster_event_type = 'PIPELINE_ENQUEUED' OR step_key = %s "
                "AND dagster_event_type IN ('STEP_START', 'STEP_SUCCESS'))",
                list(run_ids),
                DPO_STEP,
            )
            when = {(run_id, kind): timestamp for run_id, kind, timestamp in events}
            steps = sorted((when[run_id, "STEP_START"], when[run_id, "STEP_SUCCESS"]) for run_id in run_ids)
            assert all(end <= start for (_, end), (start, _) in zip(steps, steps[1:])), steps
            assert max(when[run_id, "PIPELINE_ENQUEUED"] for run_id in run_ids) < steps[0][0], events

            # The webserver, a process of its own, reads the same instance.
            listed = graphql(url, RUNS_QUERY, {"job": JOB})["runsOrError"]["results"]
            assert {r["runId"]: r["status"] for r in listed} == dict.fromkeys(run_ids, "SUCCESS")
            assert all({"key": "dagster/schedule_name", "value": SCHEDULE} in r["tags"] for r in listed)
            [node] = graphql(url, PARTITIONS_QUERY, {"key": [{"path": [EXPERIMENT, "group_dpo_run"]}]})["assetNodes"]
            assert node["partitionStats"] == {"numMaterialized": len(CELLS), "numFailed": 0}
            pool = graphql(url, POOL_QUERY)["instance"]["concurrencyLimit"]
            assert pool == {"limit": 1, "slotCount": 1, "usingDefaultLimit": False}
    finally:
        for process in processes:
            stop_session(process)

    # Nothing went to sqlite beside the instance.
    assert not list(home.rglob("*.db")), sorted(home.rglob("*"))
