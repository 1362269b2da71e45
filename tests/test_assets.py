"""The data and statistics assets materialize in-process with a real Dagster instance."""

import dagster as dg
import pytest
from builders import V3_SPLITS, experiment

from prism_assets import definitions
from prism_assets.assets import data, stats
from prism_assets.experiments import ExperimentSpec
from resources.io_managers import ParquetIOManager, read_bundle
from resources.prism_source import PrismSource

DATA = [data.raw_prism, data.within_model_pairs]
ASSETS = [*DATA, *stats.build_statistics(experiment("auto", "auto"))]
RANDOM = [f"R{k}" for k in range(1, ExperimentSpec().random_splits + 1)]  # the random splits, by default
CHECKS = [data.chosen_scored_higher, data.both_responses_from_one_model, data.no_duplicated_interaction]


def _resources(tmp_path, source):
    return {
        "prism_source": PrismSource(
            source=source, synthetic_users=300, synthetic_seed=3, synthetic_dir=str(tmp_path / "synthetic")
        ),
        "io_manager": ParquetIOManager(base_dir=str(tmp_path / "assets")),
    }


def _metadata(result, asset):
    [event] = [
        e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey.from_user_string(asset)
    ]
    return event.materialization.metadata


def test_definitions_load():
    dg.Definitions.validate_loadable(definitions.defs)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    with dg.instance_for_test() as instance:
        result = dg.materialize([*ASSETS, *CHECKS], instance=instance, resources=_resources(tmp_path, "synthetic"))
        yield result, tmp_path


def test_pipeline_materializes_with_counts_and_passing_checks(synthetic_run):
    result, tmp_path = synthetic_run
    assert result.success
    pairs_meta = _metadata(result, "within_model_pairs")
    assert isinstance(pairs_meta["num_pairs"].value, int) and pairs_meta["num_pairs"].value > 1000
    assert isinstance(pairs_meta["num_users"].value, int)
    assert pairs_meta["dropped_score_tie"].value > 0
    assert "synthetic" in pairs_meta["source"].value
    raw_meta = _metadata(result, "raw_prism")
    assert raw_meta["synthetic"].value is True and "SYNTHETIC" in raw_meta["synthetic_note"].value
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 3 and all(c.passed for c in checks)
    fit_meta = _metadata(result, "auto/ordered_logit_fit")
    assert "| term" in fit_meta["coefficients"].value and len(fit_meta["boundaries"].value) == 3
    stored = read_bundle(tmp_path / "assets" / "auto" / "significant_splits")
    splits = stored["splits"]
    assert list(splits.loc[splits["random"], "split"]) == RANDOM  # after the predicted ones
    predicted = splits[~splits["random"]]
    assert predicted["split"].iloc[-1].endswith("_region") and predicted["null_control"].iloc[-1]
    assert set(stored["membership"]["group"]) == {"A", "B"}


def test_the_presets_of_the_research_through_their_experiments(synthetic_run):
    _, tmp_path = synthetic_run
    v2 = experiment("v2", "v2", spec={"boundaries": [14], "alpha": 0.1})
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*DATA, *stats.build_statistics(experiment("v3", "v3")), *stats.build_statistics(v2)],
            instance=instance,
            resources=_resources(tmp_path, "synthetic"),
        )
        assert instance.get_dynamic_partitions("v2_cell")[-2:] == [f"{RANDOM[-1]}.A", f"{RANDOM[-1]}.B"]
    splits = result.output_for_node("v3__significant_splits")["splits"]
    assert list(splits["split"]) == [*V3_SPLITS, *RANDOM]
    assert (splits["pairs_a"] > 0).all() and (splits["users_b"] > 0).all()
    v2_splits = result.output_for_node("v2__significant_splits")["splits"]
    assert list(v2_splits["split"]) == [
        "S1_age",
        "S2_personalisation",
        "S3_safety",
        "S4_familiarity",
        "S5_behavioral",
        "S6_region",
        *RANDOM,
    ]
    assert _metadata(result, "v2/ordered_logit_fit")["boundaries"].value == [14.0]
    assert set(_metadata(result, "v2/ordered_logit_fit")["outcome_counts"].value) == {"1", "2"}  # a binary logit


def test_a_split_with_a_group_below_the_smallest_is_listed_not_trained(synthetic_run):
    _, tmp_path = synthetic_run
    stored = read_bundle(tmp_path / "assets" / "auto" / "significant_splits")["splits"]
    smallest = stored[["pairs_a", "pairs_b"]].min(axis=1)
    cut = int(smallest.median()) + 1  # about half the splits have a group below it
    expected = set(stored.loc[(smallest < cut) & ~stored["null_control"], "split"])
    assert expected and stored.loc[stored["null_control"], "split"].iloc[0] not in expected
    for train_small in (False, True):
        small = experiment("small", "auto", spec={"min_group_pairs": cut, "train_small_splits": train_small})
        with dg.instance_for_test() as instance:
            result = dg.materialize(
                [*DATA, *stats.build_statistics(small)], instance=instance, resources=_resources(tmp_path, "synthetic")
            )
            cells = instance.get_dynamic_partitions("small_cell")
        splits = result.output_for_node("small__significant_splits")["splits"]
        listed = _metadata(result, "small/significant_splits")["not_trained_too_small"].value
        assert set(splits["split"]) == set(stored["split"])  # every split is in the table either way
        if train_small:
            assert listed == [] and splits["trained"].all()
            assert {cell.split(".")[0] for cell in cells} == {"baseline", *stored["split"]}
        else:
            assert set(listed) == expected == set(splits.loc[~splits["trained"], "split"])
            assert {cell.split(".")[0] for cell in cells} == {"baseline", *stored["split"]} - expected


def test_directory_source_and_a_clear_error_for_a_bad_source(small_synthetic_dir, tmp_path):
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [data.raw_prism], instance=instance, resources=_resources(tmp_path, str(small_synthetic_dir))
        )
        assert _metadata(result, "raw_prism")["source"].value.startswith("local directory")
        with pytest.raises(ValueError, match="neither 'synthetic', 'hf' nor an existing directory"):
            dg.materialize([data.raw_prism], instance=instance, resources=_resources(tmp_path, str(tmp_path / "nope")))
