"""group_dpo_run partitions and correspondence_table through a real Dagster instance and the local launcher."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from builders import (
    OTHER_DPO_SETTINGS,
    dagster_definitions,
    experiment,
    markdown,
    materialize_partition,
    run_dir_of,
    run_dirs,
    upstream_of_runs,
)

from prism_assets import cells, partitions, provenance
from prism_assets.assets import dpo
from prism_assets.experiments import ExperimentSpec
from prism_assets.training import run_folder as folder
from prism_assets.training.settings import fingerprint


def _definitions(tmp_path, users=300, python=None, warm=False, **settings):
    """One experiment, v3 (its preset, four random splits, these DPO settings)."""
    return dagster_definitions(tmp_path, [experiment("v3", "v3", **settings)], users=users, python=python, warm=warm)


def _materialize_partition(assets, resources, instance, cell, seed, **kwargs):
    return materialize_partition(assets, resources, instance, "v3", cell, seed, **kwargs)


def _failure(result) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message


@pytest.fixture(scope="module")
def v3_instance(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dpo")
    assets, resources = _definitions(tmp_path, max_steps=6, logging_steps=2)
    with dg.instance_for_test() as instance:
        dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
        instance.add_dynamic_partitions(partitions.SEED, ["0"])
        yield tmp_path, assets, resources, instance


def test_significant_splits_registers_the_cells(v3_instance):
    _, _, _, instance = v3_instance
    cells = instance.get_dynamic_partitions(partitions.cells_name("v3"))
    random = ExperimentSpec().random_splits
    assert cells[0] == "baseline" and len(cells) == 1 + 2 * (8 + random) and "S8_region.B" in cells
    assert f"R{random}.B" in cells


def test_a_partition_trains_through_pipes_and_records_its_metrics(v3_instance):
    tmp_path, assets, resources, instance = v3_instance
    result = _materialize_partition(assets, resources, instance, "S8_region.A", 0)
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    run_dir = run_dir_of(result)
    assert run_dir.parent.parent == tmp_path / "runs" and run_dir.name == "seed0"
    assert run_dir.parent.name == metadata["run_id"].value and metadata["trained"].value is True
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metadata["final_heldout_acc"].value == metrics["final_heldout_acc"]
    assert event.materialization.tags["dagster/data_version"] == metrics["data_version"]
    assert (run_dir / "pipes_messages.jsonl").read_text().count("report_asset_materialization") == 1
    logs = "\n".join(e.message for e in instance.all_logs(result.run_id) if e.message)
    assert "step 6/6" in logs
    # the run reads the base model's log-probs and token ids from reference_logps: no reference model, no tokenizing
    ran = json.loads((run_dir / "run.json").read_text())
    assert (ran["reference_logps"], ran["token_ids"]) == ("precomputed", "stored")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["label"] == {
        "experiment": "v3",
        "cell": "S8_region.A",
        "split": "S8_region",
        "group": "A",
        "seed": 0,
        "run_id": metadata["run_id"].value,
    }
    assert config["code_version"] == dpo.JOB_CODE_VERSIONS[dpo.TRAINER_MODULE]  # the trainer checked it


def _broken_python(tmp_path: Path, code: int = 3) -> str:
    """An interpreter wrapper of a broken environment: says so on stderr and exits with `code`."""
    script = tmp_path / f"broken-python-{code}"
    script.write_text(f"#!/bin/sh\necho 'broken environment: no torch here' >&2\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


def test_a_failing_trainer_fails_the_partition_with_its_stderr(v3_instance):
    tmp_path, _, _, instance = v3_instance
    assets, resources = _definitions(tmp_path, max_steps=6, logging_steps=2, python=_broken_python(tmp_path))
    result = _materialize_partition(assets, resources, instance, "S1_age.B", 0, raise_on_error=False)
    assert not result.success
    message = _failure(result)
    assert "the trainer exited with code 3" in message and "broken environment: no torch here" in message


def test_a_finished_run_is_adopted_and_unreadable_outputs_are_trained_again(v3_instance):
    tmp_path, assets, resources, instance = v3_instance
    first = _materialize_partition(assets, resources, instance, "S8_region.B", 0)
    run_dir = run_dir_of(first)
    finished = (run_dir / "metrics.json").read_text()
    # launched again, even where no trainer could run: the finished run's outputs, not a second training
    _, broken = _definitions(tmp_path, max_steps=6, logging_steps=2, python=_broken_python(tmp_path))
    again = _materialize_partition(assets, broken, instance, "S8_region.B", 0)
    [event] = again.get_asset_materialization_events()
    assert event.materialization.metadata["trained"].value is False and run_dir_of(again) == run_dir
    assert (run_dir / "metrics.json").read_text() == finished
    assert event.materialization.tags["dagster/data_version"] == json.loads(finished)["data_version"]
    # outputs that cannot be read are not adopted: the run is trained again, and says why
    (run_dir / "curve.parquet").write_bytes(b"not parquet")
    retrained = _materialize_partition(assets, resources, instance, "S8_region.B", 0)
    [event] = retrained.get_asset_materialization_events()
    assert event.materialization.metadata["trained"].value is True
    logs = "\n".join(e.message for e in instance.all_logs(retrained.run_id) if e.message)
    assert "its finished outputs cannot be read" in logs and "curve.parquet cannot be read as parquet" in logs
    data_version = json.loads((run_dir / "metrics.json").read_text())["data_version"]
    assert data_version == json.loads(finished)["data_version"]  # deterministic: the same run again


def test_a_second_launch_of_a_running_partition_waits_for_it_and_clobbers_nothing(v3_instance):
    """A launch of S6_helpfulness.A in another process (its own Dagster instance, the same run directories) while
    this one launches it again: the second waits for the first, naming it, and adopts its run; the first finishes
    undisturbed."""
    tmp_path, assets, resources, instance = v3_instance
    settings = {"max_steps": 200, "logging_steps": 50}
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
assets, resources = _definitions(Path({str(tmp_path)!r}), **{settings!r})
with dg.instance_for_test() as instance:  # the inputs are the files the test's instance wrote
    instance.add_dynamic_partitions(partitions.cells_name("v3"), ["S6_helpfulness.A"])
    instance.add_dynamic_partitions(partitions.SEED, ["0"])
    sys.exit(0 if _materialize_partition(assets, resources, instance, "S6_helpfulness.A", 0).success else 1)
""",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, locks = time.monotonic() + 240, []
    while first.poll() is None and time.monotonic() < deadline:
        locks = [lock for lock in (tmp_path / "runs").glob("*/seed0.lock") if lock.read_text()]
        if locks and run_dirs(tmp_path / "runs", "S6_helpfulness.A"):
            break
        time.sleep(0.2)
    [lock] = locks
    holder = lock.read_text()
    assets, resources = _definitions(tmp_path, **settings)
    second = _materialize_partition(assets, resources, instance, "S6_helpfulness.A", 0)
    assert first.stderr is not None  # stderr=PIPE
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    logs = "\n".join(e.message for e in instance.all_logs(second.run_id) if e.message)
    assert f"seed0 is in use by {holder}: waiting for it to end" in logs
    [event] = second.get_asset_materialization_events()
    assert event.materialization.metadata["trained"].value is False  # the first launch's run, adopted
    assert json.loads((run_dir_of(second) / "run.json").read_text())["max_steps"] == 200
    assert lock.read_text() == ""  # released


def test_a_relaunch_resumes_from_the_checkpoints_of_an_interrupted_attempt(v3_instance, tmp_path):
    """The trainer is stopped (SIGTERM: it checkpoints and exits) after its first checkpoint; launching the
    partition again resumes from that checkpoint and ends with the curve of an uninterrupted run."""
    import shutil
    import threading

    from builders import run_job

    runs, _, _, instance = v3_instance
    assets, resources = _definitions(runs, max_steps=80, logging_steps=2, checkpoint_steps=8)

    def interrupt():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = [
                d for d in run_dirs(runs / "runs", "S7_diversity.B") if list((d / "trainer").glob("checkpoint-*"))
            ]
            if found:
                subprocess.run(["pkill", "-TERM", "-f", "--", f"--config {found[0] / 'config.json'}"])
                return
            time.sleep(0.05)

    stopper = threading.Thread(target=interrupt)
    stopper.start()
    assert not _materialize_partition(assets, resources, instance, "S7_diversity.B", 0, raise_on_error=False).success
    stopper.join()
    run_dir = run_dir_of(_materialize_partition(assets, resources, instance, "S7_diversity.B", 0))
    resumed_at = json.loads((run_dir / "run.json").read_text())["resumed_at_step"]
    assert resumed_at is not None and 8 <= resumed_at < 80
    # the same run, uninterrupted, by hand
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run_dir / "pairs.parquet", alone)
    config = json.loads((run_dir / "config.json").read_text())
    run_job(alone, "config", **{**config, "pairs_path": str(alone / "pairs.parquet"), "output_dir": str(alone)})
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "curve.parquet"), pd.read_parquet(alone / "curve.parquet"))


def test_missing_or_corrupt_run_outputs_are_named(tmp_path):
    with pytest.raises(folder.RunFolderError, match="left no metrics.json"):
        folder.read_outputs(tmp_path)
    (tmp_path / "metrics.json").write_text('{"final_heldout_acc": 0.5,')
    (tmp_path / "curve.parquet").write_bytes(b"not parquet")
    pd.DataFrame({"step": [2], "pair_id": ["p"], "margin": [0.1]}).to_parquet(tmp_path / "heldout.parquet")
    (tmp_path / "run.json").write_text('{"seed": 0')  # truncated: a node that died while writing it
    with pytest.raises(folder.RunFolderError, match=rf"{tmp_path / 'metrics.json'} is not valid JSON"):
        folder.read_outputs(tmp_path)
    (tmp_path / "metrics.json").write_text(
        '{"final_heldout_acc": 0.5, "mean_heldout_acc_tail": 0.5, "data_version": "x"}'
    )
    with pytest.raises(folder.RunFolderError, match=rf"{tmp_path / 'run.json'} is not valid JSON"):
        folder.read_outputs(tmp_path)
    (tmp_path / "run.json").write_text('{"seed": 0}')
    with pytest.raises(folder.RunFolderError, match=r"curve.parquet cannot be read as parquet"):
        folder.read_outputs(tmp_path)
    # a finished run that cannot be read is trained again, saying why
    said: list[str] = []
    assert folder.finished_outputs(tmp_path, said.append) is None
    assert said and "training" in said[0] and "curve.parquet cannot be read" in said[0]


def test_changing_one_experiment_marks_only_its_own_assets_unsynced():
    def code_versions(*experiments):
        assets, _ = dagster_definitions(Path("/nowhere"), list(experiments))
        return {key.to_user_string(): version for a in assets for key, version in a.code_versions_by_key.items()}

    v3, v2 = experiment("v3", "v3"), experiment("v2", "v2", spec={"boundaries": [14], "alpha": 0.1})
    before = code_versions(v3, v2)

    def changed(*experiments):
        after = code_versions(*experiments)
        return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}

    # the table and the write-up cover every experiment: they change with any of them
    reports = {"correspondence_table", "research_report"}
    assert changed(v3, experiment("v2", "v2", spec={"boundaries": [14], "alpha": 0.1}, beta=0.2)) == {
        "v2/group_dpo_run",
        *reports,
    }
    # α decides which terms make splits, not the fit
    assert changed(v3, experiment("v2", "v2", spec={"boundaries": [14], "alpha": 0.05})) == {
        "v2/significant_splits",
        "v2/group_dpo_run",
        *reports,
    }
    deeper = changed(v3, experiment("v2", "v2", spec={"boundaries": [14], "alpha": 0.1}, base_model="tiny:4"))
    new_reference = {key for key in deeper if key.startswith("reference_logps/")}
    assert len(new_reference) == 1 and deeper - new_reference == {"v2/group_dpo_run", *reports}
    assert changed(v3) == {"v2/ordered_logit_fit", "v2/significant_splits", "v2/group_dpo_run", *reports}
    # where a run reports to is no part of what it learns, nor of what the write-up shows
    assert changed(experiment("v3", "v3", report_to="tensorboard"), v2) == set()
    # settings of where runs live are not what a run learns
    assert fingerprint(experiment(beta=0.2).settings) != fingerprint(experiment().settings)
    assert fingerprint(experiment(device="cpu").settings) == fingerprint(experiment().settings)


@pytest.mark.slow
def test_end_to_end_the_planted_split_matches_and_the_null_control_is_ok(tmp_path):
    """On a synthetic PRISM whose 18–34-year-olds choose their style consistently, an experiment of the age
    covariate alone (its split, the region null control and four random splits: a complete family, 36 runs) must
    find the age split MATCH on held-out accuracy over three seeds, and the region null control OK."""
    spec = {"categorical": ["age"], "continuous": [], "random_splits": 4}
    assets, resources = dagster_definitions(tmp_path, [experiment("v3", "auto", spec=spec)], users=1500, warm=True)
    with dg.instance_for_test() as instance:
        dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
        instance.add_dynamic_partitions(partitions.SEED, ["0", "1", "2"])
        cells = [c for c in instance.get_dynamic_partitions(partitions.cells_name("v3")) if c != "baseline"]
        assert sorted({c.split(".")[0] for c in cells}) == ["R1", "R2", "R3", "R4", "S1_age", "S2_region"]
        for cell in cells:
            for seed in range(3):
                assert _materialize_partition(assets, resources, instance, cell, seed).success
        result = dg.materialize(
            assets, selection=[dg.AssetKey("correspondence_table")], instance=instance, resources=resources
        )
    table = result.output_for_node("correspondence_table")["table"]
    primary = table[table["metric"] == "mean_heldout_acc_tail"].set_index("split")
    shown = ["per_seed_d", "mean_d", "se", "z", "p_two", "p_adjusted", "null_scale"]
    assert primary.loc["S1_age", "verdict"] == "MATCH", primary.loc[["S1_age", "S2_region"], shown].to_dict("records")
    assert primary.loc["S2_region", "verdict"] == "null OK", primary.loc["S2_region"].to_dict()
    assert primary.loc["S1_age", "sign_consistency"] == "3/3" and primary.loc["S1_age", "p_adjusted"] < 0.05
    assert (primary["null_df"] == 4).all() and (primary["n_seeds"] == 3).all()  # K and seeds it rests on
    assert (tmp_path / "reports" / "v3" / "null.png").stat().st_size > 10_000
    assert (tmp_path / "reports" / "v3" / "learning_curves.png").stat().st_size > 10_000
    [event] = result.get_asset_materialization_events()
    assert "| S1_age" in markdown(event.materialization.metadata["v3"])


def test_run_pairs_carry_the_reference_token_ids_and_refuse_a_stale_reference_logps():
    import numpy as np
    import pandas as pd

    from prism_assets.training.run_folder import (
        REFERENCE_COLUMNS,
        TEXT_DIGEST_COLUMN,
        TOKEN_COLUMNS,
        pair_text_digests,
    )

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
    merged = cells.with_references(pairs, references)
    assert list(merged[REFERENCE_COLUMNS[0]]) == [-2.0, -1.0] and [list(ids) for ids in merged[TOKEN_COLUMNS[0]]] == [
        [1, 7],
        [0, 7],
    ]
    assert list(merged.columns) == [*pairs.columns, *REFERENCE_COLUMNS, *TOKEN_COLUMNS]  # the digest stays behind
    with pytest.raises(
        cells.CellError, match="1 of 3 pairs have no reference log-probs: rematerialize reference_logps"
    ):
        cells.with_references(pd.concat([pairs, texts(["z"]).assign(user_id=["u3"])]), references)
    # the same pair ids with other text (another PRISM release or synthetic configuration): every pair is compared
    edited = pairs.assign(chosen=["yes", "yes!"])
    with pytest.raises(
        cells.CellError, match=r"1 of 2 pairs \(first: 'b'\) have other text than reference_logps computed"
    ):
        cells.with_references(edited, references)
    prompt_edited = pairs.assign(prompt=[[{"role": "user", "content": "q a"}], [{"role": "system", "content": "q b"}]])
    with pytest.raises(cells.CellError, match=r"1 of 2 pairs \(first: 'b'\)"):
        cells.with_references(prompt_edited, references)


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
    digest = cells.membership_digest
    # S1's group B as a split of the same name made otherwise (another preset, α or fit) held it.
    older_b = digest({"membership": membership.replace({"u4": "u5"})}, "S1", "B")
    rows = [
        ("baseline", None, None, None, "f", "data"),
        ("baseline", None, None, None, "f", "old data"),  # seed 1: the baseline of another version of the pairs
        ("S1.A", "S1", "A", digest(splits, "S1", "A"), "f", "data"),
        ("S1.B", "S1", "B", older_b, "f", "data"),
        ("S2.A", "S2", "A", digest(splits, "S2", "A"), "g", "data"),
        ("S9.A", "S9", "A", "0" * 16, "f", "data"),
        ("S2.B", "S2", "B", digest(splits, "S2", "B"), "f", "data"),
    ]
    runs = pd.DataFrame(
        [
            {
                "cell": c,
                "split": s,
                "group": g,
                "seed": int(data == "old data"),
                "membership_digest": d,
                "settings_fingerprint": f,
                "data_digest": data,
            }
            for c, s, g, d, f, data in rows
        ]
    )
    kept, left_out = provenance.current_runs(runs, splits, "f", "data")
    assert list(zip(kept["cell"], kept["seed"])) == [("baseline", 0), ("S1.A", 0), ("S2.B", 0)]
    assert left_out == {
        "split no longer in significant_splits": ["S9.A seed 0"],
        "trained on other users than the group now holds": ["S1.B seed 0"],
        "trained on other data (another version of the pairs)": ["baseline seed 1"],
        "trained under other DPO settings": ["S2.A seed 0"],
    }
    assert digest(splits, None, None) is None and digest(splits, "S1", "A") != digest(splits, "S1", "B")


def test_every_setting_a_user_can_set_reaches_the_trainer(tmp_path):
    """Each field of the schema, set to a value other than its default, arrives in the config the trainer reads
    (parsed as the trainer parses it)."""
    from prism_assets.training.settings import RunConfig, TrainingSettings

    changed: dict[str, Any] = {
        **OTHER_DPO_SETTINGS,
        "base_model": str(tmp_path / "model"),
        "logging_steps": 4,
        "eval_steps": 16,
        "report_to": ["tensorboard", "mlflow"],
        "tracking_dir": str(tmp_path / "tensorboard"),
    }
    assert set(changed) == set(TrainingSettings.model_fields)  # a new setting must be listed here, and is checked
    defaults = TrainingSettings()
    assert all(getattr(defaults, name) != value for name, value in changed.items())
    settings = experiment(**changed).settings
    path = tmp_path / "config.json"
    config = cells.run_config(settings, settings.base_model, "S1_age.A", 3, None, "v3", code_version=None)
    path.write_text(config.model_dump_json())
    config = RunConfig.from_json(path)
    assert {name: getattr(config, name) for name in changed} == changed
    assert (config.seed, config.label["cell"], config.label["experiment"]) == (3, "S1_age.A", "v3")
