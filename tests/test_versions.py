"""Code versions from source."""

from pathlib import Path
from typing import Any

import pytest
from builders import OTHER_DPO_SETTINGS

from prism_assets import versions
from prism_assets.assets import dpo


def test_source_version_ignores_comments_layout_and_docstrings_but_not_code(tmp_path, monkeypatch):
    def version(source):
        (tmp_path / "edited.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        return versions.source_version("edited")

    base = version('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    assert version('"""Other doc."""\n# comment\ndef f(x):  # here too\n\n    return (x +\n            1)\n') == base
    assert version('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 2\n') != base
    with pytest.raises(ValueError, match="no Python source"):
        versions.source_version("sys")


def test_code_versions_follow_the_logic_modules_imports(tmp_path, monkeypatch):
    # The trainer's own imports decide what a DPO run's code version covers: nobody lists the step's modules.
    covered = versions.code_modules(dpo, "prism_assets.training.trainer")
    assert {
        "prism_assets.training.engine",
        "prism_assets.training.logps",
        "prism_assets.training.packing",
        "prism_assets.training.metrics",
    } <= set(covered)
    assert "prism_assets.dataset.pairs" not in covered and "prism_assets.versions" not in covered
    # an edit to a module reached only through imports changes the version
    package = tmp_path / "prism_assets" / "training"
    package.mkdir(parents=True)
    (package / "entry.py").write_text("from prism_assets.training.helper import f\n")
    (package / "helper.py").write_text("def f():\n    return 1\n")
    monkeypatch.setattr(versions, "_module_file", lambda name: tmp_path.joinpath(*name.split(".")).with_suffix(".py"))
    monkeypatch.setattr(versions, "_source", lambda name: (name, versions._module_file(name).read_text()))
    before = versions.source_version("prism_assets.training.entry")
    (package / "helper.py").write_text("def f():\n    return 2\n")
    assert versions.source_version("prism_assets.training.entry") != before


# What changing one field of v3 marks unsynced (docs/ui.md, "Rematerialize only what changed"); nothing of v2. Every
# field of the experiments file and every DPO setting must be listed here.
FIT, SPLITS = "v3/ordered_logit_fit", "v3/significant_splits"
RUNS, TABLE, REPORT = "v3/group_dpo_run", "correspondence_table", "research_report"
DOWNSTREAM_OF_RUNS = {RUNS, TABLE, REPORT}
EXPERIMENT_FIELDS: dict[str, tuple[Any, set[str]]] = {  # field: (another value, what it marks unsynced)
    "description": ("another description", {REPORT}),
    "enabled": (False, {REPORT}),
    "boundaries": ([10.0, 20.0], {FIT, SPLITS, *DOWNSTREAM_OF_RUNS}),
    "categorical": (["age"], {FIT, SPLITS, *DOWNSTREAM_OF_RUNS}),
    "continuous": (["stated_prefs_safety"], {FIT, SPLITS, *DOWNSTREAM_OF_RUNS}),
    "min_level_users": (5, {FIT, SPLITS, *DOWNSTREAM_OF_RUNS}),
    "discovery_share": (0.5, {FIT, SPLITS, *DOWNSTREAM_OF_RUNS}),
    "alpha": (0.01, {SPLITS, *DOWNSTREAM_OF_RUNS}),
    "preset": ("auto", {SPLITS, *DOWNSTREAM_OF_RUNS}),
    "random_splits": (5, {SPLITS, *DOWNSTREAM_OF_RUNS}),
    "min_group_users": (10, {SPLITS, *DOWNSTREAM_OF_RUNS}),
    "min_group_pairs": (10, {SPLITS, *DOWNSTREAM_OF_RUNS}),
    "train_small_splits": (True, {SPLITS, *DOWNSTREAM_OF_RUNS}),
    "verdict_alpha": (0.01, {TABLE, REPORT}),
    "min_effect": (0.05, {TABLE, REPORT}),
    "recipe": ("original", {"reference_logps", *DOWNSTREAM_OF_RUNS}),  # original: max_length 1024
    "base_model": ("tiny:4", {"reference_logps", *DOWNSTREAM_OF_RUNS}),
    "dpo": ({"beta": 0.2}, DOWNSTREAM_OF_RUNS),
}
DPO_SETTINGS: dict[str, Any] = OTHER_DPO_SETTINGS  # setting: another value
DPO_UNSYNCED = {  # what a DPO setting marks: the runs down, and the references for what their log-probs depend on
    "base_model": {"reference_logps", *DOWNSTREAM_OF_RUNS},
    "max_length": {"reference_logps", *DOWNSTREAM_OF_RUNS},
    "checkpoint_steps": set(),
    "checkpoint_minutes": set(),
    "device": set(),
    "report_to": set(),
    "tracking_dir": set(),
    "mlflow_tracking_uri": set(),
    "mlflow_experiment": set(),
}


def _unsynced(before: dict, after: dict) -> set[str]:
    """Keys whose code version changed or that are new (a reference of another model); references as one name."""
    changed = {key for key in after if before.get(key) != after[key]}
    return {"reference_logps" if key.startswith("reference_logps/") else key for key in changed}


def _code_versions(v3) -> dict:
    from builders import dagster_definitions, experiment

    v2 = experiment("v2", "v2", spec={"boundaries": [14], "alpha": 0.1})
    assets, _ = dagster_definitions(Path("/nowhere"), [v3, v2])
    return {key.to_user_string(): version for a in assets for key, version in a.code_versions_by_key.items()}


def test_every_experiment_field_marks_unsynced_exactly_what_it_changes():
    from builders import experiment

    from prism_assets.experiments import ExperimentSpec

    assert set(EXPERIMENT_FIELDS) == set(ExperimentSpec.model_fields)  # a new field must be listed here
    base: dict[str, Any] = {"logging_steps": 4}
    before = _code_versions(experiment("v3", "v3", **base))
    for field, (value, expected) in EXPERIMENT_FIELDS.items():
        spec = {field: value} if field not in ("dpo", "base_model") else {}
        dpo = {**base, **(value if field == "dpo" else {})}
        if field == "base_model":
            dpo["base_model"] = value
        if field == "recipe":
            dpo = {}
        preset = spec.pop("preset", "v3")
        after = _code_versions(experiment("v3", preset, spec=spec, **dpo))
        assert _unsynced(before, after) == expected, field


def test_every_dpo_setting_marks_unsynced_exactly_what_it_changes():
    from builders import experiment

    from prism_assets.training.settings import TrainingSettings

    assert set(DPO_SETTINGS) == set(TrainingSettings.model_fields)  # a new setting must be listed here
    base: dict[str, Any] = {"logging_steps": 4, "eval_steps": None}
    before = _code_versions(experiment("v3", "v3", **base))
    for name, value in DPO_SETTINGS.items():
        after = _code_versions(experiment("v3", "v3", **{**base, name: value}))
        assert _unsynced(before, after) == DPO_UNSYNCED.get(name, DOWNSTREAM_OF_RUNS), name
