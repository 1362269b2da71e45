"""Experiments side by side: the file and its errors, runs shared between experiments, and their comparison."""

import json
import os
import subprocess
import sys

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from builders import dagster_definitions, experiment, markdown, materialize_partition, upstream_of_runs
from conftest import REPO

from prism_assets import experiments, partitions
from prism_assets.statistics import correspondence

SHIPPED = REPO / "experiments.toml"


def test_the_shipped_file_has_v3_and_v2_as_the_research_ran_them_and_larger_models_off():
    specs = experiments.read_experiments(SHIPPED)
    v3, v2 = specs["v3"], specs["v2"]
    assert (v3.boundaries, v3.alpha, v3.preset, v3.enabled) == ("quartiles", 0.05, "v3", True)
    assert (v2.boundaries, v2.alpha, v2.preset, v2.enabled) == ([14.0], 0.1, "v2", True)
    assert specs["v3_1_5b"].base_model == "Qwen/Qwen2.5-1.5B-Instruct" and not specs["v3_1_5b"].enabled
    loaded = experiments.load_experiments(SHIPPED, None, {})
    assert [e.name for e in loaded] == ["v3", "v2"]
    assert loaded[0].settings == loaded[1].settings  # the same DPO settings: their common runs are shared
    deeper = experiments.load_experiments(SHIPPED, ["v3", "v3_tiny4"], {"max_steps": 10})
    assert [e.settings.base_model for e in deeper] == ["tiny", "tiny:4"]
    assert {e.settings.max_steps for e in deeper} == {10}  # DPO_<FIELD> over every experiment's settings


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[v3]\nalpha = 2\n", "experiment 'v3': alpha=2: Input should be less than 1"),
        (
            "[v3]\nboundaries = [14, 6]\n",
            "experiment 'v3': boundaries=\\[14, 6\\]: boundaries must be strictly increasing",
        ),
        ("[v3]\nboundaries = []\n", "experiment 'v3': boundaries=\\[\\]: boundaries is an empty list"),
        (
            '[v3]\nboundaries = "deciles"\n',
            "experiment 'v3': boundaries='deciles': boundaries must be 'quartiles' or a list",
        ),
        ('[v3]\npreset = "v4"\n', "experiment 'v3': preset='v4': Input should be 'auto', 'v2' or 'v3'"),
        ("[v3]\nalhpa = 0.1\n", "experiment 'v3': unknown key 'alhpa'"),
        ('[v3]\nrecipe = "huge"\n', "experiment 'v3': recipe='huge': unknown recipe 'huge'"),
        ('[v3]\nbase_model = "tiny"\n[v3.dpo]\nbase_model = "tiny:4"\n', "experiment 'v3': dpo=.*set it next to"),
        ("[v3]\n[v3.dpo]\nlerning_rate = 0.1\n", "experiment 'v3', dpo: unknown key 'lerning_rate'"),
        ("[v3]\n[v3.dpo]\nbeta = -1\n", "experiment 'v3', dpo: beta=-1: Input should be greater than 0"),
        ("[v3]\n[v3.dpo]\nmax_steps = 3\n", "experiment 'v3' .*: max_steps 3 must be at least logging_steps 5"),
        ('[v3]\nbase_model = "tiny:x"\n', "experiment 'v3': base_model 'tiny:x': expected 'tiny' or"),
        ("[v3]\nalpha = 0.1\n[v3]\nalpha = 0.2\n", "not valid TOML: .*v3"),
        ("[3v]\n", "experiment name '3v': expected a letter"),
        ("v3 = 1\n", "v3 = 1: an experiment is a table"),
        ("", "defines no experiment"),
        ("[v3]\nenabled = false\n", "no experiment is enabled"),
    ],
)
def test_a_malformed_or_contradictory_file_names_the_experiment_and_field(tmp_path, text, message):
    path = tmp_path / "experiments.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        experiments.load_experiments(path, None, {})


def test_the_main_job_names_a_bad_experiments_file_or_an_unknown_experiment_in_one_line(tmp_path):
    path = tmp_path / "experiments.toml"
    path.write_text("[v3]\nalpha = 2\n")
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "PRISM_STORAGE": str(tmp_path)}
    for extra, args, expected in (
        ({"PRISM_EXPERIMENTS_FILE": str(path)}, [], f"{path}: experiment 'v3': alpha=2: Input should be less than 1"),
        ({}, ["--experiments", "v3,v9"], f"PRISM_EXPERIMENTS: ['v9'] not in {SHIPPED}"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "prism_assets", "run", *args],
            cwd=REPO,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2 and done.stderr.startswith(f"prism_assets: {expected}"), done.stderr[-2000:]
        assert "Traceback" not in done.stderr


def _trained(result) -> bool:
    [event] = result.get_asset_materialization_events()
    return event.materialization.metadata["trained"].value


def test_v2_after_v3_trains_only_what_v3_did_not_and_the_comparison_pairs_their_common_splits(tmp_path):
    """v3's baseline, age and region runs, then every v2 partition: v2's baseline, S1_age and S6_region are the same
    runs (the same users, model and settings) and are adopted; its other splits are trained. One reference_logps
    serves both. The table compares the splits they share by definition, whatever each calls them."""
    v3 = experiment("v3", "v3", spec={"random_splits": 2}, max_steps=4, logging_steps=2)
    v2 = experiment(
        "v2", "v2", spec={"boundaries": [14], "alpha": 0.1, "random_splits": 2}, max_steps=4, logging_steps=2
    )
    assets, resources = dagster_definitions(tmp_path, [v3, v2], warm=True)
    assert len([a for a in assets if a.key.path[0] == "reference_logps"]) == 1
    with dg.instance_for_test() as instance:
        dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
        instance.add_dynamic_partitions(partitions.SEED, ["0"])
        v3_cells = ["baseline", "S1_age.A", "S1_age.B", "S8_region.A", "S8_region.B", "R1.A", "R1.B", "R2.A", "R2.B"]
        assert all(_trained(materialize_partition(assets, resources, instance, "v3", c, 0)) for c in v3_cells)
        v2_cells = instance.get_dynamic_partitions(partitions.cells_name("v2"))
        assert len(v2_cells) == 1 + 2 * (6 + 2)
        trained = {c: _trained(materialize_partition(assets, resources, instance, "v2", c, 0)) for c in v2_cells}
        table = dg.materialize(
            assets, selection=[dg.AssetKey("correspondence_table")], instance=instance, resources=resources
        )
    shared = {"baseline", "S1_age.A", "S1_age.B", "S6_region.A", "S6_region.B", "R1.A", "R1.B", "R2.A", "R2.B"}
    assert {c for c, was in trained.items() if not was} == shared
    assert len(list((tmp_path / "runs").glob("*/seed0/metrics.json"))) == len(v3_cells) + len(v2_cells) - len(shared)
    output = table.output_for_node("correspondence_table")
    comparison = output["comparison"]
    assert set(zip(comparison["split_1"], comparison["split_2"])) == {("S1_age", "S1_age"), ("S8_region", "S6_region")}
    # one set of runs read twice: the same numbers, said to be the same runs rather than a stable direction
    assert (comparison["experiment_1"] == "v3").all() and (comparison["direction"] == "same runs").all()
    assert np.allclose(comparison["mean_d_1"], comparison["mean_d_2"])
    [event] = table.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert "S8_region / S6_region" in markdown(metadata["comparison"]) and "comparison_plot" in metadata
    assert metadata["num_distinct_runs"].value == len(v3_cells) + len(v2_cells) - len(shared)
    assert "| S4_familiarity" in markdown(metadata["v2"]) and "| S5_behavioral" in markdown(metadata["v2"])


def test_two_model_sizes_on_the_same_splits_are_compared(tmp_path):
    """v3 on the 2-layer and the 4-layer tiny Qwen2: each its own reference_logps and runs; their shared splits
    (all of them) side by side."""
    small = experiment("v3", "v3", spec={"random_splits": 0}, max_steps=4, logging_steps=2)
    deep = experiment("v3_tiny4", "v3", spec={"random_splits": 0}, base_model="tiny:4", max_steps=4, logging_steps=2)
    assets, resources = dagster_definitions(tmp_path, [small, deep], warm=True)
    assert len([a for a in assets if a.key.path[0] == "reference_logps"]) == 2
    with dg.instance_for_test() as instance:
        dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
        instance.add_dynamic_partitions(partitions.SEED, ["0", "1"])
        for name in ("v3", "v3_tiny4"):
            for cell in ("S1_age.A", "S1_age.B", "S8_region.A", "S8_region.B"):
                for seed in (0, 1):
                    assert _trained(materialize_partition(assets, resources, instance, name, cell, seed))
        table = dg.materialize(
            assets, selection=[dg.AssetKey("correspondence_table")], instance=instance, resources=resources
        )
    configs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/seed0/config.json")]
    assert len(configs) == 8 and {c["base_model"].rsplit("/", 1)[-1] for c in configs} == {
        "tiny-qwen2",
        "tiny-qwen2-4l",
    }
    comparison = table.output_for_node("correspondence_table")["comparison"]
    assert list(comparison["split_1"]) == ["S1_age", "S8_region"] and (comparison["n_seeds_2"] == 2).all()
    assert not np.allclose(comparison["mean_d_1"], comparison["mean_d_2"])  # other models, other runs


def test_the_comparison_pairs_splits_by_their_users_not_their_names():
    def rows(values):
        return pd.DataFrame(
            [
                {
                    "split": split,
                    "predicted": predicted,
                    "n_seeds": 3,
                    "mean_d": mean,
                    "ci_low": mean - 0.1,
                    "ci_high": mean + 0.1,
                    "verdict": verdict,
                }
                for split, predicted, mean, verdict in values
            ]
        )

    tables = {
        "v3": rows([("S1_age", "A>B", 0.2, "MATCH"), ("S4_safety", "A<B", 0.05, "INCONCLUSIVE")]),
        "v2": rows([("S3_safety", "A>B", -0.04, "INCONCLUSIVE"), ("S1_age", "A>B", 0.1, "INCONCLUSIVE")]),
    }
    groups = {
        "v3": {"S1_age": ("a", "b"), "S4_safety": ("c", "d"), "S9": ("x", "y")},
        "v2": {"S1_age": ("a", "z"), "S3_safety": ("c", "d")},  # v2's S1_age: other users in B
    }
    runs = {"v3": {"S4_safety": frozenset({"r1"})}, "v2": {"S3_safety": frozenset({"r2"})}}  # other runs
    assert len(correspondence.compare_experiments(tables, groups, runs)) == 1
    tables["v2"].loc[0, "n_seeds"] = 0  # no runs yet on one side: nothing to compare
    assert correspondence.compare_experiments(tables, groups, runs).empty
    tables["v2"].loc[0, "n_seeds"] = 3
    comparison = correspondence.compare_experiments(tables, groups, runs)
    assert comparison[["split_1", "split_2", "direction", "verdicts_agree"]].values.tolist() == [
        ["S4_safety", "S3_safety", "flip", True]
    ]
    assert comparison[["predicted_1", "predicted_2"]].values.tolist() == [["A<B", "A>B"]]


def test_honest_mode_fits_on_discovery_users_and_trains_on_the_others(tmp_path):
    """discovery_share: the ordered logit sees only the discovery users' pairs; every split (random ones included) and
    every DPO run's pairs — baseline and held-out users too — are the confirmation users'."""
    from prism_assets import cells, keys
    from prism_assets.statistics.splits import discovery_users

    honest = experiment("v3h", "v3", spec={"discovery_share": 0.5, "random_splits": 2})
    assets, resources = dagster_definitions(tmp_path, [honest])
    selection = [
        dg.AssetKey("raw_prism"),
        dg.AssetKey("within_model_pairs"),
        keys.ordered_logit_fit("v3h"),
        keys.significant_splits("v3h"),
    ]
    with dg.instance_for_test() as instance:
        result = dg.materialize(assets, selection=selection, instance=instance, resources=resources)
    pairs = result.output_for_node("within_model_pairs")
    fit = result.output_for_node("v3h__ordered_logit_fit")
    splits = result.output_for_node("v3h__significant_splits")
    discovery = set(pairs.loc[discovery_users(pairs["user_id"], 0.5).to_numpy(), "user_id"])
    confirmation = set(pairs["user_id"]) - discovery
    assert 0.35 < len(discovery) / pairs["user_id"].nunique() < 0.65
    # the fit saw the discovery users' pairs only (of those, the ones its covariates cover)
    assert 0 < fit["num_users"] <= len(discovery) and fit["num_pairs"] <= int(pairs["user_id"].isin(discovery).sum())
    assert set(splits["membership"]["user_id"]) <= confirmation  # no split holds a discovery user
    assert set(splits["dpo_users"]) == confirmation
    settings = honest.settings
    for split, group in ((None, None), ("S1_age", "A"), ("R1", "B")):
        run = cells.run_pairs(pairs, splits, split, group, settings, seed=0)
        assert set(run["user_id"]) <= confirmation and len(run) > 0
