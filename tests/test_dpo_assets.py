"""group_dpo_run partitions and correspondence_table through a real Dagster instance and the local launcher."""

import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from prism_assets import partitions, versions
from prism_assets.assets import data, dpo, report, stats
from resources.io_managers import ParquetIOManager
from resources.launcher import LocalLauncher

UPSTREAM = [data.raw_prism, data.within_model_pairs, stats.ordered_logit_fit, stats.significant_splits]


def _definitions(tmp_path, users=300, **settings):
    dpo_settings = dpo.DpoSettings(
        models_dir=str(tmp_path / "models"),
        runs_dir=str(tmp_path / "runs"),
        reports_dir=str(tmp_path / "reports"),
        **settings,
    )
    assets = [
        *UPSTREAM,
        dpo.build_reference_logps(dpo_settings.fingerprint(dpo.REFERENCE_FIELDS)),
        dpo.build_group_dpo_run(dpo_settings.fingerprint()),
        report.correspondence_table,
    ]
    resources = {
        "prism_source": data.PrismSource(
            synthetic_users=users, synthetic_seed=3, synthetic_dir=str(tmp_path / "prism")
        ),
        "io_manager": ParquetIOManager(base_dir=str(tmp_path / "assets")),
        "dpo_settings": dpo_settings,
        "launcher": LocalLauncher(threads_per_run=1),
    }
    return assets, resources


def _materialize_partition(assets, resources, instance, cell, seed, **kwargs):
    key = dg.MultiPartitionKey({partitions.CELL: cell, partitions.SEED: str(seed)})
    return dg.materialize(
        assets,
        selection=[dg.AssetKey("group_dpo_run")],
        partition_key=key,
        instance=instance,
        resources=resources,
        **kwargs,
    )


@pytest.fixture(scope="module")
def v3_instance(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dpo")
    assets, resources = _definitions(tmp_path, max_steps=6, logging_steps=2)
    with dg.instance_for_test() as instance:
        dg.materialize(
            assets[:-2],
            instance=instance,
            resources=resources,  # all but the DPO runs and the table
            run_config={"ops": {"significant_splits": {"config": {"preset": "v3"}}}},
        )
        instance.add_dynamic_partitions(partitions.SEED, ["0"])
        yield tmp_path, assets, resources, instance


def test_significant_splits_registers_the_cells(v3_instance):
    _, _, _, instance = v3_instance
    cells = instance.get_dynamic_partitions(partitions.CELL)
    assert cells[0] == "baseline" and len(cells) == 17 and "S8_region.B" in cells


def test_a_partition_trains_through_pipes_and_records_its_metrics(v3_instance):
    tmp_path, assets, resources, instance = v3_instance
    result = _materialize_partition(assets, resources, instance, "S8_region.A", 0)
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    run_dir = tmp_path / "runs" / "S8_region.A" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metadata["final_heldout_acc"].value == metrics["final_heldout_acc"]
    assert metadata["run_dir"].value == str(run_dir)
    assert event.materialization.tags["dagster/data_version"] == metrics["data_version"]
    assert (run_dir / "pipes_messages.jsonl").read_text().count("report_asset_materialization") == 1
    logs = "\n".join(e.message for e in instance.all_logs(result.run_id) if e.message)
    assert "step 6/6" in logs
    # the run reads the base model's log-probs and token ids from reference_logps: no reference model, no tokenizing
    ran = json.loads((run_dir / "run.json").read_text())
    assert (ran["reference_logps"], ran["token_ids"]) == ("precomputed", "stored")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["label"] == {"cell": "S8_region.A", "split": "S8_region", "group": "A", "seed": 0}
    assert config["code_version"] == dpo.JOB_CODE_VERSIONS[dpo.TRAINER_MODULE]  # the trainer checked it


def test_a_failing_trainer_fails_the_partition_with_its_stderr(v3_instance):
    tmp_path, _, _, instance = v3_instance
    assets, resources = _definitions(
        tmp_path, max_steps=6, logging_steps=2, base_model=str(tmp_path / "no-such-model")
    )
    result = _materialize_partition(assets, resources, instance, "S1_age.B", 0, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "the trainer exited with code 1" in message and "no-such-model" in message


def test_a_failed_attempt_leaves_the_last_successful_run_in_place(v3_instance):
    tmp_path, assets, resources, instance = v3_instance
    assert _materialize_partition(assets, resources, instance, "S8_region.B", 0).success
    run_dir = tmp_path / "runs" / "S8_region.B" / "seed0"
    finished = (run_dir / "metrics.json").read_text()
    failing, failing_resources = _definitions(
        tmp_path, max_steps=6, logging_steps=2, base_model=str(tmp_path / "no-such-model")
    )
    assert not _materialize_partition(
        failing, failing_resources, instance, "S8_region.B", 0, raise_on_error=False
    ).success
    previous = run_dir.with_name("seed0.previous")
    assert (previous / "metrics.json").read_text() == finished  # the successful run's outputs, untouched
    assert "no-such-model" in (run_dir / "stderr.log").read_text()  # the failed attempt, where the failure says
    # another failure keeps them; a success replaces them
    assert not _materialize_partition(
        failing, failing_resources, instance, "S8_region.B", 0, raise_on_error=False
    ).success
    assert (previous / "metrics.json").read_text() == finished
    assert _materialize_partition(assets, resources, instance, "S8_region.B", 0).success
    assert not previous.exists() and (run_dir / "metrics.json").exists()


def test_a_second_launch_of_a_running_partition_is_refused_and_clobbers_nothing(v3_instance):
    """A launch of S8_region.A in another process (its own Dagster instance, the same run directories) while
    this one launches it again: the second fails at once naming the first; the first finishes undisturbed."""
    import subprocess
    import sys
    import time

    tmp_path, assets, resources, instance = v3_instance
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import dagster as dg
from prism_assets import partitions
from test_dpo_assets import _definitions, _materialize_partition
assets, resources = _definitions(Path({str(tmp_path)!r}), max_steps=200, logging_steps=50)
with dg.instance_for_test() as instance:
    instance.add_dynamic_partitions(partitions.CELL, ["S6_helpfulness.A"])
    instance.add_dynamic_partitions(partitions.SEED, ["0"])
    sys.exit(0 if _materialize_partition(assets, resources, instance, "S6_helpfulness.A", 0).success else 1)
""",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = tmp_path / "runs" / "S6_helpfulness.A" / "seed0.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    holder = lock.read_text()
    second = _materialize_partition(assets, resources, instance, "S6_helpfulness.A", 0, raise_on_error=False)
    [failure] = [e for e in second.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"seed0 is in use by {holder}: one run of a partition at a time" in failure.step_failure_data.error.message
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    config = json.loads((tmp_path / "runs" / "S6_helpfulness.A" / "seed0" / "run.json").read_text())
    assert config["max_steps"] == 200  # the first launch's run, whole
    assert lock.read_text() == ""  # released


def test_a_relaunch_resumes_from_the_checkpoints_of_an_interrupted_attempt(v3_instance, tmp_path):
    """The trainer is stopped (SIGTERM: it checkpoints and exits) after its first checkpoint; launching the
    partition again resumes from that checkpoint and ends with the curve of an uninterrupted run."""
    import shutil
    import subprocess
    import threading
    import time

    from builders import run_job

    runs, _, _, instance = v3_instance
    assets, resources = _definitions(runs, max_steps=80, logging_steps=2, checkpoint_steps=8)
    run_dir = runs / "runs" / "S7_diversity.B" / "seed0"

    def interrupt():
        deadline = time.monotonic() + 120
        while not list((run_dir / "trainer").glob("checkpoint-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["pkill", "-TERM", "-f", "--", f"--config {run_dir / 'config.json'}"])

    stopper = threading.Thread(target=interrupt)
    stopper.start()
    assert not _materialize_partition(assets, resources, instance, "S7_diversity.B", 0, raise_on_error=False).success
    stopper.join()
    assert _materialize_partition(assets, resources, instance, "S7_diversity.B", 0).success
    resumed_at = json.loads((run_dir / "run.json").read_text())["resumed_at_step"]
    assert resumed_at is not None and 8 <= resumed_at < 80
    # the same run, uninterrupted, by hand
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run_dir / "pairs.parquet", alone)
    config = json.loads((run_dir / "config.json").read_text())
    run_job(alone, "config", **{**config, "pairs_path": str(alone / "pairs.parquet"), "output_dir": str(alone)})
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "curve.parquet"), pd.read_parquet(alone / "curve.parquet"))


def test_settings_other_than_the_code_versions_are_refused(v3_instance):
    tmp_path, assets, resources, instance = v3_instance
    settings = resources["dpo_settings"]
    changed = dpo.DpoSettings(
        **{**{name: getattr(settings, name) for name in dpo.DpoSettings.model_fields}, "learning_rate": 0.5}
    )
    overridden = {**resources, "dpo_settings": changed}
    result = _materialize_partition(assets, overridden, instance, "S1_age.A", 0, raise_on_error=False)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "are not those this code location was loaded with" in failure.step_failure_data.error.message
    assert not (tmp_path / "runs" / "S1_age.A").exists()  # refused before anything was written or launched


def test_missing_or_corrupt_run_outputs_are_named(tmp_path):
    with pytest.raises(dg.Failure, match="left no metrics.json"):
        dpo.read_run_outputs(tmp_path)
    (tmp_path / "metrics.json").write_text('{"final_heldout_acc": 0.5,')
    (tmp_path / "curve.parquet").write_bytes(b"not parquet")
    with pytest.raises(dg.Failure, match=r"metrics.json is not valid JSON"):
        dpo.read_run_outputs(tmp_path)
    (tmp_path / "metrics.json").write_text(
        '{"final_heldout_acc": 0.5, "mean_heldout_acc_tail": 0.5, "data_version": "x"}'
    )
    with pytest.raises(dg.Failure, match=r"curve.parquet cannot be read as parquet"):
        dpo.read_run_outputs(tmp_path)


def test_training_settings_change_the_dpo_code_version_and_nothing_upstream(tmp_path):
    base = dpo.DpoSettings()
    assert dpo.DpoSettings(learning_rate=5e-6).fingerprint() != base.fingerprint()
    assert dpo.DpoSettings(max_steps=2000).fingerprint() != base.fingerprint()
    assert dpo.DpoSettings(runs_dir="/elsewhere", python="/opt/py").fingerprint() == base.fingerprint()

    def code_versions(settings):
        assets = versions.with_upstream_code_versions(
            [
                *UPSTREAM,
                dpo.build_reference_logps(settings.fingerprint(dpo.REFERENCE_FIELDS)),
                dpo.build_group_dpo_run(settings.fingerprint()),
                report.correspondence_table,
            ]
        )
        return {key.to_user_string(): version for a in assets for key, version in a.code_versions_by_key.items()}

    before, after = code_versions(base), code_versions(dpo.DpoSettings(beta=0.2))
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"group_dpo_run", "correspondence_table"}  # the table's inputs come from new code


@pytest.mark.slow
def test_end_to_end_the_planted_split_matches_and_the_null_control_is_ok(tmp_path):
    """v3 splits on a synthetic PRISM whose 18–34-year-olds choose their style consistently: S1_age (predicted
    A>B) must come out MATCH on held-out accuracy over three seeds, and the region null control OK."""
    assets, resources = _definitions(tmp_path, users=1500)
    with dg.instance_for_test() as instance:
        dg.materialize(
            assets[:-2],
            instance=instance,
            resources=resources,  # all but the DPO runs and the table
            run_config={"ops": {"significant_splits": {"config": {"preset": "v3"}}}},
        )
        instance.add_dynamic_partitions(partitions.SEED, ["0", "1", "2"])
        for cell in ("S1_age.A", "S1_age.B", "S8_region.A", "S8_region.B"):
            for seed in range(3):
                assert _materialize_partition(assets, resources, instance, cell, seed).success
        result = dg.materialize(
            assets, selection=[dg.AssetKey("correspondence_table")], instance=instance, resources=resources
        )
    table = result.output_for_node("correspondence_table")["table"]
    primary = table[table["metric"] == "mean_heldout_acc_tail"].set_index("split")
    shown = ["per_seed_d", "mean_d", "ci_low", "ci_high", "eval_se", "null_abs_mean_d"]
    assert primary.loc["S1_age", "verdict"] == "MATCH", primary.loc[["S1_age", "S8_region"], shown].to_dict("records")
    assert primary.loc["S8_region", "verdict"] == "null OK", primary.loc["S8_region"].to_dict()
    assert primary.loc["S1_age", "sign_consistency"] == "3/3"
    assert primary.loc["S2_education", "n_seeds"] == 0 and primary.loc["S2_education", "verdict"] == "INCONCLUSIVE"
    assert (tmp_path / "reports" / "learning_curves.png").stat().st_size > 10_000
    [event] = result.get_asset_materialization_events()
    assert "| S1_age" in event.materialization.metadata["correspondence"].value


def test_run_pairs_carry_the_reference_token_ids_and_refuse_a_stale_reference_logps():
    import numpy as np
    import pandas as pd

    from prism_assets.training.run_files import REFERENCE_COLUMNS, TEXT_DIGEST_COLUMN, TOKEN_COLUMNS, pair_text_digests

    def texts(ids, answer="yes"):
        return pd.DataFrame(
            {
                "pair_id": ids,
                "prompt": [[{"role": "user", "content": f"q {i}"}] for i in ids],
                "chosen": [answer] * len(ids),
                "rejected": ["no"] * len(ids),
            }
        )

    pairs = texts(["a", "b"]).assign(user_id=["u1", "u2"])
    computed_from = texts(["b", "a", "c"])
    references = pd.DataFrame(
        {
            "pair_id": ["b", "a", "c"],
            REFERENCE_COLUMNS[0]: [-1.0, -2.0, -3.0],
            REFERENCE_COLUMNS[1]: [-4.0, -5.0, -6.0],
            **{c: [np.array([i, 7], dtype=np.int32) for i in range(3)] for c in TOKEN_COLUMNS},
            TEXT_DIGEST_COLUMN: pair_text_digests(computed_from),
        }
    )
    merged = dpo.with_references(pairs, references)
    assert list(merged[REFERENCE_COLUMNS[0]]) == [-2.0, -1.0] and [list(ids) for ids in merged[TOKEN_COLUMNS[0]]] == [
        [1, 7],
        [0, 7],
    ]
    assert list(merged.columns) == [*pairs.columns, *REFERENCE_COLUMNS, *TOKEN_COLUMNS]  # the digest stays behind
    with pytest.raises(dg.Failure, match="1 of 3 pairs have no reference log-probs: rematerialize reference_logps"):
        dpo.with_references(pd.concat([pairs, texts(["z"]).assign(user_id=["u3"])]), references)
    # the same pair ids with other text (another PRISM release or synthetic configuration): every pair is compared
    edited = pairs.assign(chosen=["yes", "yes!"])
    with pytest.raises(dg.Failure, match=r"1 of 2 pairs \(first: 'b'\) have other text than reference_logps computed"):
        dpo.with_references(edited, references)
    prompt_edited = pairs.assign(prompt=[[{"role": "user", "content": "q a"}], [{"role": "system", "content": "q b"}]])
    with pytest.raises(dg.Failure, match=r"1 of 2 pairs \(first: 'b'\)"):
        dpo.with_references(prompt_edited, references)


def test_the_table_leaves_out_runs_of_other_groups_or_settings_and_names_them():
    import pandas as pd

    membership = pd.DataFrame(
        {
            "split": ["S1"] * 4 + ["S2"] * 2,
            "group": ["A", "A", "B", "B", "A", "B"],
            "user_id": ["u1", "u2", "u3", "u4", "u1", "u3"],
        }
    )
    splits = {"splits": pd.DataFrame({"split": ["S1", "S2"]}), "membership": membership}
    digest = dpo.membership_digest
    # S1's group B as a split of the same name made otherwise (another preset, α or fit) held it.
    older_b = digest({"membership": membership.replace({"u4": "u5"})}, "S1", "B")
    rows = [
        ("baseline", None, None, None, "f"),
        ("S1.A", "S1", "A", digest(splits, "S1", "A"), "f"),
        ("S1.B", "S1", "B", older_b, "f"),
        ("S2.A", "S2", "A", digest(splits, "S2", "A"), "g"),
        ("S9.A", "S9", "A", "0" * 16, "f"),
        ("S2.B", "S2", "B", digest(splits, "S2", "B"), "f"),
    ]
    runs = pd.DataFrame(
        [
            {"cell": c, "split": s, "group": g, "seed": 0, "membership_digest": d, "settings_fingerprint": f}
            for c, s, g, d, f in rows
        ]
    )
    kept, left_out = report.current_runs(runs, splits, "f")
    assert list(kept["cell"]) == ["baseline", "S1.A", "S2.B"]
    assert left_out == {
        "split no longer in significant_splits": ["S9.A seed 0"],
        "trained on other users than the group now holds": ["S1.B seed 0"],
        "trained under other DPO settings": ["S2.A seed 0"],
    }
    assert digest(splits, None, None) is None and digest(splits, "S1", "A") != digest(splits, "S1", "B")


def test_every_setting_a_user_can_set_reaches_the_trainer(tmp_path):
    """Each field of the schema, set to a value other than its default, arrives in the config the trainer reads
    (parsed as the trainer parses it); the resource's other fields say only where runs live and run."""
    from prism_assets.training.settings import RunConfig, TrainingSettings

    assert set(dpo.DpoSettings.model_fields) - set(TrainingSettings.model_fields) == {
        "models_dir",
        "runs_dir",
        "reports_dir",
        "python",
    }
    changed = {
        "base_model": str(tmp_path / "model"),
        "max_steps": 40,
        "batch_size": 4,
        "beta": 0.2,
        "learning_rate": 2e-4,
        "logging_steps": 4,
        "eval_steps": 8,
        "max_length": 128,
        "heldout_fraction": 0.2,
        "heldout_max_pairs": 32,
        "balance_groups": True,
        "gradient_checkpointing": True,
        "checkpoint_steps": 8,
        "checkpoint_minutes": 5.0,
        "device": "cpu",
    }
    assert set(changed) == set(TrainingSettings.model_fields)  # a new setting must be listed here, and is checked
    defaults = TrainingSettings()
    assert all(getattr(defaults, name) != value for name, value in changed.items())
    settings = dpo.DpoSettings(**changed)
    path = tmp_path / "config.json"
    path.write_text(dpo.run_config(settings, "S1_age.A", 3, max_train_pairs=None).model_dump_json())
    config = RunConfig.from_json(path)
    assert {name: getattr(config, name) for name in changed} == changed
    assert (config.seed, config.label["cell"]) == (3, "S1_age.A")
