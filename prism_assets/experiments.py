"""Experiments as configuration: the named experiments of `experiments.toml`, checked and resolved.

Owns the file's schema (`ExperimentSpec`: the split model's boundaries, α, the split preset, the covariates, the base
model, the DPO recipe and its overrides), reading it (a malformed or contradictory file is an error naming the file,
the experiment and the field) and resolving each experiment's DPO settings: the recipe, then the experiment's
`base_model` and `[<name>.dpo]` overrides, then the environment's DPO_<FIELD> (which apply to every experiment).
Imports neither torch nor Dagster.
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prism_assets.statistics import ordered_logit
from prism_assets.training import tiny_model
from prism_assets.training.settings import RECIPES, TrainingSettings, step_problem, validation_problems

# An experiment's name prefixes its asset keys and partition names: Dagster's name rule, and short.
EXPERIMENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
DEFAULT_FILE = Path(__file__).resolve().parents[1] / "experiments.toml"


class ExperimentSpec(BaseModel):
    """One experiment as the file writes it (README, "Experiments")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field("", description="what the experiment is, for the UI")
    enabled: bool = Field(True, description="materialized by default (PRISM_EXPERIMENTS overrides the file)")
    boundaries: Literal["quartiles"] | list[float] = Field(
        "quartiles",
        description="where the score gap is cut into ordered bins: the data's quartiles, or fixed gaps "
        "(one boundary, e.g. [14], is v2's binary logit of I(gap > 14))",
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="a covariate splits users when one of its terms has p < alpha")
    preset: Literal["auto", "v2", "v3"] = Field(
        "auto", description="auto: a split per significant covariate; v2 / v3: the research's own splits"
    )
    categorical: list[str] = Field(list(ordered_logit.DEFAULT_CATEGORICAL), description="categorical covariates")
    continuous: list[str] = Field(list(ordered_logit.DEFAULT_CONTINUOUS), description="continuous covariates")
    min_level_users: int = Field(10, ge=1, description="a categorical level held by fewer users is left out")
    random_splits: int = Field(
        12,
        ge=0,
        le=199,
        description="K random splits of the users (group sizes spanning the predicted splits'), trained like any "
        "split: the calibrated null; fewer than 2 give no verdict, 19 or more also a rank p-value",
    )
    verdict_alpha: float = Field(
        0.05, gt=0, lt=1, description="a split is MATCH / MISMATCH when its Holm-adjusted p is below this"
    )
    min_effect: float = Field(
        0.03,
        gt=0,
        lt=1,
        description="the |A − B| of held-out accuracy that matters (the research's differences are 0.01–0.06): "
        "the power line says what would detect it",
    )
    discovery_share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="honest mode: the ordered logit is fitted on this share of the users (discovery) and DPO trains "
        "and is evaluated on the rest (confirmation), so no split's direction is chosen from the pairs that test it",
    )
    min_group_users: int = Field(
        50,
        ge=1,
        description="a split with a smaller group is reported, not trained (each seed holds out heldout_share of a "
        "group's users: fewer than about ten held-out users make its variance unreliable)",
    )
    min_group_pairs: int = Field(200, ge=1, description="a split with a group of fewer pairs is reported, not trained")
    train_small_splits: bool = Field(False, description="train the splits below min_group_users / min_group_pairs")
    recipe: str | None = Field(None, description="DPO recipe (tiny, original); none: DPO_RECIPE, else tiny")
    base_model: str | None = Field(None, min_length=1, description="the base model; none: the recipe's")
    dpo: dict[str, Any] = Field({}, description="DPO settings over the recipe's (any field of TrainingSettings)")

    @field_validator("boundaries", mode="before")
    @classmethod
    def _quartiles_or_increasing(cls, boundaries):
        ordered_logit.fixed_boundaries(boundaries)  # the fit's own rule, checked when the file is read
        return boundaries

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, recipe):
        if recipe is not None and recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
        return recipe

    @field_validator("dpo")
    @classmethod
    def _no_base_model_twice(cls, dpo):
        if "base_model" in dpo:
            raise ValueError("base_model is the experiment's own field: set it next to preset, not under dpo")
        return dpo

    def fields(self, names: tuple[str, ...]) -> dict[str, Any]:
        """These fields and their values: what an asset's code version hashes (FIT_FIELDS, SPLIT_FIELDS, ...)."""
        return self.model_dump(include=set(names))


# Which of an experiment's fields each of its assets' outputs depends on: each asset's code version hashes its own
# (and, through its upstream assets' code versions, theirs), so changing a field marks exactly those assets unsynced.
FIT_FIELDS = ("boundaries", "categorical", "continuous", "min_level_users", "discovery_share")
SPLIT_FIELDS = (
    *FIT_FIELDS,
    "alpha",
    "preset",
    "random_splits",
    "min_group_users",
    "min_group_pairs",
    "train_small_splits",
)
VERDICT_FIELDS = ("verdict_alpha", "min_effect")  # correspondence_table's
# The DPO runs' fields are their settings (`training.settings.fingerprint`): `recipe`, `base_model` and `dpo` reach
# them there; `description` and `enabled` reach only the write-up and which experiments are built.


@dataclass(frozen=True)
class Experiment:
    """A named experiment with its DPO settings resolved."""

    name: str
    spec: ExperimentSpec
    settings: TrainingSettings

    @property
    def description(self) -> str:
        return self.spec.description or self.name


def _problem_in(error: ValidationError) -> str:
    return validation_problems(error).split(": ", 1)[1]


def resolve(
    name: str, spec: ExperimentSpec, environment: dict[str, Any], default_recipe: str, where: str
) -> Experiment:
    """The experiment's settings: recipe, then its base model and dpo overrides, then the environment's."""
    recipe = spec.recipe or default_recipe
    values = {
        **RECIPES[recipe].training_values(),
        **({"base_model": spec.base_model} if spec.base_model else {}),
        **spec.dpo,
    }
    try:
        TrainingSettings(**values)
    except ValidationError as error:
        raise ValueError(f"{where}: experiment {name!r}, dpo: {_problem_in(error)}") from None
    settings = TrainingSettings(**{**values, **environment})
    try:
        tiny_model.tiny_layers(settings.base_model)
    except ValueError as error:
        raise ValueError(f"{where}: experiment {name!r}: {error}") from None
    problem = step_problem(settings)
    if problem:
        raise ValueError(f"{where}: experiment {name!r} (recipe {recipe}, its dpo and DPO_<FIELD>): {problem}")
    return Experiment(name, spec, settings)


def read_experiments(path: Path) -> dict[str, ExperimentSpec]:
    """Every experiment in the file, checked; an error names the file, the experiment and the field."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such experiments file (PRISM_EXPERIMENTS_FILE)") from None
    except IsADirectoryError:
        raise ValueError(
            f"{path}: a directory, not an experiments file (PRISM_EXPERIMENTS_FILE names a TOML file)"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}): "
            "an experiments file is TOML, which is UTF-8"
        ) from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the experiments file ({error.strerror or error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    if not raw:
        raise ValueError(f"{path}: defines no experiment")
    specs = {}
    for name, table in raw.items():
        if not EXPERIMENT_NAME.fullmatch(name):
            raise ValueError(
                f"{path}: experiment name {name!r}: expected a letter, then letters, digits or _ (at most 40)"
            )
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {name} = {table!r}: an experiment is a table, [{name}]")
        try:
            specs[name] = ExperimentSpec(**table)
        except ValidationError as error:
            raise ValueError(f"{path}: experiment {name!r}: {_problem_in(error)}") from None
    return specs


def load_experiments(
    path: Path, selected: list[str] | None, environment: dict[str, Any], default_recipe: str = "tiny"
) -> list[Experiment]:
    """The experiments to build: `selected` by name (PRISM_EXPERIMENTS), else those the file enables."""
    specs = read_experiments(path)
    if selected is not None:
        unknown = [name for name in selected if name not in specs]
        if unknown:
            raise ValueError(f"PRISM_EXPERIMENTS: {unknown} not in {path} (it has {sorted(specs)})")
        names = list(dict.fromkeys(selected))
    else:
        names = [name for name, spec in specs.items() if spec.enabled]
    if not names:
        raise ValueError(f"{path}: no experiment is enabled (set enabled = true, or PRISM_EXPERIMENTS)")
    return [resolve(name, specs[name], environment, default_recipe, str(path)) for name in names]
