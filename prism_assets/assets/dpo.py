"""DPO assets: `reference_logps/<model>` and each experiment's `<experiment>/group_dpo_run`, through a launcher.

Owns where DPO runs live (`DpoStorage`), the assets' factories (an experiment's settings are baked into its assets'
code versions), and a run's identity: its directory `<runs_dir>/<run id>/seed<seed>/` is named by a hash of everything
that decides what it learns (the trainer's code, base model, settings, the very pairs), so two experiments whose group
has the same users share one run — the second adopts the first's outputs instead of training again. A missing or
corrupt output fails the partition naming the file.
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field, ValidationError

from prism_assets import partitions, versions
from prism_assets.training import tiny_model
from prism_assets.training.run_files import (
    CHECKPOINTS_DIR,
    CURVE_FILE,
    METRICS_FILE,
    REFERENCE_COLUMNS,
    RUN_CONFIG_FILE,
    TEXT_DIGEST_COLUMN,
    TOKEN_COLUMNS,
    pair_text_digests,
    split_heldout,
)
from prism_assets.training.settings import (
    LEARNS,
    REFERENCE,
    ReferenceConfig,
    RunConfig,
    TrainingSettings,
    fields_where,
    validation_problems,
)
from prism_assets.training.tracking import TRACKING_FILE
from resources.launcher import COST_FILE, RunLauncher, run_cost

# What a DPO run computes: this module (pairs of a cell, run config), the trainer and every module it imports,
# and the builder of the embedded base model.
CODE_VERSION = versions.source_version(
    sys.modules[__name__], "prism_assets.training.trainer", "prism_assets.training.tiny_model"
)
REFERENCE_CODE_VERSION = versions.source_version("prism_assets.training.reference", "prism_assets.training.tiny_model")
# The code each job runs where it runs (the cluster's environment): the job refuses to run other code.
TRAINER_MODULE, REFERENCE_MODULE = "prism_assets.training.trainer", "prism_assets.training.reference"
REFERENCE_OUTPUT = "reference_logps.parquet"
JOB_CODE_VERSIONS = {module: versions.source_version(module) for module in (TRAINER_MODULE, REFERENCE_MODULE)}
# What a local launcher imports once and forks the jobs from (resources.launcher, `warm_modules`): the jobs and the
# transformers modules they import as they start.
WARM_MODULES = (
    TRAINER_MODULE,
    REFERENCE_MODULE,
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen2.tokenization_qwen2",
)
# Transient failures (a SLURM node failure, a preemption) are retried; the launchers raise
# dg.Failure(allow_retries=False) for the job's own errors, which a retry would only repeat.
RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL)
TRAINING_FIELDS = fields_where(TrainingSettings, LEARNS)  # what a run learns depends on
REFERENCE_FIELDS = fields_where(TrainingSettings, REFERENCE)  # what the base model's log-probs of a pair depend on


class DpoStorage(dg.ConfigurableResource):
    """Where DPO runs, base models and reports live, and the interpreter that runs the jobs."""

    models_dir: str = Field("storage/models", description="where the tiny base models are built")
    runs_dir: str = Field("storage/runs", description="run directories, <runs_dir>/<run id>/seed<seed>/")
    reports_dir: str = Field("storage/reports", description="the report's files (tables, plots)")
    python: str = Field(
        sys.executable,
        description="the interpreter that runs the trainer (on the cluster for "
        "SLURM: a venv where this project is installed)",
    )

    def resolved_tracking(self, settings: TrainingSettings) -> dict[str, str]:
        """Where a run's trackers write (`report_to`), absolute: the settings' tracking_dir and mlflow_tracking_uri,
        or beside the runs: <storage>/tracking/tensorboard and sqlite:///<storage>/tracking/mlflow.db."""
        root = Path(self.runs_dir).resolve().parent / "tracking"
        tensorboard = Path(settings.tracking_dir).resolve() if settings.tracking_dir else root / "tensorboard"
        return {
            "tracking_dir": str(tensorboard),
            "mlflow_tracking_uri": settings.mlflow_tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
        }

    def resolved_base_model(self, base_model: str) -> str:
        """A tiny model's name built to its directory; any other model as named."""
        layers = tiny_model.tiny_layers(base_model)
        if layers is None:
            return base_model
        return str(
            tiny_model.build_tiny_qwen2(
                tiny_model.tiny_model_dir(self.models_dir, base_model), layers=layers
            ).resolve()
        )


def fingerprint(settings: TrainingSettings, fields: tuple[str, ...] = TRAINING_FIELDS) -> str:
    """Hash of the settings that change what a run learns (not where it runs)."""
    values = {name: getattr(settings, name) for name in fields}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def reference_key(settings: TrainingSettings) -> dg.AssetKey:
    """`reference_logps/<model>_<hash>`: one per base model and the settings its log-probs depend on."""
    model = re.sub(r"[^A-Za-z0-9]+", "_", settings.base_model.rsplit("/", 1)[-1]).strip("_").lower()
    return dg.AssetKey(["reference_logps", f"{model}_{fingerprint(settings, REFERENCE_FIELDS)[:6]}"])


def group_users(splits: dict, split: str, group: str) -> pd.Series:
    """The user ids of one group of a split in significant_splits (a split it does not have: a final failure)."""
    membership = splits["membership"]
    if split not in set(membership["split"]):
        raise dg.Failure(
            f"split {split!r} is not in significant_splits (have {sorted(set(membership['split']))}); "
            "rematerialize significant_splits or drop the stale partition",
            allow_retries=False,
        )
    return membership[(membership["split"] == split) & (membership["group"] == group)]["user_id"]


def group_pairs(pairs: pd.DataFrame, splits: dict, split: str | None, group: str | None) -> pd.DataFrame:
    """The pairs of one cell: all pairs for the baseline, else the pairs of the group's users."""
    if split is None:
        return pairs
    assert group is not None  # parse_cell gives a group with every split
    return pairs[pairs["user_id"].isin(set(group_users(splits, split, group)))]


def membership_digest(splits: dict, split: str | None, group: str | None) -> str | None:
    """A hash of the users a cell trains on (None for the baseline, which trains on all pairs): a run records it, so
    the report can tell a run of the split's current groups from one of a split of the same name made otherwise
    (another preset, α or fit)."""
    if split is None:
        return None
    assert group is not None  # parse_cell gives a group with every split
    users = sorted(group_users(splits, split, group).astype(str))
    return hashlib.sha256("\n".join(users).encode()).hexdigest()[:16]


def balanced_train_pairs(pairs: pd.DataFrame, splits: dict, split: str, settings: TrainingSettings) -> int:
    """Training pairs of the split's smaller group (after its held-out pairs are set aside)."""
    sizes = []
    for group in partitions.GROUPS:
        train, _ = split_heldout(
            group_pairs(pairs, splits, split, group), settings.heldout_fraction, settings.heldout_max_pairs
        )
        sizes.append(len(train))
    return min(sizes)


def read_run_outputs(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    metrics_path, curve_path = run_dir / METRICS_FILE, run_dir / CURVE_FILE
    for path in (metrics_path, curve_path):
        if not path.exists():
            raise dg.Failure(
                f"the DPO run left no {path.name} in {run_dir}: it did not finish (see its stderr there: "
                "stderr.log, or slurm-<job id>.err under SLURM)",
                allow_retries=False,
            )
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as error:
        raise dg.Failure(
            f"{metrics_path} is not valid JSON ({error.msg} at line {error.lineno})", allow_retries=False
        ) from None
    try:
        curve = pd.read_parquet(curve_path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise dg.Failure(f"{curve_path} cannot be read as parquet: {error}", allow_retries=False) from None
    missing = [key for key in ("final_heldout_acc", "mean_heldout_acc_tail", "data_version") if key not in metrics]
    if missing or curve.empty:
        raise dg.Failure(
            f"{metrics_path} lacks {missing}" if missing else f"{curve_path} has no rows", allow_retries=False
        )
    return metrics, curve


@contextlib.contextmanager
def exclusive(path: Path, owner: str, log: Callable[[str], None], poll_s: float = 1.0) -> Iterator[None]:
    """Hold <path>.lock while a run uses `path`: a second launch of the same run (the same partition, or another
    experiment's partition sharing the run) waits for the first, naming it, and never touches its live directory.
    The operating system releases the lock with the process that holds it, so a crashed or restarted orchestrator
    leaves none behind."""
    lock = path.with_name(f"{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    with open(lock, "r+") as handle:
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    handle.seek(0)
                    log(f"{path} is in use by {handle.read().strip() or 'another process'}: waiting for it to end")
                    waiting = True
                time.sleep(poll_s)  # a poll, not a blocking lock: a terminated Dagster run stops waiting at once
        handle.seek(0)
        handle.truncate(0)
        handle.write(
            f"{owner} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
        )
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def attempt_dir(path: Path, finished: str, log: Callable[[str], None], keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """A run directory for one attempt (the caller holds it `exclusive`ly), with nothing of an earlier attempt but
    the names in `keep` of one that did not finish (its checkpoints, and the config they were written under): a
    rerun never reads another attempt's outputs, and a retry can resume. The last successful run's directory (one
    holding `finished`) is kept as <name>.previous until an attempt succeeds: a failed, killed or interrupted
    attempt never deletes it. A failed attempt stays in place, where its job may still write and its failure points."""
    previous = path.with_name(f"{path.name}.previous")
    if (path / finished).exists() and not previous.exists():
        path.rename(previous)
    elif path.exists():  # an attempt that did not succeed (with .previous: `path` holds no recorded run)
        unfinished = not (path / finished).exists()
        for entry in path.iterdir():
            if unfinished and entry.name in keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if previous.exists():
            log(f"the last successful run's files are in {previous} until an attempt succeeds")
        raise
    shutil.rmtree(previous, ignore_errors=True)


def keep_checkpoints_of_the_same_run(run_dir: Path, config: RunConfig, log: Callable[[str], None]) -> None:
    """An earlier attempt's checkpoints stay for the trainer to resume from when they were written for the same
    run (every setting that decides its course equal); any others are removed."""
    checkpoints, earlier = run_dir / CHECKPOINTS_DIR, run_dir / "config.json"
    if not checkpoints.exists():
        return
    try:
        same = RunConfig.model_validate_json(earlier.read_text()).trajectory() == config.trajectory()
    except (OSError, ValueError):  # no config, or one this code cannot read
        same = False
    if same:
        log(f"an earlier attempt's checkpoints are in {checkpoints}: the trainer resumes from the newest")
    else:
        shutil.rmtree(checkpoints)
        log(f"removed an earlier attempt's checkpoints, written for other settings, from {run_dir}")


def build_reference_logps(settings: TrainingSettings) -> dg.AssetsDefinition:
    """The reference log-probs of `settings`' base model (and the settings they depend on), shared by every
    experiment on that model."""

    @dg.asset(
        key=reference_key(settings),
        group_name="dpo",
        kinds={"pytorch", "parquet"},
        owners=versions.OWNERS,
        pool="gpu",
        code_version=f"{REFERENCE_CODE_VERSION}-{fingerprint(settings, REFERENCE_FIELDS)}",
        retry_policy=RETRY_POLICY,
        description=f"The frozen base model's ({settings.base_model}) summed log-probabilities of every pair's "
        "chosen and rejected response (TRL's tokenization and truncation), computed once per base model and "
        "pairs version in large batches, as one job through the launcher, with the token ids they are of; every "
        "DPO run on this model reads them instead of running a reference model and tokenizing its pairs.",
    )
    def reference_logps(
        context: dg.AssetExecutionContext,
        dpo_storage: DpoStorage,
        launcher: RunLauncher,
        within_model_pairs: pd.DataFrame,
    ) -> dg.Output:
        run_dir = (Path(dpo_storage.runs_dir) / "reference" / context.asset_key.path[-1]).resolve()
        with exclusive(run_dir, f"Dagster run {context.run.run_id}", context.log.info):
            job = left_running(context, launcher, run_dir, REFERENCE_OUTPUT)
            if job is not None:  # its directory is the job's: nothing in it is replaced
                return _reference_logps(context, settings, dpo_storage, launcher, within_model_pairs, run_dir, job)
            with attempt_dir(run_dir, REFERENCE_OUTPUT, context.log.warning):
                return _reference_logps(context, settings, dpo_storage, launcher, within_model_pairs, run_dir)

    return reference_logps


def _reference_logps(
    context: dg.AssetExecutionContext,
    settings: TrainingSettings,
    dpo_storage: DpoStorage,
    launcher: RunLauncher,
    within_model_pairs: pd.DataFrame,
    run_dir: Path,
    job: str | None = None,
) -> dg.Output:
    config = ReferenceConfig(
        **{
            **{name: getattr(settings, name) for name in REFERENCE_FIELDS},
            "base_model": dpo_storage.resolved_base_model(settings.base_model),
        },
        pairs_path="pairs.parquet",
        output_path=REFERENCE_OUTPUT,
        device=settings.device,
        code_version=JOB_CODE_VERSIONS[REFERENCE_MODULE],
    )
    config_path, pairs = run_dir / "reference.json", within_model_pairs[["pair_id", "prompt", "chosen", "rejected"]]
    if job is None:
        pairs.to_parquet(run_dir / config.pairs_path, index=False)
        config_path.write_text(config.model_dump_json(indent=2))
    elif config_path.read_text() != config.model_dump_json(indent=2) or not _same_pairs(
        pairs, pd.read_parquet(run_dir / config.pairs_path)
    ):  # matched on its settings and pairs, never on the asset alone; its directory is not ours to replace
        raise dg.Failure(
            f"job {job} is still computing {run_dir.name} for other settings or pairs than these; "
            f"cancel it (`scancel {job}`) and launch again",
            allow_retries=False,
        )
    launcher.run(
        context=context,
        run_dir=str(run_dir),
        outputs=[config.output_path],
        command=[dpo_storage.python, "-m", REFERENCE_MODULE, "--config", str(config_path)],
        job=job,
    )
    output = run_dir / config.output_path
    if not output.exists():
        raise dg.Failure(
            f"the reference job left no {output.name} in {run_dir} (see its stderr there: "
            "stderr.log, or slurm-<job id>.err under SLURM)",
            allow_retries=False,
        )
    frame = pd.read_parquet(output)
    absent = [c for c in ("pair_id", *REFERENCE_COLUMNS, *TOKEN_COLUMNS, TEXT_DIGEST_COLUMN) if c not in frame.columns]
    if absent:
        raise dg.Failure(
            f"{output} lacks columns {absent}: does the job's environment ({dpo_storage.python}) "
            "run this version of the project?",
            allow_retries=False,
        )
    missing = len(set(within_model_pairs["pair_id"]) - set(frame["pair_id"]))
    bad = int((~frame[list(REFERENCE_COLUMNS)].apply(pd.to_numeric).map(math.isfinite)).to_numpy().sum())
    if missing or bad:
        raise dg.Failure(
            f"{output}: {missing} pairs without reference log-probs, {bad} non-finite values", allow_retries=False
        )
    return dg.Output(
        frame,
        data_version=dg.DataVersion(hashlib.sha256(output.read_bytes()).hexdigest()[:24]),
        metadata={
            "num_pairs": len(frame),
            "run_dir": dg.MetadataValue.path(str(run_dir)),
            "base_model": settings.base_model,
            "max_length": settings.max_length,
            "mean_ref_chosen_logps": float(frame[REFERENCE_COLUMNS[0]].mean()),
            "mean_ref_rejected_logps": float(frame[REFERENCE_COLUMNS[1]].mean()),
            "mean_tokens_per_pair": float(sum(frame[c].map(len).mean() for c in TOKEN_COLUMNS)),
            **cost_metadata(run_cost(run_dir)),
        },
    )


def _same_pairs(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """The same pair ids, in order, with the same text."""
    return list(a["pair_id"]) == list(b["pair_id"]) and pair_text_digests(a) == pair_text_digests(b)


def left_running(context: dg.AssetExecutionContext, launcher: RunLauncher, run_dir: Path, finished: str) -> str | None:
    """The job an earlier Dagster process left running (or finished) in `run_dir`, which holds no `finished` output
    yet: to follow again. Outputs there that could not be read are not followed again: the asset computes anew."""
    return launcher.live_job(context, run_dir) if run_dir.exists() and not (run_dir / finished).exists() else None


def cost_metadata(cost: dict | None) -> dict:
    """cost_* entries (elapsed_s, queue_wait_s, gpu_hours, max_rss_mb, cpu_efficiency, jobs) where known."""
    return {f"cost_{name}": value for name, value in (cost or {}).items()}


def with_references(pairs: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """The pairs with their base-model log-probs and token ids. A stale reference_logps fails the run: a pair
    without log-probs, or one whose text is not what they were computed from (pair ids alone cannot tell: another
    PRISM release or synthetic configuration reuses them for other text)."""
    carried = [*REFERENCE_COLUMNS, *TOKEN_COLUMNS, TEXT_DIGEST_COLUMN]
    merged = pairs.merge(references[["pair_id", *carried]], on="pair_id", how="left", validate="one_to_one")
    missing = int(merged[REFERENCE_COLUMNS[0]].isna().sum())
    if missing:
        raise dg.Failure(
            f"{missing} of {len(pairs)} pairs have no reference log-probs: rematerialize reference_logps",
            allow_retries=False,
        )
    changed = merged[TEXT_DIGEST_COLUMN].to_numpy() != np.asarray(pair_text_digests(pairs), dtype=object)
    if changed.any():
        raise dg.Failure(
            f"{int(changed.sum())} of {len(pairs)} pairs (first: "
            f"{merged['pair_id'][changed].iloc[0]!r}) have other text than reference_logps "
            "computed its log-probs from: rematerialize reference_logps",
            allow_retries=False,
        )
    return merged.drop(columns=TEXT_DIGEST_COLUMN)


def run_config(
    settings: TrainingSettings, base_model: str, cell: str, seed: int, max_train_pairs: int | None, experiment: str
) -> RunConfig:
    """The trainer's config of one partition: every field of the schema as the settings have it (the base model
    resolved to a path), the run's pairs file and seed."""
    split, group = partitions.parse_cell(cell)
    try:
        return RunConfig(
            **{**settings.training_values(), "base_model": base_model},
            pairs_path="pairs.parquet",
            output_dir=".",
            seed=seed,
            max_train_pairs=max_train_pairs,
            label={"experiment": experiment, "cell": cell, "split": split, "group": group, "seed": seed},
            code_version=JOB_CODE_VERSIONS[TRAINER_MODULE],
        )
    except ValidationError as error:  # settings the schema refuses: a retry would repeat it
        raise dg.Failure(f"DPO settings: {validation_problems(error)}", allow_retries=False) from None


def run_id(config: RunConfig, base_model: str, pairs: pd.DataFrame) -> str:
    """The identity of a run over its seeds: the trainer's code, the base model (by name), every setting that decides
    its course but the seed, and its pairs (ids and text). Runs of two experiments with the same id are one run."""
    trajectory = {k: v for k, v in config.trajectory().items() if k != "seed"}
    pairs_digest = hashlib.sha256(
        "\n".join(sorted(f"{i} {d}" for i, d in zip(pairs["pair_id"], pair_text_digests(pairs)))).encode()
    ).hexdigest()
    identity = {"code": CODE_VERSION, "base_model": base_model, "settings": trajectory, "pairs": pairs_digest}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_run(run_dir: Path, log: Callable[[str], None]) -> tuple[dict, pd.DataFrame] | None:
    """A finished run's outputs in `run_dir` (trained by this or another experiment), or None when there is none;
    outputs that cannot be read are trained again, saying so."""
    if not (run_dir / METRICS_FILE).exists():
        return None
    try:
        return read_run_outputs(run_dir)
    except dg.Failure as failure:
        log(f"training {run_dir} again: its finished outputs cannot be read ({failure.description})")
        return None


def build_group_dpo_run(experiment: str, settings: TrainingSettings) -> dg.AssetsDefinition:
    settings_fingerprint = fingerprint(settings)

    @dg.asset(
        key=[experiment, "group_dpo_run"],
        partitions_def=partitions.dpo_partitions(experiment),
        group_name=experiment,
        kinds={"pytorch"},
        owners=versions.OWNERS,
        tags={"experiment": experiment},
        pool="gpu",
        code_version=f"{CODE_VERSION}-{settings_fingerprint}",
        retry_policy=RETRY_POLICY,
        ins={
            "significant_splits": dg.AssetIn(key=[experiment, "significant_splits"]),
            "reference_logps": dg.AssetIn(key=reference_key(settings)),
        },
        description=f"One DPO fine-tuning run of {experiment} (base model {settings.base_model}; TRL's DPO loss, "
        "reference log-probs from reference_logps) per partition: cell = baseline or <split>.<A|B> (the group's "
        "pairs), seed. A run another experiment already trained on the same users and settings is shared, not "
        "trained again. Output: learning curve (held-out accuracy/margin every eval step) and summary metrics.",
    )
    def group_dpo_run(
        context: dg.AssetExecutionContext,
        dpo_storage: DpoStorage,
        launcher: RunLauncher,
        within_model_pairs: pd.DataFrame,
        significant_splits: dict,
        reference_logps: pd.DataFrame,
    ) -> dg.Output:
        keys = context.partition_key.keys_by_dimension
        try:
            cell, seed = keys[partitions.CELL], int(partitions.seed_key(keys[partitions.SEED]))
            split, group = partitions.parse_cell(cell)
        except ValueError as error:  # before anything is written or submitted; a retry would not help
            raise dg.Failure(str(error), allow_retries=False) from None
        pairs = group_pairs(within_model_pairs, significant_splits, split, group)
        config = run_config(
            settings,
            dpo_storage.resolved_base_model(settings.base_model),
            cell,
            seed,
            balanced_train_pairs(within_model_pairs, significant_splits, split, settings)
            if settings.balance_groups and split is not None
            else None,
            experiment,
        )
        identity = run_id(config, settings.base_model, pairs)
        # Neither changes the run's identity: its id, for the trackers, and where they write.
        config = config.model_copy(
            update={"label": {**config.label, "run_id": identity}, **dpo_storage.resolved_tracking(settings)}
        )
        run_dir = (Path(dpo_storage.runs_dir) / identity / f"seed{seed}").resolve()
        with exclusive(run_dir, f"Dagster run {context.run.run_id} ({experiment} {cell})", context.log.info):
            outputs = finished_run(run_dir, context.log.warning)
            trained = outputs is None
            if outputs is None:
                outputs = _train(context, launcher, dpo_storage, config, pairs, reference_logps, run_dir)
            else:
                context.log.info(f"{experiment} {cell} seed {seed}: the same run is finished in {run_dir}; adopted")
        metrics, curve = outputs
        value = {
            "metrics": metrics,
            "curve": curve,
            "experiment": experiment,
            "cell": cell,
            "split": split,
            "group": group,
            "seed": seed,
            "run_id": identity,
            "run_config": json.loads((run_dir / RUN_CONFIG_FILE).read_text()),
            "membership_digest": membership_digest(significant_splits, split, group),
            "settings_fingerprint": settings_fingerprint,
            "cost": run_cost(run_dir),  # every job of the run, where the launcher knows it (SLURM accounting)
        }
        metadata = {
            **{k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)},
            "run_dir": dg.MetadataValue.path(str(run_dir)),
            "run_id": identity,
            "trained": trained,  # False: adopted, the same run was trained before (by this or another experiment)
            "num_pairs": len(pairs),
            "base_model": settings.base_model,
            "attention_kernel": metrics.get("attention_kernel", ""),
            **cost_metadata(value["cost"]),
        }
        # metrics.json, not the Pipes channel, is the record: a lost message stream loses nothing.
        return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(metrics["data_version"]))

    return group_dpo_run


def _train(
    context: dg.AssetExecutionContext,
    launcher: RunLauncher,
    dpo_storage: DpoStorage,
    config: RunConfig,
    pairs: pd.DataFrame,
    reference_logps: pd.DataFrame,
    run_dir: Path,
) -> tuple[dict, pd.DataFrame]:
    """Train the run in `run_dir` (resuming an unfinished attempt of it, or following the job an earlier Dagster
    process left running for it) and read its outputs."""
    outputs = [RUN_CONFIG_FILE, CURVE_FILE, METRICS_FILE]
    job = left_running(context, launcher, run_dir, METRICS_FILE)
    if job is not None:  # its directory is the job's: nothing in it is replaced
        launcher.run(context=context, run_dir=str(run_dir), outputs=outputs, command=[], job=job)
        return read_run_outputs(run_dir)
    with attempt_dir(
        run_dir, METRICS_FILE, context.log.warning, keep=(CHECKPOINTS_DIR, "config.json", COST_FILE, TRACKING_FILE)
    ):
        with_references(pairs, reference_logps).to_parquet(run_dir / "pairs.parquet", index=False)
        config_path = run_dir / "config.json"
        keep_checkpoints_of_the_same_run(run_dir, config, context.log.info)
        config_path.write_text(config.model_dump_json(indent=2))
        label = config.label
        context.log.info(
            f"{label['experiment']} {label['cell']} seed {config.seed}: {len(pairs)} pairs of "
            f"{pairs['user_id'].nunique()} users → {run_dir}"
        )
        launcher.run(
            context=context,
            run_dir=str(run_dir),
            outputs=outputs,
            command=[dpo_storage.python, "-m", TRAINER_MODULE, "--config", str(config_path)],
        )
        return read_run_outputs(run_dir)
