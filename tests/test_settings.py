"""Settings checked where they are read: the job's JSON config and the code location's environment."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from pydantic import ValidationError

from prism_assets.assets import report
from prism_assets.definitions import experiments_from_env, int_from_env
from prism_assets.experiments import ExperimentSpec
from prism_assets.training.settings import RunConfig

# (settings, what is wrong, as the environment's reader says it: DPO_<FIELD>='value': rule)
BAD_SETTINGS = [
    ({"max_steps": -5}, "DPO_MAX_STEPS='-5': Input should be greater than or equal to 1"),
    ({"batch_size": 0}, "DPO_BATCH_SIZE='0': Input should be greater than or equal to 1"),
    ({"learning_rate": "nan"}, "DPO_LEARNING_RATE='nan': Input should be a finite number"),
    ({"beta": -0.1}, r"DPO_BETA='-0.1': Input should be greater than 0"),
    ({"heldout_fraction": 1}, "DPO_HELDOUT_FRACTION='1': Input should be less than 1"),
    ({"heldout_max_pairs": 0}, "DPO_HELDOUT_MAX_PAIRS='0': Input should be greater than or equal to 1"),
    ({"max_length": 0}, "DPO_MAX_LENGTH='0': Input should be greater than or equal to 1"),
    ({"device": "gpu"}, "DPO_DEVICE='gpu': Input should be 'auto', 'cpu' or 'cuda'"),
    ({"eval_steps": 0}, "DPO_EVAL_STEPS='0': Input should be greater than or equal to 1"),
    ({"checkpoint_steps": -4}, "DPO_CHECKPOINT_STEPS='-4': Input should be greater than or equal to 0"),
    ({"checkpoint_minutes": -1}, "DPO_CHECKPOINT_MINUTES='-1': Input should be greater than or equal to 0"),
    ({"checkpoint_minutes": "inf"}, "DPO_CHECKPOINT_MINUTES='inf': Input should be a finite number"),
]
# Relations between fields: the same sentence from both readers.
BAD_RELATIONS = [
    ({"logging_steps": 2, "eval_steps": 3}, "eval_steps 3 must be a multiple of logging_steps 2"),
    ({"logging_steps": 2, "checkpoint_steps": 5}, "checkpoint_steps 5 must be a multiple of logging_steps 2"),
    ({"max_steps": 3}, "max_steps 3 must be at least logging_steps 5"),
]


def _set_env(monkeypatch, settings: dict) -> None:
    for key, value in settings.items():
        monkeypatch.setenv(f"DPO_{key.upper()}", str(value))


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_a_setting_out_of_range_is_named_with_its_value_and_rule(tmp_path, monkeypatch, settings, message):
    _set_env(monkeypatch, settings)
    with pytest.raises(ValueError, match=f"^{message}$"):
        experiments_from_env()
    # the job's config file: the same rule, naming the file and the field
    (name, value), *_ = settings.items()
    config = {"base_model": "m", "pairs_path": "p", "output_dir": "o", "seed": 0, name: value}
    (tmp_path / "c.json").write_text(json.dumps(config).replace('"nan"', "NaN").replace('"inf"', "Infinity"))
    with pytest.raises(ValueError, match=rf"c.json: RunConfig: {name}="):
        RunConfig.from_json(tmp_path / "c.json")


@pytest.mark.parametrize(("settings", "message"), BAD_RELATIONS)
def test_step_intervals_that_do_not_fit_together_are_refused(tmp_path, monkeypatch, settings, message):
    config = {"base_model": "m", "pairs_path": "p", "output_dir": "o", "seed": 0, **settings}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"c.json: RunConfig: {message}"):
        RunConfig.from_json(tmp_path / "c.json")
    _set_env(monkeypatch, settings)
    with pytest.raises(ValueError, match=rf"experiment 'v3' \(recipe tiny, its dpo and DPO_<FIELD>\): {message}"):
        experiments_from_env()


def test_a_blank_base_model_is_refused(monkeypatch):
    monkeypatch.setenv("DPO_BASE_MODEL", "")
    with pytest.raises(ValueError, match="DPO_BASE_MODEL='': String should have at least 1 character"):
        experiments_from_env()


def test_counts_from_the_environment_must_be_positive(monkeypatch):
    monkeypatch.setenv("PRISM_SYNTHETIC_USERS", "0")
    with pytest.raises(ValueError, match="^PRISM_SYNTHETIC_USERS='0': must be at least 1$"):
        int_from_env("PRISM_SYNTHETIC_USERS", 1500, minimum=1)


def test_the_main_job_stops_on_a_bad_setting_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "PRISM_STORAGE": str(tmp_path), "DPO_BETA": "-0.1"}
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets", "run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "prism_assets: DPO_BETA='-0.1': Input should be greater than 0"


@pytest.mark.parametrize(
    ("config", "values", "message"),
    [
        (ExperimentSpec, {"alpha": 2.0}, "alpha\n  Input should be less than 1"),
        (ExperimentSpec, {"min_level_users": 0}, "min_level_users\n  Input should be greater than or equal"),
        (report.ReportConfig, {"curve_metric": "accuracy"}, "curve_metric\n  Input should be 'heldout_acc', "),
    ],
)
def test_per_asset_run_config_out_of_range_names_the_field_and_rule(config, values, message):
    with pytest.raises(ValidationError, match=message):
        config(**values)
