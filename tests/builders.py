"""Shared test helpers: hand-built PRISM rows in the real schema, and running a job-side module on a config."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prism_assets.dataset import schema

if TYPE_CHECKING:
    import dagster as dg

# A value other than the default for every DPO setting (TrainingSettings' fields): what the tests that walk every
# setting change, one at a time or all at once. A new setting must be added here.
OTHER_DPO_SETTINGS = {
    "base_model": "tiny:4",
    "max_steps": 40,
    "batch_size": 4,
    "beta": 0.2,
    "learning_rate": 2e-4,
    "logging_steps": 2,
    "eval_steps": 8,
    "max_length": 128,
    "heldout_share": 0.2,
    "heldout_cross_share": 0.5,
    "curve_heldout_pairs": 32,
    "balance_groups": True,
    "gradient_checkpointing": True,
    "checkpoint_steps": 8,
    "checkpoint_minutes": 5.0,
    "device": "cpu",
    "report_to": ["tensorboard"],
    "tracking_dir": "/elsewhere",
    "mlflow_tracking_uri": "http://mlflow.example:5000",
    "mlflow_experiment": "other",
}

# The original experiment's eight splits (its v3), in its order.
V3_SPLITS = [
    "S1_age",
    "S2_education",
    "S3_personalisation",
    "S4_safety",
    "S5_factuality",
    "S6_helpfulness",
    "S7_diversity",
    "S8_region",
]


def survey_row(user_id: str, **overrides) -> dict:
    row: dict = {
        "user_id": user_id,
        "survey_only": False,
        "num_completed_conversations": 1,
        "consent": "Yes",
        "consent_age": "Yes",
        "lm_familiarity": "Somewhat familiar",
        "lm_direct_use": "Yes",
        "lm_indirect_use": "Yes",
        "lm_frequency_use": "Every week",
        "lm_usecases": dict.fromkeys(schema.LM_USECASES, False) | {"other_text": ""},
        "order_lm_usecases": {k: i for i, k in enumerate(schema.LM_USECASES)},
        "stated_prefs": dict.fromkeys(schema.STATED_PREFS, 50) | {"other": 0, "other_text": ""},
        "order_stated_prefs": {k: i + 1 for i, k in enumerate(schema.STATED_PREFS)},
        "self_description": "",
        "system_string": "",
        "age": "25-34 years old",
        "gender": "Female",
        "employment_status": "Student",
        "education": "University Bachelors Degree",
        "marital_status": "Never been married",
        "english_proficiency": "Fluent",
        "religion": {"self_described": "", "categorised": "No Affiliation", "simplified": "No Affiliation"},
        "ethnicity": {"self_described": "", "categorised": "White", "simplified": "White"},
        "location": {
            "birth_country": "UK",
            "birth_countryISO": "GBR",
            "birth_subregion": "Northern Europe",
            "reside_country": "UK",
            "reside_countryISO": "GBR",
            "reside_subregion": "Northern Europe",
            "same_birth_reside_country": "Yes",
            "special_region": "UK",
        },
        "study_id": "s",
        "study_locale": "uk",
        "generated_datetime": "2023-11-22 12:00:00.000",
        "timing_duration_s": 1.0,
        "timing_duration_mins": 0.1,
        "included_in_UK_REP": True,
        "included_in_US_REP": False,
        "included_in_balanced_subset": False,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(row.get(key), dict):
            row[key] = row[key] | value
        else:
            row[key] = value
    return row


def conversation(user_id: str, conversation_id: str, turns: list[list[tuple]]) -> tuple[dict, list[dict]]:
    """A conversation and its utterances; `turns[t]` lists (model_name, score, response[, if_chosen]) tuples.

    if_chosen defaults to the highest score of the turn (the first one on a tie).
    """
    history, utterances = [], []
    for turn, responses in enumerate(turns):
        prompt = f"{conversation_id} user message {turn}"
        history.append({"turn": turn, "role": "user", "content": prompt})
        best = max(range(len(responses)), key=lambda i: responses[i][1])
        for within, response in enumerate(responses):
            model, score, text = response[:3]
            chosen = response[3] if len(response) > 3 else within == best
            item = {
                "turn": turn,
                "role": "model",
                "content": text,
                "model_name": model,
                "model_provider": "p",
                "score": score,
                "if_chosen": chosen,
                "within_turn_id": within,
            }
            history.append(item)
            utterances.append(
                {
                    "user_id": user_id,
                    "conversation_id": conversation_id,
                    "interaction_id": f"{conversation_id}-t{turn}",
                    "utterance_id": f"{conversation_id}-t{turn}-r{within}",
                    "within_turn_id": within,
                    "conversation_type": "unguided",
                    "turn": turn,
                    "model_name": model,
                    "model_provider": "p",
                    "user_prompt": prompt,
                    "model_response": text,
                    "score": score,
                    "if_chosen": chosen,
                    "included_in_balanced_subset": False,
                }
            )
    row = {
        "conversation_id": conversation_id,
        "user_id": user_id,
        "conversation_type": "unguided",
        "opening_prompt": history[0]["content"],
        "conversation_turns": len(turns),
        "conversation_history": history,
        "performance_attributes": {},
        "choice_attributes": {},
        "open_feedback": "",
        "generated_datetime": "2023-11-22 12:00:00.000",
        "timing_duration_s": 1.0,
        "timing_duration_mins": 0.1,
        "included_in_balanced_subset": False,
    }
    return row, utterances


def write_prism(directory: Path, survey: list[dict], conversations: list[dict], utterances: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("survey", survey), ("conversations", conversations), ("utterances", utterances)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def run_job(directory: Path, name: str, module: str = "prism_assets.training.trainer", **config) -> str:
    """Run a job module (the trainer, the reference precompute) on `config` written to <directory>/<name>.json, on
    one torch thread; it must succeed. Returns what it printed."""
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", module, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def experiment(name: str = "v3", preset: str = "v3", spec: dict | None = None, **dpo):
    """An experiment as the file would give it (`spec`: its other fields), with DPO settings `dpo` over the tiny
    recipe."""
    from prism_assets.experiments import ExperimentSpec, resolve

    if "logging_steps" in dpo:  # the tiny recipe's eval_steps (10) fits its own logging_steps only
        dpo = {"eval_steps": None, **dpo}
    return resolve(name, ExperimentSpec(preset=preset, **(spec or {})), dpo, "tiny", "test")


def dagster_definitions(
    tmp_path: Path, experiments: list, users: int = 300, python: str | None = None, warm: bool = False, seed: int = 3
):
    """(assets, resources) of these experiments on a synthetic PRISM of `users` users, storage under tmp_path;
    `warm`: the local launcher forks the jobs from this process, as the main job does."""
    from prism_assets.assets import asset_graph, dpo
    from resources.io_managers import ParquetIOManager
    from resources.launcher import LocalLauncher
    from resources.prism_source import PrismSource
    from resources.storage import DpoStorage

    resources = {
        "prism_source": PrismSource(synthetic_users=users, synthetic_seed=seed, synthetic_dir=str(tmp_path / "prism")),
        "io_manager": ParquetIOManager(base_dir=str(tmp_path / "assets")),
        "dpo_storage": DpoStorage(
            models_dir=str(tmp_path / "models"),
            runs_dir=str(tmp_path / "runs"),
            reports_dir=str(tmp_path / "reports"),
            python=python or sys.executable,
        ),
        "launcher": LocalLauncher(threads_per_run=1, warm_modules=list(dpo.WARM_MODULES) if warm else []),
    }
    return asset_graph(experiments), resources


def upstream_of_runs(assets: list) -> list:
    """Every asset but the DPO runs and the table: the data, statistics and references."""
    return [a for a in assets if a.key.path[-1] not in ("group_dpo_run", "correspondence_table", "research_report")]


def materialize_partition(assets, resources, instance, experiment: str, cell: str, seed, **kwargs):
    import dagster as dg

    from prism_assets import keys, partitions

    return dg.materialize(
        assets,
        selection=[keys.group_dpo_run(experiment)],
        partition_key=partitions.partition_key(cell, str(seed)),
        instance=instance,
        resources=resources,
        **kwargs,
    )


def run_dir_of(result) -> Path:
    """The run directory a group_dpo_run materialization names."""
    [event] = result.get_asset_materialization_events()
    return Path(event.materialization.metadata["run_dir"].value)


def markdown(value: dg.MetadataValue) -> str:
    """The text of a markdown metadata value (the tables and plots an asset shows)."""
    import dagster as dg

    assert isinstance(value, dg.MarkdownMetadataValue), value
    return value.value


def run_dirs(runs: Path, cell: str, seed: int = 0, experiment: str | None = None) -> list[Path]:
    """The run directories under `runs` whose config labels them as this cell and seed (of this experiment)."""
    found = []
    for config in sorted(runs.glob(f"*/seed{seed}/config.json")):
        label = json.loads(config.read_text())["label"]
        if label["cell"] == cell and experiment in (None, label["experiment"]):
            found.append(config.parent)
    return found


def stop_session(process: subprocess.Popen, grace_s: float = 60) -> None:
    """Stop a process started with `start_new_session=True` and everything of its session (a daemon's code server,
    the runs it launched): SIGTERM to the group, then SIGKILL to whatever of it is left after `grace_s`, the leader
    gone or not, so that a failed test leaves no server behind."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        process.poll()  # reaps the leader: unreaped, it stays in its group as a zombie
        try:
            os.killpg(process.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
