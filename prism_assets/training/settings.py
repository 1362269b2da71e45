"""The one schema of a DPO run's settings, and the recipes as instances of it.

`TrainingSettings` declares every setting that decides a run, once, with its default and help. The
Dagster resource (`assets.dpo.DpoSettings`) adds where things live; the job-side `RunConfig` adds
what one run is (pairs, seed, output directory); `ReferenceConfig` takes the fields the reference
log-probs depend on. Each field says in its metadata whether it is part of the settings' fingerprint
(what a run learns), whether a checkpoint may be resumed under another value, and whether the
reference log-probs depend on it. Imports neither torch nor Dagster.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

# Field metadata keys (json_schema_extra), read by `fields_where`.
LEARNS, RESUMABLE, REFERENCE = "learns", "resumable", "reference"


def setting(
    default: Any,
    help: str,
    *,
    learns: bool = True,
    resumable: bool = False,
    reference: bool = False,
    **constraints: Any,
):
    """A field of the schema: its default, its help, what it is part of (see module docstring) and the
    constraints its value must meet (pydantic's `gt`, `ge`, `lt`, `allow_inf_nan`, ...).

    learns: part of the fingerprint, so a change marks every DPO partition unsynced.
    resumable: a checkpoint written under another value may be resumed (paths, device, cadence).
    reference: the base model's log-probs of a pair depend on it.
    """
    return Field(
        default,
        description=help,
        json_schema_extra={LEARNS: learns, RESUMABLE: resumable, REFERENCE: reference},
        **constraints,
    )


def fields_where(model: type[BaseModel], key: str, value: bool = True) -> tuple[str, ...]:
    """The names of `model`'s fields whose metadata `key` is `value` (a field without metadata: False)."""

    def meta(field) -> dict:
        return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}

    return tuple(name for name, field in model.model_fields.items() if meta(field).get(key, False) is value)


# The experiment trackers a run can report to (`report_to`, as TRL's): `prism_assets.training.tracking` has one
# implementation each; their packages are the `trackers` install extra.
TRACKERS = ("tensorboard", "mlflow")


def tracker_names(value: Any) -> Any:
    """`report_to` as TRL takes it: a name, comma-separated names or a list of them; 'all' is every tracker, 'none'
    none. A name that is no tracker is an error naming it and the ones there are."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        return value  # not names: the field's type refuses it
    chosen: list[str] = []
    for name in (name.strip().lower() for name in names):
        if name in ("", "none"):
            continue
        if name != "all" and name not in TRACKERS:
            raise PydanticCustomError(
                "unknown_tracker",
                "unknown tracker {name}; report_to takes {known}, 'all' or 'none'",
                {"name": repr(name), "known": ", ".join(TRACKERS)},
            )
        chosen += [t for t in (TRACKERS if name == "all" else (name,)) if t not in chosen]
    return chosen


class TrainingSettings(BaseModel):
    """Base model and DPO hyperparameters of a run. Defaults: the tiny CPU model's (`DPO_RECIPE=tiny`, which also
    evaluates the held-out pairs every 10 steps rather than at every logged step)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = setting(
        "tiny",
        "'tiny' (a 2-layer Qwen2 built offline), a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a "
        "local model directory",
        resumable=True,
        reference=True,
        min_length=1,
    )
    max_steps: int = setting(30, "optimizer steps of a run", ge=1)
    batch_size: int = setting(8, "pairs per step", ge=1)
    beta: float = setting(
        0.1, "DPO's β: the strength of the KL penalty towards the base model", gt=0, allow_inf_nan=False
    )
    learning_rate: float = setting(1e-3, "AdamW's peak learning rate (linear decay to 0)", gt=0, allow_inf_nan=False)
    logging_steps: int = setting(5, "a curve row (and a possible checkpoint) every N steps", ge=1)
    eval_steps: int | None = setting(
        None,
        "held-out evaluation every N steps, a multiple of logging_steps (none: every logged step); the "
        "last logged step is always evaluated",
        ge=1,
    )
    max_length: int = setting(
        256, "tokens of a prompt and response together (TRL's keep_end truncation)", reference=True, ge=1
    )
    heldout_share: float = setting(
        0.15,
        "share of the users held out in each seed: no run of the seed trains on them and every run evaluates all "
        "their pairs; successive seeds hold out disjoint users (seed s: the users whose hash falls in "
        "[s·share, (s+1)·share) mod 1)",
        gt=0,
        le=0.5,
        allow_inf_nan=False,
    )
    heldout_cross_share: float = setting(
        1 / 3,
        "share of the other groups' held-out users a split's run also evaluates, for the 2×2 of models × pairs (its "
        "own held-out users are all evaluated; the baseline evaluates every held-out user)",
        gt=0,
        le=1,
        allow_inf_nan=False,
    )
    curve_heldout_pairs: int = setting(
        64,
        "held-out pairs of the run's own group evaluated at the evaluation steps the primary metric does not read "
        "(the learning curve's points); the steps it reads evaluate every held-out pair",
        ge=1,
    )
    balance_groups: bool = setting(False, "both groups of a split train on the smaller group's number of pairs")
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward (less memory, slower)", resumable=True
    )
    checkpoint_steps: int | None = setting(
        None,
        "a checkpoint every N steps, a multiple of logging_steps (0 or none: no periodic checkpoints; a SLURM "
        "signal always checkpoints)",
        ge=0,
        learns=False,
        resumable=True,
    )
    checkpoint_minutes: float | None = setting(
        None,
        "a checkpoint at the first logged step this many minutes after the last one",
        learns=False,
        resumable=True,
        ge=0,
        allow_inf_nan=False,
    )
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where to train", learns=False, resumable=True)
    # Where a run is reported: none of these changes what it learns, and a resumed run may report elsewhere.
    report_to: Annotated[list[str], BeforeValidator(tracker_names)] = setting(
        [],
        "experiment trackers the run reports its settings, curve and summary metrics to, as TRL's report_to: "
        f"{', '.join(TRACKERS)} (comma-separated; 'all': every one, 'none': none); their packages are the "
        "trackers extra (pip install -e '.[trackers]')",
        learns=False,
        resumable=True,
    )
    tracking_dir: str | None = setting(
        None,
        "where TensorBoard's event files go, a directory per run (<dir>/<experiment>/<cell>/seed<seed>-<run id>); "
        "none: <storage>/tracking/tensorboard (a config run by hand: <output_dir>/tracking/tensorboard)",
        learns=False,
        resumable=True,
    )
    mlflow_tracking_uri: str | None = setting(
        None,
        "MLflow's tracking store: a database (sqlite:///<path>.db) or a tracking server (http://host:5000); none: "
        "sqlite:///<storage>/tracking/mlflow.db (a config run by hand: <output_dir>/tracking/mlflow.db)",
        learns=False,
        resumable=True,
    )
    mlflow_experiment: str = setting(
        "prism-dpo",
        "the MLflow experiment the runs are logged in (each tagged with its experiment, cell, split, group, seed)",
        learns=False,
        resumable=True,
        min_length=1,
    )

    def training_values(self) -> dict[str, Any]:
        """This schema's fields and values (of a subclass too: what reaches the trainer)."""
        return {name: getattr(self, name) for name in TrainingSettings.model_fields}


LEARNING_FIELDS = fields_where(TrainingSettings, LEARNS)  # what a run learns depends on
REFERENCE_FIELDS = fields_where(TrainingSettings, REFERENCE)  # what the base model's log-probs of a pair depend on


def fingerprint(settings: TrainingSettings, fields: tuple[str, ...] = LEARNING_FIELDS) -> str:
    """Hash of the settings that change what a run learns (not where it runs), or of `fields`."""
    values = {name: getattr(settings, name) for name in fields}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


# `DPO_RECIPE`: the tiny CPU model's defaults, or the original experiment's hyperparameters.
RECIPES: dict[str, TrainingSettings] = {
    # 60 steps: at 30 a group's models had not settled, and random groups of users differed by what each run happened
    # to learn first (docs/statistics.md); held-out pairs every 20 steps: all of them at 60, the curve's at 20 and 40
    "tiny": TrainingSettings(max_steps=60, eval_steps=20),
    "original": TrainingSettings(
        max_steps=2000,
        batch_size=8,
        beta=0.1,
        learning_rate=5e-6,
        logging_steps=25,
        eval_steps=100,
        max_length=1024,
        checkpoint_minutes=10,
    ),
}


def step_problem(settings: TrainingSettings) -> str | None:
    """What is wrong with the relations between the step intervals of `settings`, or None (each field's own
    range is the schema's). Checkpoints and held-out evaluations happen on logged steps only, so a resumed run
    logs and evaluates exactly as an uninterrupted one."""
    logging_steps, checkpoint_steps, eval_steps = (
        settings.logging_steps,
        settings.checkpoint_steps,
        settings.eval_steps,
    )
    if settings.max_steps < logging_steps:
        return (
            f"max_steps {settings.max_steps} must be at least logging_steps {logging_steps} (nothing would be logged)"
        )
    if checkpoint_steps and checkpoint_steps % logging_steps:
        return f"checkpoint_steps {checkpoint_steps} must be a multiple of logging_steps {logging_steps}"
    if eval_steps is not None and eval_steps % logging_steps:
        return f"eval_steps {eval_steps} must be a multiple of logging_steps {logging_steps}"
    return None


def validation_problems(error: ValidationError) -> str:
    """A pydantic error as one line a user can act on: each field, what was wrong with it and the value."""

    def problem(e) -> str:
        field = ".".join(map(str, e["loc"]))
        if e["type"] == "extra_forbidden":
            return f"unknown key {field!r}"
        if e["type"] == "missing":
            return f"missing key {field!r}"
        message = e["msg"].removeprefix("Value error, ")
        return f"{field}={e['input']!r}: {message}" if field else message

    return f"{error.title}: " + "; ".join(problem(e) for e in error.errors())


class JobConfig(BaseModel):
    """A job's JSON config: unknown or missing keys are errors naming the file; relative paths are relative to
    the file, so a run directory can move (to a cluster) whole."""

    model_config = ConfigDict(extra="forbid")
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        try:
            config = cls.model_validate_json(Path(path).read_text())
        except ValidationError as error:
            raise ValueError(f"{path}: {validation_problems(error)}") from None
        here = Path(path).resolve().parent
        paths = {name: getattr(config, name) for name in cls.PATH_FIELDS}
        return config.model_copy(
            update={name: str(here / value) for name, value in paths.items() if value is not None}
        )


class RunConfig(JobConfig, TrainingSettings):
    """One DPO run: the settings (base_model resolved to a path or hub id), its pairs, seed and output directory."""

    PATH_FIELDS = ("pairs_path", "output_dir", "tracking_dir")

    pairs_path: str = setting(..., "the run's pairs (parquet); relative to the config file", resumable=True)
    output_dir: str = setting(..., "where the run writes its outputs", resumable=True)
    seed: int = setting(..., "the run's seed: its batches, sampling and initialisation", ge=0, le=2**32 - 1)
    user_ids: list[str] | None = setting(None, "train on these users' pairs only (none: every pair in the file)")
    max_train_pairs: int | None = setting(None, "train on at most this many pairs (balance_groups)")
    keep_checkpoints: bool = setting(False, "keep the checkpoints after a finished run", learns=False, resumable=True)
    label: dict = setting(
        {}, "experiment / cell / split / group / seed / run id, for humans and trackers", learns=False, resumable=True
    )
    code_version: str | None = setting(
        None,
        "the trainer code's version the asset recorded (`versions.source_version`): other code refuses to run",
        learns=False,
        resumable=True,
    )

    @model_validator(mode="after")
    def _step_intervals(self) -> Self:
        problem = step_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    def last_logged(self, step: int) -> bool:
        """Whether `step` is the run's last logged step (max_steps need not be a multiple of logging_steps)."""
        return step + self.logging_steps > self.max_steps

    def evaluates_at(self, step: int) -> bool:
        """Whether the held-out pairs are evaluated at logged step `step`."""
        return self.eval_steps is None or step % self.eval_steps == 0 or self.last_logged(step)

    def evaluated_steps(self) -> list[int]:
        """Every logged step at which the held-out pairs are evaluated."""
        logged = range(self.logging_steps, self.max_steps + 1, self.logging_steps)
        return [step for step in logged if self.evaluates_at(step)]

    def full_evaluation_steps(self, tail_fraction: float) -> set[int]:
        """The evaluated steps the primary metric reads (the last `tail_fraction` of them, at least one): there every
        held-out pair is evaluated; elsewhere `curve_heldout_pairs` of the run's own."""
        steps = self.evaluated_steps()
        return set(steps[-max(1, math.ceil(tail_fraction * len(steps))) :])

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the run's curve, stored with its checkpoints: every field not resumable."""
        return {name: getattr(self, name) for name in fields_where(RunConfig, RESUMABLE, False)}


class ReferenceConfig(JobConfig):
    """The reference precompute's job: the base model's log-probs of every pair in `pairs_path`."""

    PATH_FIELDS = ("pairs_path", "output_path")

    base_model: str
    max_length: int
    pairs_path: str
    output_path: str
    device: str = TrainingSettings.model_fields["device"].default
    code_version: str | None = Field(None, description="the reference job code's version the asset recorded")
    batch_size: int = Field(32, description="sequences a forward pass (one padding-free row)")
