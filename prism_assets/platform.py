"""The platform's settings, declared once: each with its environment variable, default, help and rule.

Owns `PlatformSettings` (where the data comes from, where outputs go, which experiments, how jobs are launched, the
automation) and `Configuration.from_environ`, the one reader of the environment: the platform's variables, the DPO
settings over every experiment's (`DPO_<FIELD>`, declared by `training.settings.TrainingSettings`) and the SLURM
launcher's (`PRISM_SLURM_<FIELD>`, `resources.slurm.SlurmLauncher`). A value that breaks its rule, or a variable with
one of these prefixes that names no setting, is an error of one line naming the variable, the value and the rule.
`python -m prism_assets settings` prints every setting with its value and where it came from.
"""

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from prism_assets.experiments import DEFAULT_FILE, Experiment, load_experiments
from prism_assets.training.settings import RECIPES, TrainingSettings
from resources.slurm import SlurmLauncher

ENV = "env"  # a field's environment variable, in its json_schema_extra


def platform_setting(variable: str, default: Any, help: str, **constraints: Any):
    return Field(default, description=help, json_schema_extra={ENV: variable}, **constraints)


class PlatformSettings(BaseModel):
    """The platform's own settings (README, "Configuration"; `python -m prism_assets settings`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = platform_setting(
        "PRISM_SOURCE",
        "synthetic",
        "where PRISM is read: 'synthetic' (generated with planted effects), 'hf' (HannahRoseKirk/prism-alignment on "
        "the Hugging Face Hub) or a directory holding survey.jsonl, conversations.jsonl, utterances.jsonl",
        min_length=1,
    )
    synthetic_users: int = platform_setting("PRISM_SYNTHETIC_USERS", 1500, "participants of the synthetic PRISM", ge=1)
    synthetic_seed: int = platform_setting(
        "PRISM_SYNTHETIC_SEED", 0, "seed of the synthetic PRISM (same seed: byte-identical files)", ge=0, le=2**32 - 1
    )
    synthetic_effects: Literal["planted", "none"] = platform_setting(
        "PRISM_SYNTHETIC_EFFECTS",
        "planted",
        "'planted': the synthetic PRISM plants gap effects and a DPO taste by age (truth.json records them); "
        "'none': no effect at all, a world where every verdict should be INCONCLUSIVE",
    )
    storage: str = platform_setting(
        "PRISM_STORAGE", "storage", "where asset outputs, run folders, models and reports are written", min_length=1
    )
    experiments: list[str] | None = platform_setting(
        "PRISM_EXPERIMENTS",
        None,
        "the experiments to build, comma-separated names of the experiments file (unset: those it enables)",
    )
    experiments_file: str = platform_setting(
        "PRISM_EXPERIMENTS_FILE", str(DEFAULT_FILE), "the experiments file (TOML)", min_length=1
    )
    recipe: str = platform_setting(
        "DPO_RECIPE",
        "tiny",
        "the DPO recipe of every experiment that names none: 'tiny' (CPU-sized) or 'original' (the research's "
        "hyperparameters, for a GPU)",
    )
    launcher: Literal["local", "slurm"] = platform_setting(
        "DPO_LAUNCHER", "local", "how a DPO job starts: 'local' (a process here) or 'slurm' (an sbatch job each)"
    )
    python: str | None = platform_setting(
        "DPO_PYTHON",
        None,
        "the interpreter that runs the jobs (unset: this one; on a cluster, a venv of this project)",
    )
    threads_per_run: int | None = platform_setting(
        "DPO_THREADS_PER_RUN",
        None,
        "CPU threads of one local run (unset: every core; divided by the main job)",
        ge=1,
    )
    seed_schedule_cron: str = platform_setting(
        "PRISM_SEED_SCHEDULE_CRON", "0 2 * * 0", "when the add_seeds schedules tick (cron)", min_length=1
    )
    seeds_per_tick: int = platform_setting("PRISM_SEEDS_PER_TICK", 2, "seeds each add_seeds tick adds", ge=1)
    automation: Literal["stopped", "running"] = platform_setting(
        "PRISM_AUTOMATION", "stopped", "'running' starts the schedules and sensors by default in this deployment"
    )

    @field_validator("experiments", mode="before")
    @classmethod
    def _names(cls, value):
        if isinstance(value, str):
            names = [name.strip() for name in value.split(",") if name.strip()]
            return names or None
        return value

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value):
        if value not in RECIPES:
            raise ValueError(f"expected one of {sorted(RECIPES)}")
        return value

    @field_validator("seed_schedule_cron")
    @classmethod
    def _cron(cls, value):
        if len(value.split()) != 5:
            raise ValueError("expected a cron string of five fields, such as '0 2 * * 0'")
        return value

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage).resolve()

    def storage_problem(self) -> str | None:
        """Why PRISM_STORAGE cannot be the outputs' directory, as far as looking at it tells (it, or the nearest of
        its parents that exists, is not a directory); None where it can be. Writes nothing."""
        directory = self.storage_dir
        try:
            existing = next(path for path in (directory, *directory.parents) if path.exists())
        except OSError as error:  # a parent this user may not look into
            return f"PRISM_STORAGE={self.storage!r}: cannot look at {directory} ({error.strerror or error})"
        if existing.is_dir():
            return None
        where = "a file" if existing == directory else f"under {existing}, a file"
        return f"PRISM_STORAGE={self.storage!r}: {directory} is {where}, not a directory: point it at a directory"


def variables(model: type[BaseModel]) -> dict[str, str]:
    """field → environment variable of a model whose fields name theirs (PlatformSettings)."""
    return {
        name: str(f.json_schema_extra[ENV])
        for name, f in model.model_fields.items()
        if isinstance(f.json_schema_extra, dict)
    }


def prefixed(model: type[BaseModel], prefix: str) -> dict[str, str]:
    """field → <prefix><FIELD> for every field of `model`."""
    return {name: f"{prefix}{name.upper()}" for name in model.model_fields}


def checked(model: type[BaseModel], name: str, variable: str, raw: str, split: Callable[[str], Any] | None = None):
    """One variable's text as the field's type, checked against the field's own constraints; an empty value sets an
    optional field back to None. A value out of range is an error naming the variable, the value and the rule."""
    info = model.model_fields[name]
    annotation = info.annotation
    assert annotation is not None  # pydantic gives every field an annotation
    if not raw.strip() and type(None) in typing.get_args(annotation):  # DPO_EVAL_STEPS= : back to None
        return None
    try:
        # The field's own constraints (ranges, finiteness) travel with it: Annotated[type, FieldInfo], a type built
        # at run time (Any: mypy checks only the type forms written out in the source).
        field_type: Any = typing.Annotated[annotation, info]
        return TypeAdapter(field_type).validate_python(split(raw) if split else raw)
    except ValidationError as error:
        raise ValueError(f"{variable}={raw!r}: {_message(error)}") from None


def _message(error: ValidationError) -> str:
    return error.errors()[0]["msg"].removeprefix("Value error, ")


# SLURM settings whose one string is a list: extra options by spaces, setup lines by ";;".
SLURM_LISTS: dict[str, Callable[[str], Any]] = {
    "extra_sbatch_args": str.split,
    "setup_lines": lambda text: [line for line in text.split(";;") if line.strip()],
}


@dataclass(frozen=True)
class Configuration:
    """Everything the code location is built from: the platform's settings, the DPO settings over every experiment's,
    the SLURM launcher's, and where each value came from."""

    platform: PlatformSettings = field(default_factory=PlatformSettings)
    dpo: dict[str, Any] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # variable → its raw value, for those set

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Configuration":
        platform_names = variables(PlatformSettings)
        platform: dict[str, Any] = {}
        dpo: dict[str, Any] = {}
        slurm: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name, variable in platform_names.items():
            raw = environ.get(variable, "")
            if not raw.strip():  # unset or empty: the default
                continue
            try:  # the whole model's rules for this one field: its type, range and own validators
                platform[name] = getattr(PlatformSettings.model_validate({name: raw}), name)
            except ValidationError as error:
                raise ValueError(f"{variable}={raw!r}: {_message(error)}") from None
            sources[variable] = raw
        own = set(platform_names.values())
        for prefix, model, values, lists in (
            ("DPO_", TrainingSettings, dpo, {}),
            ("PRISM_SLURM_", SlurmLauncher, slurm, SLURM_LISTS),
        ):
            for variable in sorted(environ):
                if not variable.startswith(prefix) or variable in own:
                    continue
                name = variable.removeprefix(prefix).lower()
                if name not in model.model_fields:
                    raise ValueError(
                        f"{variable}: {model.__name__} has no setting {name!r}; "
                        f"settings: {', '.join(sorted(model.model_fields))}"
                    )
                values[name] = checked(model, name, variable, environ[variable], lists.get(name))
                sources[variable] = environ[variable]
        return cls(PlatformSettings(**platform), dpo, slurm, sources)

    def with_platform(self, **changes: Any) -> "Configuration":
        """This configuration with some platform settings changed (the main job's flags), checked."""
        values = {**self.platform.model_dump(), **changes}
        return Configuration(PlatformSettings(**values), self.dpo, self.slurm, self.sources)

    def experiments(self) -> list[Experiment]:
        """The experiments to build: PRISM_EXPERIMENTS of the file (or those it enables), DPO_<FIELD> over each."""
        return load_experiments(
            Path(self.platform.experiments_file), self.platform.experiments, self.dpo, self.platform.recipe
        )

    def rows(self) -> list[dict[str, str]]:
        """Every setting: variable, value, where it came from, and its help (`python -m prism_assets settings`)."""
        rows = []
        for name, variable in variables(PlatformSettings).items():
            value = getattr(self.platform, name)
            rows.append(self._row(variable, value, PlatformSettings.model_fields[name].description or ""))
        for prefix, model, values, defaults in (
            ("DPO_", TrainingSettings, self.dpo, RECIPES[self.platform.recipe].training_values()),
            ("PRISM_SLURM_", SlurmLauncher, self.slurm, {n: f.default for n, f in SlurmLauncher.model_fields.items()}),
        ):
            for name, info in model.model_fields.items():
                if f"{prefix}{name.upper()}" in variables(PlatformSettings).values():
                    continue
                value = values.get(name, defaults.get(name))
                rows.append(self._row(f"{prefix}{name.upper()}", value, info.description or "", prefix == "DPO_"))
        return rows

    def _row(self, variable: str, value: Any, help: str, recipe: bool = False) -> dict[str, str]:
        if variable in self.sources:
            source = "environment"
        elif recipe:
            source = f"recipe {self.platform.recipe} (an experiment may set its own)"
        else:
            source = "default"
        shown = ",".join(value) if isinstance(value, list) else ("" if value is None else str(value))
        return {"variable": variable, "value": shown, "source": source, "help": help}
