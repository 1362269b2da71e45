"""The Dagster code location: every asset, check, resource and instigator, wired from the environment.

The only module that reads environment variables (README, "Configuration"): PRISM_* for the data, storage,
experiments and automation, DPO_RECIPE and DPO_<FIELD> for the settings schema (over every experiment's),
DPO_LAUNCHER and PRISM_SLURM_<FIELD> for the launcher.
"""

import os
import sys
import typing
from pathlib import Path

import dagster as dg
from pydantic import BaseModel, TypeAdapter, ValidationError

from prism_assets import automation, experiments
from prism_assets.assets import asset_graph, data, dpo
from prism_assets.training.settings import RECIPES, TrainingSettings
from resources.io_managers import ParquetIOManager
from resources.launcher import LocalLauncher
from resources.slurm import SlurmLauncher

STORAGE = Path(os.environ.get("PRISM_STORAGE", "storage")).resolve()


def settings_from_env(
    prefix: str, settings: type[BaseModel], ignore: tuple[str, ...] = (), lists: dict | None = None
) -> dict:
    """<prefix><FIELD>=value for each field of `settings`, converted to the field's type and checked against its
    constraints (a value out of range is an error naming the variable, the value and the rule).

    `lists` maps a list-valued field to how its one string is split. A variable with the prefix that names no
    field is an error (a typo must not be silently ignored), except those in `ignore`.
    """
    values: dict[str, typing.Any] = {}
    for key, raw in os.environ.items():
        if not key.startswith(prefix) or key in ignore:
            continue
        name = key.removeprefix(prefix).lower()
        if name not in settings.model_fields:
            raise ValueError(
                f"{key}: {settings.__name__} has no setting {name!r}; "
                f"settings: {', '.join(sorted(settings.model_fields))}"
            )
        field = settings.model_fields[name]
        annotation = field.annotation
        assert annotation is not None  # pydantic gives every field an annotation
        if not raw.strip() and type(None) in typing.get_args(annotation):  # DPO_EVAL_STEPS= : back to None
            values[name] = None
            continue
        value = (lists or {}).get(name, lambda text: text)(raw)
        try:
            # The field's own constraints (ranges, finiteness) travel with it: Annotated[type, FieldInfo].
            checked: typing.Any = typing.Annotated[annotation, field]
            values[name] = TypeAdapter(checked).validate_python(value)
        except ValidationError as error:
            raise ValueError(f"{key}={raw!r}: {error.errors()[0]['msg']}") from None
    return values


@typing.overload
def int_from_env(name: str, default: int, minimum: int = ...) -> int: ...
@typing.overload
def int_from_env(name: str, default: None, minimum: int = ...) -> int | None: ...
def int_from_env(name: str, default: int | None, minimum: int = 0) -> int | None:
    """An integer variable (unset or empty: `default`); other text, or a value below `minimum`, is an error naming
    the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _slurm_launcher() -> SlurmLauncher:
    """PRISM_SLURM_<FIELD> for each SlurmLauncher field (PRISM_SLURM_PARTITION=gpu, …)."""
    return SlurmLauncher(
        **settings_from_env(
            "PRISM_SLURM_",
            SlurmLauncher,
            lists={
                "extra_sbatch_args": str.split,
                # lines separated by ";;", e.g. "module load cuda/12;;source /shared/venv/bin/activate"
                "setup_lines": lambda text: [line for line in text.split(";;") if line.strip()],
            },
        )
    )


def _launcher():
    kind = os.environ.get("DPO_LAUNCHER", "local")
    if kind == "local":
        return LocalLauncher(
            threads_per_run=int_from_env("DPO_THREADS_PER_RUN", None, minimum=1), warm_modules=list(dpo.WARM_MODULES)
        )
    if kind == "slurm":
        return _slurm_launcher()
    raise ValueError(f"DPO_LAUNCHER={kind!r}: expected 'local' or 'slurm'")


def _recipe() -> str:
    name = os.environ.get("DPO_RECIPE", "tiny")
    if name not in RECIPES:
        raise ValueError(f"DPO_RECIPE={name!r}: expected one of {sorted(RECIPES)}")
    return name


def experiments_from_env() -> list[experiments.Experiment]:
    """The experiments of PRISM_EXPERIMENTS_FILE (default: the repository's experiments.toml) that PRISM_EXPERIMENTS
    names (comma-separated; unset: those the file enables), each with DPO_<FIELD> over its settings."""
    path = Path(os.environ.get("PRISM_EXPERIMENTS_FILE") or experiments.DEFAULT_FILE)
    raw = os.environ.get("PRISM_EXPERIMENTS", "").strip()
    selected = [name.strip() for name in raw.split(",") if name.strip()] if raw else None
    environment = settings_from_env(
        "DPO_", TrainingSettings, ignore=("DPO_RECIPE", "DPO_LAUNCHER", "DPO_THREADS_PER_RUN", "DPO_PYTHON")
    )
    return experiments.load_experiments(path, selected, environment, _recipe())


EXPERIMENTS = experiments_from_env()
ASSETS = asset_graph(EXPERIMENTS)
DPO_KEYS = [dg.AssetKey([e.name, "group_dpo_run"]) for e in EXPERIMENTS]
TABLE_KEY = dg.AssetKey("correspondence_table")
REPORT_KEY = dg.AssetKey("research_report")
UNPARTITIONED = [asset for asset in ASSETS if asset.key not in {*DPO_KEYS, TABLE_KEY, REPORT_KEY}]
CHECKS = [data.chosen_scored_higher, data.both_responses_from_one_model, data.no_duplicated_interaction]

RESOURCES = {
    "prism_source": data.PrismSource(
        source=os.environ.get("PRISM_SOURCE", data.SYNTHETIC),
        synthetic_users=int_from_env("PRISM_SYNTHETIC_USERS", 1500, minimum=1),
        synthetic_seed=int_from_env("PRISM_SYNTHETIC_SEED", 0),
        synthetic_dir=str(STORAGE / "synthetic_prism"),
    ),
    "io_manager": ParquetIOManager(base_dir=str(STORAGE / "assets")),
    "dpo_storage": dpo.DpoStorage(
        models_dir=str(STORAGE / "models"),
        runs_dir=str(STORAGE / "runs"),
        reports_dir=str(STORAGE / "reports"),
        python=os.environ.get("DPO_PYTHON") or sys.executable,
    ),
    "launcher": _launcher(),
}


def _automation_running() -> bool:
    value = os.environ.get("PRISM_AUTOMATION", "stopped")
    if value not in ("stopped", "running"):
        raise ValueError(f"PRISM_AUTOMATION={value!r}: expected 'stopped' or 'running'")
    return value == "running"


RUNNING = _automation_running()
DPO_JOBS = [automation.dpo_job(e.name) for e in EXPERIMENTS]
SCHEDULES = [
    automation.build_add_seeds_schedule(
        e.name,
        os.environ.get("PRISM_SEED_SCHEDULE_CRON", "0 2 * * 0"),
        int_from_env("PRISM_SEEDS_PER_TICK", 2, minimum=1),
        RUNNING,
    )
    for e in EXPERIMENTS
]
SENSORS = [
    automation.build_new_cells_sensor([e.name for e in EXPERIMENTS], RUNNING),
    automation.build_report_sensor(DPO_KEYS, RUNNING),
    automation.build_orphans_sensor(RESOURCES["dpo_storage"].runs_dir, RUNNING),
]

defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=CHECKS,
    resources=RESOURCES,
    jobs=[*DPO_JOBS, automation.report_job],
    schedules=SCHEDULES,
    sensors=SENSORS,
)
