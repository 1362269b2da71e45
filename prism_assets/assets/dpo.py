"""DPO assets: `reference_logps/<model>` and each experiment's `<experiment>/group_dpo_run`, through a launcher.

The factories: an experiment's settings are baked into its assets' code versions. A partition's pairs and config come
from `cells`, its folder and everything done to it (identity, lock, attempts, adopting a finished run) from
`training.run_folder`; the job runs through the launcher resource. A missing or corrupt output fails the partition
naming the file.
"""

import hashlib
import math
import sys
from pathlib import Path

import dagster as dg
import pandas as pd

from prism_assets import cells, keys, partitions, versions
from prism_assets.training import run_folder as folder
from prism_assets.training.metrics import TAIL_FRACTION
from prism_assets.training.run_folder import (
    CURVE_FILE,
    HELDOUT_FILE,
    METRICS_FILE,
    OWN_COLUMN,
    PAIRS_FILE,
    REFERENCE_COLUMNS,
    REFERENCE_CONFIG_FILE,
    REFERENCE_OUTPUT,
    RUN_FILE,
    TEXT_DIGEST_COLUMN,
    TOKEN_COLUMNS,
    RunOutputs,
    pair_text_digests,
)
from prism_assets.training.settings import REFERENCE_FIELDS, ReferenceConfig, RunConfig, TrainingSettings, fingerprint
from resources.launcher import RunLauncher
from resources.storage import DpoStorage

# What a DPO run computes: this module, the cell's pairs and config, the trainer and every module it imports, and the
# builder of the embedded base model.
CODE_VERSION = versions.source_version(
    sys.modules[__name__], cells, "prism_assets.training.trainer", "prism_assets.training.tiny_model"
)
REFERENCE_CODE_VERSION = versions.source_version("prism_assets.training.reference", "prism_assets.training.tiny_model")
# The code each job runs where it runs (the cluster's environment): the job refuses to run other code.
TRAINER_MODULE, REFERENCE_MODULE = "prism_assets.training.trainer", "prism_assets.training.reference"
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


def final(error: Exception) -> dg.Failure:
    """A problem a retry would only repeat (a corrupt file, a split gone, settings refused): one line, no retry."""
    return dg.Failure(str(error), allow_retries=False)


def build_reference_logps(settings: TrainingSettings) -> dg.AssetsDefinition:
    """The reference log-probs of `settings`' base model (and the settings they depend on), shared by every
    experiment on that model."""

    @dg.asset(
        key=keys.reference_logps(settings),
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
        run_dir = folder.reference_dir(dpo_storage.runs_dir, context.asset_key.path[-1])
        with folder.exclusive(run_dir, f"Dagster run {context.run.run_id}", context.log.info):
            job = left_running(context, launcher, run_dir, REFERENCE_OUTPUT)
            if job is not None:  # its folder is the job's: nothing in it is replaced
                return _reference_logps(context, settings, dpo_storage, launcher, within_model_pairs, run_dir, job)
            with folder.attempt(run_dir, REFERENCE_OUTPUT, context.log.warning):
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
        pairs_path=PAIRS_FILE,
        output_path=REFERENCE_OUTPUT,
        device=settings.device,
        code_version=JOB_CODE_VERSIONS[REFERENCE_MODULE],
    )
    config_path = run_dir / REFERENCE_CONFIG_FILE
    pairs = within_model_pairs[["pair_id", "prompt", "chosen", "rejected"]]
    if job is None:
        pairs.to_parquet(run_dir / config.pairs_path, index=False)
        config_path.write_text(config.model_dump_json(indent=2))
    elif config_path.read_text() != config.model_dump_json(indent=2) or not _same_pairs(
        pairs, pd.read_parquet(run_dir / config.pairs_path)
    ):  # matched on its settings and pairs, never on the asset alone; its folder is not ours to replace
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
        raise final(
            folder.RunFolderError(
                f"the reference job left no {output.name} in {run_dir} (see its stderr there: "
                f"{folder.STDERR_FILE}, or {folder.job_stderr('<job id>')} under SLURM)"
            )
        )
    try:
        frame = pd.read_parquet(output)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise final(folder.RunFolderError(f"{output} cannot be read as parquet: {error}")) from None
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
            **cost_metadata(folder.run_cost(run_dir)),
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


def build_group_dpo_run(experiment: str, settings: TrainingSettings) -> dg.AssetsDefinition:
    settings_fingerprint = fingerprint(settings)

    @dg.asset(
        key=keys.group_dpo_run(experiment),
        partitions_def=partitions.dpo_partitions(experiment),
        group_name=experiment,
        kinds={"pytorch"},
        owners=versions.OWNERS,
        tags={"experiment": experiment},
        pool="gpu",
        code_version=f"{CODE_VERSION}-{settings_fingerprint}",
        retry_policy=RETRY_POLICY,
        ins={
            "significant_splits": dg.AssetIn(key=keys.significant_splits(experiment)),
            "reference_logps": dg.AssetIn(key=keys.reference_logps(settings)),
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
        dimensions = context.partition_key.keys_by_dimension
        try:
            cell, seed = dimensions[partitions.CELL], int(partitions.seed_key(dimensions[partitions.SEED]))
            split, group = partitions.parse_cell(cell)
            pairs = cells.run_pairs(within_model_pairs, significant_splits, split, group, settings, seed)
            config = cells.run_config(
                settings,
                dpo_storage.resolved_base_model(settings.base_model),
                cell,
                seed,
                cells.balanced_train_pairs(within_model_pairs, significant_splits, split, settings, seed)
                if settings.balance_groups and split is not None
                else None,
                experiment,
                JOB_CODE_VERSIONS[TRAINER_MODULE],
            )
        except ValueError as error:  # before anything is written or submitted; a retry would not help
            raise final(error) from None
        own = pairs[pairs[OWN_COLUMN]]
        population = folder.pairs_digest(within_model_pairs["pair_id"], folder.text_digests(within_model_pairs))
        own_digest = folder.pairs_digest(own["pair_id"], folder.text_digests(own))
        identity = folder.run_id(CODE_VERSION, settings.base_model, config.trajectory(), own_digest, population)
        # Neither changes the run's identity: its id, for the trackers, and where they write.
        config = config.model_copy(
            update={"label": {**config.label, "run_id": identity}, **dpo_storage.resolved_tracking(settings)}
        )
        run_dir = folder.seed_dir(dpo_storage.runs_dir, identity, seed)
        with folder.exclusive(run_dir, f"Dagster run {context.run.run_id} ({experiment} {cell})", context.log.info):
            outputs = folder.finished_outputs(run_dir, context.log.warning)
            trained = outputs is None
            if outputs is None:
                outputs = _train(context, launcher, dpo_storage, config, pairs, reference_logps, run_dir)
            else:
                context.log.info(f"{experiment} {cell} seed {seed}: the same run is finished in {run_dir}; adopted")
        metrics = outputs.metrics
        value = {
            "metrics": metrics,
            "curve": outputs.curve,
            # every held-out pair's result at the steps the primary metric reads: what the table resamples
            "heldout": outputs.heldout[outputs.heldout["step"].isin(config.full_evaluation_steps(TAIL_FRACTION))],
            "data_digest": population,  # the pairs the run was trained and evaluated on (ids and text)
            "experiment": experiment,
            "cell": cell,
            "split": split,
            "group": group,
            "seed": seed,
            "run_id": identity,
            "run_config": outputs.record,
            "membership_digest": cells.membership_digest(significant_splits, split, group),
            "settings_fingerprint": settings_fingerprint,
            "cost": folder.run_cost(run_dir),  # every job of the run, where the launcher knows it (SLURM accounting)
        }
        metadata = {
            **{k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)},
            "run_dir": dg.MetadataValue.path(str(run_dir)),
            "run_id": identity,
            "trained": trained,  # False: adopted, the same run was trained before (by this or another experiment)
            "num_pairs": len(own),
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
) -> RunOutputs:
    """Train the run in `run_dir` (resuming an unfinished attempt of it, or following the job an earlier Dagster
    process left running for it) and read its outputs."""
    outputs = [RUN_FILE, CURVE_FILE, HELDOUT_FILE, METRICS_FILE]
    job = left_running(context, launcher, run_dir, METRICS_FILE)
    if job is not None:  # its folder is the job's: nothing in it is replaced
        launcher.run(context=context, run_dir=str(run_dir), outputs=outputs, command=[], job=job)
        return _read(run_dir)
    with folder.attempt(run_dir, METRICS_FILE, context.log.warning, keep=folder.RESUMABLE):
        try:
            with_references = cells.with_references(pairs, reference_logps)
        except cells.CellError as error:
            raise final(error) from None
        with_references.to_parquet(run_dir / PAIRS_FILE, index=False)
        config_path = run_dir / folder.CONFIG_FILE
        folder.keep_checkpoints_of_the_same_run(run_dir, config, context.log.info)
        config_path.write_text(config.model_dump_json(indent=2))
        label = config.label
        own = pairs[pairs[OWN_COLUMN]]
        context.log.info(
            f"{label['experiment']} {label['cell']} seed {config.seed}: {len(own)} pairs of "
            f"{own['user_id'].nunique()} users, and {len(pairs) - len(own)} other users' held-out pairs → {run_dir}"
        )
        launcher.run(
            context=context,
            run_dir=str(run_dir),
            outputs=outputs,
            command=[dpo_storage.python, "-m", TRAINER_MODULE, "--config", str(config_path)],
        )
        return _read(run_dir)


def _read(run_dir: Path) -> RunOutputs:
    try:
        return folder.read_outputs(run_dir)
    except folder.RunFolderError as error:
        raise final(error) from None
