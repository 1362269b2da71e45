"""Settings checked where they are read: the job's JSON config and the code location's environment."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from pydantic import ValidationError

from prism_assets.assets import report
from prism_assets.experiments import ExperimentSpec
from prism_assets.platform import Configuration
from prism_assets.training.settings import RunConfig, TrainingSettings

# (settings, what is wrong, as the environment's reader says it: DPO_<FIELD>='value': rule)
BAD_SETTINGS = [
    ({"max_steps": -5}, "DPO_MAX_STEPS='-5': Input should be greater than or equal to 1"),
    ({"batch_size": 0}, "DPO_BATCH_SIZE='0': Input should be greater than or equal to 1"),
    ({"learning_rate": "nan"}, "DPO_LEARNING_RATE='nan': Input should be a finite number"),
    ({"beta": -0.1}, r"DPO_BETA='-0.1': Input should be greater than 0"),
    ({"heldout_share": 0.6}, "DPO_HELDOUT_SHARE='0.6': Input should be less than or equal to 0.5"),
    ({"curve_heldout_pairs": 0}, "DPO_CURVE_HELDOUT_PAIRS='0': Input should be greater than or equal to 1"),
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


def experiments_from_env():
    return Configuration.from_environ(os.environ).experiments()


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
    with pytest.raises(ValueError, match="^PRISM_SYNTHETIC_USERS='0': Input should be greater than or equal to 1$"):
        experiments_from_env()


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


def test_the_environment_s_settings_are_converted_and_a_misspelt_one_is_named():
    environ = {"DPO_LEARNING_RATE": "2e-5", "DPO_BALANCE_GROUPS": "true", "DPO_RECIPE": "original"}
    configuration = Configuration.from_environ(environ)
    assert configuration.dpo == {"learning_rate": 2e-5, "balance_groups": True}  # DPO_RECIPE is the platform's
    assert configuration.platform.recipe == "original"
    with pytest.raises(ValueError, match="DPO_LERNING_RATE: TrainingSettings has no setting 'lerning_rate'"):
        Configuration.from_environ({**environ, "DPO_LERNING_RATE": "1"})
    # empty: an optional setting back to None (no periodic checkpoints); a required one is an error
    assert Configuration.from_environ({"DPO_CHECKPOINT_MINUTES": ""}).dpo["checkpoint_minutes"] is None
    with pytest.raises(ValueError, match="DPO_MAX_STEPS=''"):
        Configuration.from_environ({"DPO_MAX_STEPS": ""})
    with pytest.raises(ValueError, match="DPO_MAX_STEPS='many'"):
        Configuration.from_environ({"DPO_MAX_STEPS": "many"})
    with pytest.raises(ValueError, match="PRISM_SLURM_CPUS_PER_TAS: SlurmLauncher has no setting 'cpus_per_tas'"):
        Configuration.from_environ({"PRISM_SLURM_CPUS_PER_TAS": "2"})
    assert Configuration.from_environ({"PRISM_SLURM_SETUP_LINES": "module load x;;source v"}).slurm == {
        "setup_lines": ["module load x", "source v"]
    }


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PRISM_SEEDS_PER_TICK", "two", "Input should be a valid integer, unable to parse string as an integer"),
        ("PRISM_SYNTHETIC_SEED", "-1", "Input should be greater than or equal to 0"),
        ("PRISM_SYNTHETIC_EFFECTS", "some", "Input should be 'planted' or 'none'"),
        ("DPO_LAUNCHER", "kubernetes", "Input should be 'local' or 'slurm'"),
        ("DPO_RECIPE", "huge", r"expected one of \['original', 'tiny'\]"),
        ("DPO_THREADS_PER_RUN", "0", "Input should be greater than or equal to 1"),
        ("PRISM_SEED_SCHEDULE_CRON", "daily", "expected a cron string of five fields"),
        ("PRISM_AUTOMATION", "on", "Input should be 'stopped' or 'running'"),
    ],
)
def test_a_platform_setting_out_of_range_is_one_line_naming_it(variable, value, message):
    with pytest.raises(ValueError, match=f"^{variable}={value!r}: {message}"):
        Configuration.from_environ({variable: value})


def test_platform_settings_are_read_with_where_they_came_from():
    configuration = Configuration.from_environ({"PRISM_SEEDS_PER_TICK": " 3 ", "PRISM_EXPERIMENTS": "v3, v2"})
    assert configuration.platform.seeds_per_tick == 3 and configuration.platform.experiments == ["v3", "v2"]
    rows = {row["variable"]: row for row in configuration.rows()}
    assert rows["PRISM_SEEDS_PER_TICK"]["source"] == "environment" and rows["PRISM_SOURCE"]["source"] == "default"
    assert rows["DPO_LEARNING_RATE"]["source"].startswith("recipe tiny")
    # every setting of the three schemas is listed, once, with its help
    from prism_assets.platform import PlatformSettings
    from resources.slurm import SlurmLauncher

    expected = (
        len(PlatformSettings.model_fields) + len(TrainingSettings.model_fields) + len(SlurmLauncher.model_fields)
    )
    assert len(rows) == expected
    assert all(row["help"] for row in rows.values()), [v for v, row in rows.items() if not row["help"]]


def test_the_settings_command_lists_every_setting(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets", "settings", "--help-text"],
        cwd=REPO,
        env={**os.environ, "PRISM_SYNTHETIC_SEED": "7"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^PRISM_SYNTHETIC_SEED +7 +environment$", done.stdout, re.M)
    assert re.search(r"^DPO_BETA +0.1 +recipe tiny", done.stdout, re.M)
    assert re.search(r"^PRISM_SLURM_TIME_LIMIT +02:00:00 +default$", done.stdout, re.M)


def _one_line(tmp_path, *args: str, **environ: str) -> str:
    """`python -m prism_assets <args>` in this environment (DAGSTER_HOME and PRISM_STORAGE in tmp_path unless given):
    it must stop with exit code 2 and one `prism_assets: ` line on stderr, no traceback. That line, without the
    prefix."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PRISM_STORAGE": str(tmp_path / "storage"), **environ}
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("prism_assets: "), done.stderr[-3000:]
    return lines[0].removeprefix("prism_assets: ")


@pytest.mark.parametrize("what", ["directory", "latin-1"])
def test_an_experiments_file_that_is_a_directory_or_not_utf8_is_one_line_naming_it(tmp_path, what):
    path = tmp_path / "experiments.toml"
    if what == "directory":
        path.mkdir()
        expected = f"{path}: a directory, not an experiments file (PRISM_EXPERIMENTS_FILE names a TOML file)"
    else:
        path.write_bytes('[v3]\ndescription = "v3, résumé"\npreset = "v3"\n'.encode("latin-1"))
        expected = f"{path}: not UTF-8 text (byte 0xe9 at offset 25): an experiments file is TOML, which is UTF-8"
    assert _one_line(tmp_path, "run", PRISM_EXPERIMENTS_FILE=str(path)) == expected


def test_orphans_without_slurm_s_commands_names_the_missing_one(tmp_path):
    (tmp_path / "bin").mkdir()  # a PATH without squeue (the interpreter is started by its full path)
    line = _one_line(tmp_path, "orphans", DPO_LAUNCHER="slurm", PATH=str(tmp_path / "bin"))
    assert line.startswith("`squeue` is not on PATH: DPO_LAUNCHER=slurm runs SLURM's commands (sbatch, squeue,")


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_a_storage_that_cannot_be_a_directory_is_one_line_before_any_work(tmp_path, where):
    (tmp_path / "afile").write_text("not a directory")
    storage = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "storage"
    line = _one_line(tmp_path, "run", PRISM_STORAGE=str(storage), DAGSTER_HOME=str(tmp_path / "home"))
    what = "a file" if where == "file" else f"under {tmp_path / 'afile'}, a file"
    assert line == f"PRISM_STORAGE={str(storage)!r}: {storage} is {what}, not a directory: point it at a directory"
    assert not (tmp_path / "home").exists()  # refused before DAGSTER_HOME was looked at, let alone an instance made
    # the code location refuses it too (dagster dev loads it), with the same line
    from prism_assets.location import build

    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        build(Configuration.from_environ({"PRISM_STORAGE": str(storage)}))


def test_a_storage_that_cannot_be_written_is_one_line(tmp_path):
    """A directory this user cannot write in, or make: as root, one in sysfs (root writes in any other directory)."""
    if os.geteuid() != 0:
        storage = tmp_path / "storage"
        storage.mkdir(mode=0o500)
    elif Path("/sys/kernel").is_dir():
        storage = Path("/sys/prism-storage")
    else:
        pytest.skip("root writes in any directory, and there is no sysfs")
    line = _one_line(tmp_path, "run", PRISM_STORAGE=str(storage))
    assert line.startswith(f"PRISM_STORAGE={str(storage)!r}: cannot write in {storage} (")
    assert line.endswith("): point PRISM_STORAGE at a directory this user can write")


@pytest.mark.parametrize(
    ("flag", "value"), [("--parallel", "0"), ("--parallel", "-1"), ("--seeds", "-1"), ("--seeds", "two")]
)
def test_the_main_job_refuses_counts_below_one(tmp_path, flag, value):
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets", "run", flag, value],
        cwd=REPO,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path), "PRISM_STORAGE": str(tmp_path / "storage")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    *usage, last = done.stderr.strip().splitlines()
    assert usage[0].startswith("usage: python -m prism_assets run ")
    rule = "expected an integer, got 'two'" if value == "two" else f"must be at least 1, got {value}"
    assert last == f"python -m prism_assets run: error: argument {flag}: {rule}"
    assert not (tmp_path / "storage").exists()


def test_the_documented_table_of_settings_is_the_declaration_s():
    """docs/configuration.md holds `python -m prism_assets settings --markdown` verbatim: a setting added, removed or
    redescribed without the table fails here."""
    from prism_assets.cli import settings_table

    text = (REPO / "docs" / "configuration.md").read_text()
    documented = text.split("<!-- settings: python -m prism_assets settings --markdown -->\n")[1].split(
        "\n<!-- /settings"
    )[0]
    assert documented == settings_table()
