"""Experiment trackers (`report_to`): real TensorBoard event files and a real MLflow store, written by the trainer and
read back through the trackers' own readers."""

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from prism_assets.platform import Configuration
from prism_assets.training import tracking
from prism_assets.training.reporting import Reporter
from prism_assets.training.settings import TRACKERS, RunConfig, TrainingSettings
from prism_assets.training.trainer import StopRequest, train

# Rows at steps 2 and 4, the held-out pairs evaluated at 4 only (every 4 steps, and the last).
SETTINGS = {
    "max_steps": 4,
    "logging_steps": 2,
    "eval_steps": 4,
    "batch_size": 4,
    "max_length": 96,
    "curve_heldout_pairs": 16,
}
TRAIN_COLUMNS = ("loss", "margin", "pref_acc", "reward_chosen", "reward_rejected", "grad_norm", "learning_rate")
HELDOUT_COLUMNS = ("heldout_acc", "heldout_margin", "heldout_acc_se", "heldout_margin_se")


class NoSignalYet(StopRequest):
    """The trainer's stop request without its signal handlers (this is the test process): a test sets `signal`."""

    def __init__(self):
        self.signal = None


class Signalled(Reporter):
    """The trainer's reporter, which delivers SIGUSR1 as the run logs step `at` (as SLURM's warning would)."""

    def __init__(self, stop: StopRequest, at: int | None):
        super().__init__()
        self.stop, self.at = stop, at

    def info(self, message: str) -> None:
        super().info(message)
        if self.at is not None and message.startswith(f"step {self.at}/"):
            self.stop.signal = signal.SIGUSR1


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A TensorBoard directory and an MLflow sqlite store, shared by this module's runs (each test its own MLflow
    experiment): the store's tables are made once."""
    root = tmp_path_factory.mktemp("tracking")
    return {"tracking_dir": str(root / "tensorboard"), "mlflow_tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}


def _train(out: Path, model, pairs, stores: dict, label: dict, stop_at: int | None = None, **overrides):
    """Train one run in this process, reporting to both trackers: its metrics, or None when stopped at `stop_at`."""
    cfg = RunConfig(
        base_model=str(model),
        pairs_path=str(pairs),
        output_dir=str(out),
        seed=label["seed"],
        label=label,
        report_to=["tensorboard", "mlflow"],
        **stores,
        **(SETTINGS | overrides),
    )
    stop = NoSignalYet()
    trackers = tracking.Trackers(cfg)
    try:
        return train(cfg, Signalled(stop, stop_at), stop, trackers)
    except BaseException:
        trackers.finish("failed")
        raise


def _records(out: Path) -> dict:
    return json.loads((out / tracking.TRACKING_FILE).read_text())


def _tensorboard(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return events


def _session_start(events) -> dict:
    """The hparams of a TensorBoard run, as the HParams plugin reads them."""
    from tensorboard.plugins.hparams import metadata

    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    info = metadata.parse_session_start_info_plugin_data(content)
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()}


def _mlflow(stores: dict):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stores["mlflow_tracking_uri"])


def _history(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.timestamp)]


def _assert_curve_in_both(curve: pd.DataFrame, events, client, run_id: str) -> None:
    """Each curve column at each of its steps once in both trackers: the training columns at every row, the held-out
    ones where evaluated; MLflow's values exactly, TensorBoard's as float32."""
    evaluated = curve[curve["heldout_evaluated"]]
    for columns, rows, prefix in ((TRAIN_COLUMNS, curve, "train"), (HELDOUT_COLUMNS, evaluated, "eval")):
        for column in columns:
            expected = list(zip(rows["step"].tolist(), rows[column].tolist()))
            assert _history(client, run_id, f"{prefix}/{column}") == expected, column
            logged = [(e.step, e.value) for e in events.Scalars(f"{prefix}/{column}")]
            assert [step for step, _ in logged] == [step for step, _ in expected], column
            assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_every_run_of_a_grid_is_read_back_with_its_tags_settings_curve_and_summary(
    tmp_path, tiny_model_dir, small_pairs_path, stores
):
    stores = {**stores, "mlflow_experiment": "grid"}
    grid = [("baseline", None, None), ("S1_age.A", "S1_age", "A")]
    outs = {}
    for cell, split, group in grid:
        for seed in (0, 1):
            label = {"experiment": "v3", "cell": cell, "split": split, "group": group, "seed": seed}
            label["run_id"] = f"{cell[:4]}{'0' * 12}"  # as the asset adds it: the run's, over its seeds
            outs[cell, seed] = out = tmp_path / f"{cell}-{seed}"
            _train(out, tiny_model_dir, small_pairs_path, stores, label)

    client = _mlflow(stores)
    experiment = client.get_experiment_by_name("grid")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    for cell, split, group in grid:
        for seed in (0, 1):
            out = outs[cell, seed]
            curve = pd.read_parquet(out / "curve.parquet")
            metrics = json.loads((out / "metrics.json").read_text())
            numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            records = _records(out)
            tags = {"experiment": "v3", "cell": cell, "seed": str(seed), "run_dir": str(out.resolve())}
            if split:
                assert group is not None  # a cell of a split is one of its groups
                tags |= {"split": split, "group": group}

            # MLflow: one run, found by its tags, with the settings as params, the curve and the summary
            found = client.search_runs(
                [experiment.experiment_id], f"tags.cell = '{cell}' and tags.seed = '{seed}' and tags.experiment = 'v3'"
            )
            assert [r.info.run_id for r in found] == [records["mlflow"]["run_id"]]
            run = found[0]
            assert run.info.status == "FINISHED" and run.info.run_name == f"v3-{cell}-seed{seed}"
            assert {k: run.data.tags[k] for k in tags} == tags
            assert ("split" in run.data.tags) == (split is not None)  # the baseline has no split or group
            assert run.data.tags["data_version"] == metrics["data_version"]
            assert run.data.params["learning_rate"] == "0.001" and run.data.params["seed"] == str(seed)
            assert run.data.params["report_to"] == '["tensorboard", "mlflow"]'
            assert set(run.data.params) == set(RunConfig.model_fields) - {"label"}
            assert {k: run.data.metrics[k] for k in numbers} == numbers
            assert all(len(client.get_metric_history(run.info.run_id, k)) == 1 for k in numbers)

            # TensorBoard: its own directory, tagged in hparams and text, the curve and the summary
            log_dir = Path(records["tensorboard"]["log_dir"])
            assert log_dir.parent == Path(stores["tracking_dir"]) / "v3" / cell
            assert log_dir.name == f"seed{seed}-{cell[:4]}0000"
            events = _tensorboard(str(log_dir))
            hparams = _session_start(events)
            assert {k: hparams[k] for k in tags} == tags and hparams["learning_rate"] == pytest.approx(1e-3)
            [text] = events.Tensors("run/tags/text_summary")
            assert f"| cell | {cell} |" in text.tensor_proto.string_val[0].decode()
            summary = {k[len("summary/") :]: events.Scalars(k) for k in events.Tags()["scalars"] if "summary/" in k}
            assert set(summary) == set(numbers)
            assert all(
                [(e.step, e.value) for e in summary[k]] == [(4, pytest.approx(v, rel=1e-6))]
                for k, v in numbers.items()
            )

            _assert_curve_in_both(curve, events, client, run.info.run_id)


def test_a_stopped_and_resumed_run_continues_its_tracker_runs_with_each_step_once(
    tmp_path, tiny_model_dir, small_pairs_path, stores
):
    stores = {**stores, "mlflow_experiment": "resume"}
    settings = {"max_steps": 6, "checkpoint_steps": 2, "keep_checkpoints": True}  # rows at 2, 4, 6
    label = {"experiment": "v3", "cell": "S2.B", "split": "S2", "group": "B", "seed": 0}
    alone = tmp_path / "uninterrupted"
    _train(alone, tiny_model_dir, small_pairs_path, stores, {**label, "run_id": "alone"}, **settings)

    # SIGUSR1 at step 4: a checkpoint there, the trackers' runs stopped (MLflow: KILLED) for the requeued attempt
    out, label = tmp_path / "stopped", {**label, "run_id": "stopped"}
    assert _train(out, tiny_model_dir, small_pairs_path, stores, label, stop_at=4, **settings) is None
    client = _mlflow(stores)
    first = _records(out)
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "KILLED"
    assert [s for s, _ in _history(client, first["mlflow"]["run_id"], "train/loss")] == [2, 4]
    # The node dies as step 4's checkpoint is written: the next attempt resumes at step 2, though both trackers
    # have step 4 from this one.
    (out / "trainer" / "checkpoint-4" / "state.pt").unlink()
    _train(out, tiny_model_dir, small_pairs_path, stores, label, **settings)
    assert json.loads((out / "run.json").read_text())["resumed_at_step"] == 2

    curve = pd.read_parquet(out / "curve.parquet")
    pd.testing.assert_frame_equal(curve, pd.read_parquet(alone / "curve.parquet"))
    assert _records(out) == first  # the same tracker runs
    experiment = client.get_experiment_by_name("resume").experiment_id
    [run] = client.search_runs([experiment], f"tags.run_dir = '{out.resolve()}'")
    assert run.info.run_id == first["mlflow"]["run_id"] and run.info.status == "FINISHED"
    [log_dir] = (Path(stores["tracking_dir"]) / "v3" / "S2.B").glob("seed0-stopped*")
    assert str(log_dir) == first["tensorboard"]["log_dir"]
    events = _tensorboard(str(log_dir))
    _assert_curve_in_both(curve, events, client, run.info.run_id)
    # and what TensorBoard shows is what the uninterrupted run logged
    alone_events = _tensorboard(_records(alone)["tensorboard"]["log_dir"])
    for name in ("train/loss", "train/grad_norm", "eval/heldout_acc"):
        assert [(e.step, e.value) for e in events.Scalars(name)] == [
            (e.step, e.value) for e in alone_events.Scalars(name)
        ]


@pytest.mark.parametrize(
    ("value", "trackers"),
    [
        ("tensorboard,mlflow", ["tensorboard", "mlflow"]),
        ("all", ["tensorboard", "mlflow"]),
        ("none", []),
        ("MLflow", ["mlflow"]),
        ("", []),
    ],
)
def test_report_to_from_the_environment(monkeypatch, value, trackers):
    monkeypatch.setenv("DPO_REPORT_TO", value)
    monkeypatch.setenv("DPO_MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    [*_, settings] = [e.settings for e in Configuration.from_environ(os.environ).experiments()]
    assert settings.report_to == trackers and settings.mlflow_tracking_uri == "http://mlflow.example:5000"


def test_an_unknown_tracker_is_named_with_the_ones_there_are(tmp_path, monkeypatch):
    from pydantic import ValidationError

    assert list(tracking.IMPLEMENTATIONS) == list(TRACKERS)  # every name report_to takes has its tracker
    message = "unknown tracker 'wandb'; report_to takes tensorboard, mlflow, 'all' or 'none'"
    monkeypatch.setenv("DPO_REPORT_TO", "tensorboard,wandb")
    with pytest.raises(ValueError, match=f"^DPO_REPORT_TO='tensorboard,wandb': {message}$"):
        Configuration.from_environ(os.environ)
    with pytest.raises(ValidationError, match=message):
        TrainingSettings(report_to=["wandb"])
    config = {"base_model": "m", "pairs_path": "p", "output_dir": "o", "seed": 0, "report_to": ["mlflow", "wandb"]}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"c.json: RunConfig: report_to=\['mlflow', 'wandb'\]: {message}"):
        RunConfig.from_json(tmp_path / "c.json")


@pytest.mark.parametrize(("tracker", "module"), [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_tracker_whose_package_is_missing_fails_the_run_before_it_loads_anything(
    tmp_path, monkeypatch, tracker, module
):
    from prism_assets.training import trainer

    config = {"base_model": "no-such-model", "pairs_path": "p.parquet", "output_dir": "run", "seed": 0}
    (tmp_path / "c.json").write_text(json.dumps({**config, "report_to": "tensorboard,mlflow"}))
    monkeypatch.setitem(sys.modules, module, None)  # as where it is not installed
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}  # main() takes them over
    try:
        with pytest.raises(tracking.TrackerError) as failed:
            trainer.main(["--config", str(tmp_path / "c.json")])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert str(failed.value).startswith(f"report_to names {tracker}, but its package is not installed for ")
    assert str(failed.value).endswith(
        f": install the trackers extra (pip install -e '.[trackers]'), or leave {tracker} out of report_to"
    )
    assert not (tmp_path / "run").exists()  # neither the model nor the pairs were looked for: nothing written


def test_a_partition_s_trackers_write_beside_its_runs_unless_told_otherwise(tmp_path):
    from prism_assets.assets.dpo import DpoStorage

    storage = DpoStorage(runs_dir=str(tmp_path / "storage" / "runs"))
    assert storage.resolved_tracking(TrainingSettings()) == {
        "tracking_dir": str(tmp_path / "storage" / "tracking" / "tensorboard"),
        "mlflow_tracking_uri": f"sqlite:///{tmp_path / 'storage' / 'tracking' / 'mlflow.db'}",
    }
    chosen = TrainingSettings(tracking_dir=str(tmp_path / "tb"), mlflow_tracking_uri="http://mlflow.example:5000")
    assert storage.resolved_tracking(chosen) == {
        "tracking_dir": str(tmp_path / "tb"),
        "mlflow_tracking_uri": "http://mlflow.example:5000",
    }


@pytest.mark.slow
def test_a_partition_reports_to_the_trackers_beside_its_runs_tagged_with_its_run_id(tmp_path):
    import dagster as dg
    from builders import dagster_definitions, experiment, materialize_partition, run_dir_of, upstream_of_runs

    from prism_assets import partitions

    settings: dict[str, Any] = {
        "report_to": ["tensorboard", "mlflow"],
        "max_steps": 4,
        "logging_steps": 2,
        "batch_size": 4,
    }
    assets, resources = dagster_definitions(tmp_path, [experiment("v3", "v3", **settings)])
    with dg.instance_for_test() as instance:
        dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
        instance.add_dynamic_partitions(partitions.SEED, ["0"])
        result = materialize_partition(assets, resources, instance, "v3", "S1_age.B", 0)
    run_dir = run_dir_of(result)
    [event] = result.get_asset_materialization_events()
    run_id = event.materialization.metadata["run_id"].value
    records = _records(run_dir)

    log_dir = tmp_path / "tracking" / "tensorboard" / "v3" / "S1_age.B" / f"seed0-{run_id[:8]}"
    assert records["tensorboard"]["log_dir"] == str(log_dir)
    hparams = _session_start(_tensorboard(str(log_dir)))
    assert {k: hparams[k] for k in ("experiment", "cell", "split", "group", "seed", "run_id")} == {
        "experiment": "v3",
        "cell": "S1_age.B",
        "split": "S1_age",
        "group": "B",
        "seed": "0",
        "run_id": run_id,
    }
    client = _mlflow({"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"})
    [run] = client.search_runs([client.get_experiment_by_name("prism-dpo").experiment_id])
    assert run.info.run_id == records["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["run_id"] == run_id and run.data.tags["cell"] == "S1_age.B"
    assert run.data.tags["data_version"] == event.materialization.tags["dagster/data_version"]


@pytest.mark.slow
def test_runs_starting_at_once_on_a_new_mlflow_store_each_get_their_run(tmp_path):
    """Runs trained side by side start their trackers at once: the store's tables and the experiment are made once."""
    import subprocess

    start = """
import sys
from pathlib import Path
from prism_assets.training import tracking
from prism_assets.training.settings import RunConfig
root, i = sys.argv[1], int(sys.argv[2])
cfg = RunConfig(base_model="m", pairs_path="p", output_dir=f"{root}/run{i}", seed=i, report_to=["mlflow"],
                mlflow_tracking_uri=f"sqlite:///{root}/tracking/mlflow.db", label={"experiment": "v3", "cell": "c"})
Path(cfg.output_dir).mkdir()
trackers = tracking.Trackers(cfg)
trackers.start([{"step": 2, "loss": 0.5}], 2, print)
trackers.finish("finished")
"""
    runs = [
        subprocess.Popen([sys.executable, "-c", start, str(tmp_path), str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()[-3000:] if run.stderr else ""
    client = _mlflow({"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"})
    found = client.search_runs([client.get_experiment_by_name("prism-dpo").experiment_id])
    assert sorted(r.data.tags["seed"] for r in found) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" and r.data.metrics == {"train/loss": 0.5} for r in found)
