"""The job-side DPO trainer: `python -m prism_assets.training.trainer --config config.json`.

Owns one run: its held-out split, the training loop over `engine`'s step, held-out evaluation, checkpoints
(periodic, and on SLURM's USR1 or SIGTERM: save, exit so the job is requeued) and resuming from the newest
readable one written under the same settings, and its outputs (`run.json`, `curve.parquet`, `metrics.json`,
each written atomically). Reports through dagster-pipes, and to the experiment trackers of `report_to` (`tracking`);
imports nothing else of Dagster.
"""

import argparse
import hashlib
import io
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

# SLURM's warning signal can come while torch and TRL are still importing (seconds): remember it from
# here on instead of dying of it; StopRequest takes these over.
_EARLY_SIGNALS: list[int] = []
for _sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(_sig, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from prism_assets.training import engine, packing, tracking  # noqa: E402
from prism_assets.training.base_model import load_base_model  # noqa: E402
from prism_assets.training.logps import frozen_logps, sequences_of  # noqa: E402
from prism_assets.training.metrics import (  # noqa: E402
    EVALUATED,
    HELDOUT_METRICS,
    SAMPLING_ERRORS,
    TAIL_FRACTION,
    summarize_curve,
)
from prism_assets.training.reporting import Reporter  # noqa: E402
from prism_assets.training.run_folder import (  # noqa: E402
    CHECKPOINT_CURVE,
    CHECKPOINT_HELDOUT,
    CHECKPOINT_STATE,
    CHECKPOINTS_DIR,
    CURVE_FILE,
    HELDOUT_FILE,
    METRICS_FILE,
    OWN_COLUMN,
    REFERENCE_COLUMNS,
    RUN_FILE,
    check_code_version,
    checkpoint_dir,
    complete_checkpoints,
    heldout_users,
    pair_hash,
    prune_checkpoints,
    write_atomic,
)
from prism_assets.training.settings import RunConfig  # noqa: E402

TRL_LOG_COLUMNS = {
    "loss": "loss",
    "rewards/margins": "margin",
    "rewards/accuracies": "pref_acc",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
}


REQUEUE_EXIT_CODE = 99


class StopRequest:
    """Remembers SIGUSR1 / SIGTERM so training stops at the end of the current step, after a checkpoint."""

    def __init__(self):
        self.signal: int | None = _EARLY_SIGNALS[-1] if _EARLY_SIGNALS else None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def exit_code(self) -> int:
        assert self.signal is not None  # called once a signal has arrived
        return REQUEUE_EXIT_CODE if self.signal == signal.SIGUSR1 else 128 + int(self.signal)


def peak_memory(use_cuda: bool) -> dict:
    """What one run needs: peak GPU memory allocated (CUDA) and the process's peak resident memory, in GiB.
    Runs packed onto one GPU (runs_per_gpu) must fit K times the former."""
    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if use_cuda:
        peak["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


def load_checkpoint(
    directory: Path, cfg: RunConfig, device, reporter: Reporter, unreadable: list[str]
) -> tuple[Path, dict, list, list[pd.DataFrame]] | None:
    """(checkpoint, state, curve rows, held-out results) of the newest readable checkpoint in `directory`, or None to
    start at step 0.
    One that cannot be read (a node that died while the file system still held it in part) is reported, added to
    `unreadable`, and the next older tried; one written under other settings is an error naming them."""
    for candidate in complete_checkpoints(directory):
        try:
            state = torch.load(candidate / CHECKPOINT_STATE, map_location=device, weights_only=True)
            rows = json.loads((candidate / CHECKPOINT_CURVE).read_text())
            results = (
                [pd.read_parquet(candidate / CHECKPOINT_HELDOUT)] if (candidate / CHECKPOINT_HELDOUT).exists() else []
            )
        except Exception as error:  # any unreadable file: the checkpoint before it may be whole
            reporter.info(
                f"{candidate} cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                "trying the checkpoint before it"
            )
            unreadable.append(candidate.name)
            continue
        ours, theirs = cfg.trajectory(), state["trajectory"]
        changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if changed:
            raise ValueError(
                f"{candidate} was written by a run with other settings: "
                + ", ".join(f"{k} {theirs.get(k)!r} (now {ours.get(k)!r})" for k in changed)
                + f"; delete {directory} to start this run over"
            )
        return candidate, state, rows, results
    return None


def save_checkpoint(
    directory: Path,
    step: int,
    cfg: RunConfig,
    model,
    optimizer,
    schedule,
    rows: list[dict],
    results: list[pd.DataFrame] | None = None,
    keep: int = 2,
) -> Path:
    """Model, optimizer and schedule state, the run's settings, the curve and the held-out results so far; the curve
    is written last (completeness mark). Keeps the newest `keep` complete checkpoints and removes the rest, incomplete
    ones of an earlier attempt included."""
    target = checkpoint_dir(directory, step)
    target.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "trajectory": cfg.trajectory(),
    }
    write_atomic(target / CHECKPOINT_STATE, lambda file: torch.save(state, file))  # 5.5 GB at 0.5B: no copy in memory
    if results:
        write_atomic(target / CHECKPOINT_HELDOUT, frame_bytes(pd.concat(results, ignore_index=True)))
    write_atomic(target / CHECKPOINT_CURVE, json.dumps(rows).encode())
    prune_checkpoints(directory, keep)
    return target


def checkpoint_due(cfg: RunConfig, step: int, last_checkpoint: float) -> bool:
    """A periodic checkpoint at logged step `step`: every `checkpoint_steps`, or `checkpoint_minutes` after the last
    (a checkpoint of the 0.5B model with its optimizer is 5.5 GB: its cost is fixed in seconds, not steps)."""
    return bool(
        (cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0)
        or (cfg.checkpoint_minutes and time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_minutes)
    )


def frame_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def load_pairs(cfg: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training pairs, held-out pairs) of the run: it trains on its own pairs (the `own` column; all, without it) of
    the users outside its seed's fold (`run_folder.heldout_users`), and evaluates every pair of the fold's users —
    its own group's and, where the pairs file carries them, the others' — ordered by pair hash."""
    pairs = pd.read_parquet(cfg.pairs_path)
    missing = [c for c in ("pair_id", "user_id", "prompt", "chosen", "rejected") if c not in pairs.columns]
    if missing:
        raise ValueError(f"{cfg.pairs_path}: pairs file lacks columns {missing}")
    if OWN_COLUMN not in pairs.columns:
        pairs = pairs.assign(**{OWN_COLUMN: True})
    if cfg.user_ids is not None:
        pairs = pairs[pairs["user_id"].isin(set(cfg.user_ids)) | ~pairs[OWN_COLUMN]]
    fold = heldout_users(pairs["user_id"], cfg.heldout_share, cfg.seed)
    heldout = pairs[fold].assign(_hash=pairs.loc[fold, "pair_id"].map(pair_hash))
    heldout = heldout.sort_values("_hash").drop(columns="_hash").reset_index(drop=True)
    train = pairs[~fold & pairs[OWN_COLUMN].astype(bool)].reset_index(drop=True)
    if cfg.max_train_pairs is not None:
        train = train.head(cfg.max_train_pairs)
    consumed = cfg.max_steps * cfg.batch_size
    if len(train) > consumed:
        # A run of max_steps batches sees `consumed` pairs, a uniform draw without replacement: draw them here
        # (seeded) so that only they are tokenized; the trainer then shuffles them with the same seed.
        train = train.sample(n=consumed, random_state=cfg.seed).reset_index(drop=True)
    own = int(heldout[OWN_COLUMN].sum())
    if len(train) < cfg.batch_size or own == 0:
        raise ValueError(
            f"{cfg.pairs_path}: {len(train)} training pairs and {own} held-out pairs of the run's own users in seed "
            f"{cfg.seed}'s fold (heldout_share {cfg.heldout_share}) are too few (batch size {cfg.batch_size})"
        )
    return train, heldout


class HeldoutEvaluator:
    """The policy's implicit-reward margins on the held-out pairs, against the base model: every held-out pair at the
    steps the primary metric reads, the first `curve_heldout_pairs` of the run's own at the other evaluated steps.

    Each evaluation gives the curve's row (accuracy and margin over the run's own held-out pairs, with their sampling
    errors) and one result per evaluated pair (`PAIR_COLUMNS`), which the run keeps in HELDOUT_FILE. The base model's
    log-probs come with the pairs (`ref_chosen_logps` / `ref_rejected_logps`, from the reference_logps asset) or, for
    a pairs file without them, are computed here before training starts.
    """

    COLUMNS = (*HELDOUT_METRICS, *SAMPLING_ERRORS, "heldout_pairs")  # a curve row's held-out columns
    PAIR_COLUMNS = ("step", "pair_id", "user_id", OWN_COLUMN, "policy_logratio", "reference_logratio", "margin")

    def __init__(self, model, tokenizer, heldout: pd.DataFrame, cfg: RunConfig):
        self.beta = cfg.beta
        self.pairs = heldout[["pair_id", "user_id", OWN_COLUMN]].reset_index(drop=True)
        self.chosen, self.rejected, _ = sequences_of(tokenizer, heldout, cfg.max_length)
        own = np.flatnonzero(self.pairs[OWN_COLUMN].to_numpy(dtype=bool))
        self.curve_subset = own[: cfg.curve_heldout_pairs]
        self.full_steps = cfg.full_evaluation_steps(TAIL_FRACTION)
        if set(REFERENCE_COLUMNS) <= set(heldout.columns):
            self.references = [torch.tensor(heldout[c].to_numpy(), dtype=torch.float32) for c in REFERENCE_COLUMNS]
        else:
            self.references = list(self._policy_logps(model, np.arange(len(self.pairs))))

    def _policy_logps(self, model, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        values = frozen_logps(model, [self.chosen[i] for i in rows] + [self.rejected[i] for i in rows])
        return values[: len(rows)], values[len(rows) :]

    def evaluate(self, model, step: int) -> tuple[dict, pd.DataFrame]:
        """(the curve row's held-out columns, one result per evaluated pair)."""
        rows = np.arange(len(self.pairs)) if step in self.full_steps else self.curve_subset
        chosen, rejected = self._policy_logps(model, rows)
        ref_chosen, ref_rejected = (reference[rows] for reference in self.references)
        chosen_reward, rejected_reward = engine.implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        margin = (chosen_reward - rejected_reward).numpy()
        results = self.pairs.iloc[rows].reset_index(drop=True)
        results.insert(0, "step", step)
        results["policy_logratio"] = (chosen - rejected).numpy()
        results["reference_logratio"] = (ref_chosen - ref_rejected).numpy()
        results["margin"] = margin
        own = margin[results[OWN_COLUMN].to_numpy(dtype=bool)]
        accuracy, n = float((own > 0).mean()), len(own)
        return {
            "heldout_acc": accuracy,
            "heldout_margin": float(own.mean()),
            "heldout_acc_se": math.sqrt(accuracy * (1 - accuracy) / n),
            "heldout_margin_se": float(own.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0,
            "heldout_pairs": float(n),  # NaN where not evaluated: a float column either way
        }, results


def train(cfg: RunConfig, reporter: Reporter, stop: StopRequest, trackers: tracking.Trackers) -> dict | None:
    """Train to the end and write the outputs (their metrics returned), or stop on a signal after a checkpoint
    (None); `trackers` follow the run (the caller closes them on an error)."""
    from transformers import set_seed

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    set_seed(cfg.seed)
    train_pairs, heldout = load_pairs(cfg)
    tokenizer, model = load_base_model(cfg.base_model, torch.float32)
    if use_cuda:
        model.to("cuda")  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self from mypy
    initial = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
    evaluator = HeldoutEvaluator(model, tokenizer, heldout, cfg)
    precomputed = set(REFERENCE_COLUMNS) <= set(train_pairs.columns)
    reporter.info(
        f"DPO {cfg.label or ''}: {len(train_pairs)} train / {len(heldout)} held-out pairs, "
        f"{cfg.max_steps} steps on {'cuda' if use_cuda else 'cpu'}"
    )

    chosen, rejected, stored = sequences_of(tokenizer, train_pairs, cfg.max_length)
    refs = [train_pairs[c].to_numpy() for c in REFERENCE_COLUMNS] if precomputed else None
    reporter.info(
        "reference log-probs: "
        + (
            "precomputed (reference_logps)"
            if precomputed
            else "computed here from the base model (the pairs carry none)"
        )
        + "; token ids: "
        + ("stored by reference_logps" if stored else "tokenized here")
    )
    if refs is None:  # the model is still the base model here
        values = frozen_logps(model, chosen + rejected).numpy()
        refs = [values[: len(chosen)], values[len(chosen) :]]
    if cfg.gradient_checkpointing:  # less activation memory for a second forward pass in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, schedule = engine.make_optimizer(model, cfg.learning_rate, cfg.max_steps, use_cuda)

    checkpoints = out / CHECKPOINTS_DIR
    unreadable: list[str] = []
    resumed = load_checkpoint(checkpoints, cfg, device, reporter, unreadable)
    rows: list[dict] = []
    results: list[pd.DataFrame] = []  # each evaluation's per-pair results
    step = 0
    if resumed:
        resume_from, state, rows, results = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        reporter.info(f"resuming from {resume_from} at step {step} ({len(rows)} logged steps so far)")
    # What this attempt ran with and started from: the record tests and people read, not the log.
    write_atomic(
        out / RUN_FILE,
        json.dumps(
            {
                **cfg.model_dump(),
                "num_train_pairs": len(train_pairs),
                "num_evaluated_pairs": len(heldout),
                "device": "cuda" if use_cuda else "cpu",
                "torch": torch.__version__,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "reference_logps": "precomputed" if precomputed else "computed",
                "token_ids": "stored" if stored else "tokenized",
                "resumed_at_step": step if resumed else None,
                "unreadable_checkpoints": unreadable,
            },
            indent=2,
        ).encode(),
    )
    trackers.start(rows, step, reporter.info)  # a resumed run continues its trackers' runs

    model.train()
    window: list[engine.Step] = []
    last_checkpoint = time.monotonic()
    while step < cfg.max_steps:
        batch_rows = engine.batch_indices(len(train_pairs), cfg.batch_size, cfg.seed, step)
        batch = engine.collate(
            [chosen[i] for i in batch_rows],
            [rejected[i] for i in batch_rows],
            refs[0][batch_rows],
            refs[1][batch_rows],
            device,
        )
        window.append(engine.train_step(model, batch, cfg.beta, optimizer, schedule))
        step += 1
        if step % cfg.logging_steps:
            continue
        # A logged row averages the window (as TRL logs), grad norm and learning rate are the last step's.
        logged = engine.read_metrics(window)  # the only wait for the device between logging steps
        row = {
            "step": step,
            **{
                TRL_LOG_COLUMNS[k]: float(sum(w[k] for w in logged) / len(logged))
                for k in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
            },
            "grad_norm": logged[-1]["grad_norm"],
            "learning_rate": logged[-1]["learning_rate"],
        }
        window = []
        evaluated = cfg.evaluates_at(step)
        if evaluated:
            heldout_row, pairs_evaluated = evaluator.evaluate(model, step)
            row.update(heldout_row)
            results.append(pairs_evaluated)
        else:
            row.update(dict.fromkeys(HeldoutEvaluator.COLUMNS, math.nan))
        row[EVALUATED] = evaluated
        rows.append(row)
        trackers.log(row)  # before the checkpoint that holds it: a resumed run's trackers have every row before it
        reporter.info(
            f"step {step}/{cfg.max_steps} loss {row['loss']:.4f} pref_acc {row['pref_acc']:.3f}"
            + (
                f" heldout_acc {row['heldout_acc']:.3f} heldout_margin {row['heldout_margin']:.4f}"
                if evaluated
                else ""
            )
        )
        # Checkpoints are taken on logging steps only: a resumed run then logs exactly as an uninterrupted one.
        if stop.signal is not None or (not cfg.last_logged(step) and checkpoint_due(cfg, step, last_checkpoint)):
            save_checkpoint(checkpoints, step, cfg, model, optimizer, schedule, rows, results)
            last_checkpoint = time.monotonic()
        if stop.signal is not None:
            reporter.info(
                f"signal {signal.Signals(stop.signal).name}: checkpoint saved at step {step}; "
                f"exiting with {stop.exit_code()}"
            )
            trackers.finish("stopped")
            return None

    curve = pd.DataFrame(rows)
    metrics = summarize_curve(curve, cfg.max_steps)
    delta = math.sqrt(sum(float((p.detach().cpu() - initial[n]).pow(2).sum()) for n, p in model.named_parameters()))
    metrics.update(
        {
            "param_delta_l2": delta,
            "num_train_pairs": len(train_pairs),
            "num_heldout_pairs": int(heldout[OWN_COLUMN].sum()),  # the run's own group's
            "num_evaluated_pairs": len(heldout),  # every held-out user's of its seed
            "num_heldout_users": int(heldout.loc[heldout[OWN_COLUMN], "user_id"].nunique()),
        }
    )
    curve_data = frame_bytes(curve)
    usage = {**peak_memory(use_cuda), "attention_kernel": packing.kernels_used()}
    data_version = hashlib.sha256(curve_data + json.dumps(metrics, sort_keys=True).encode()).hexdigest()[:24]
    # Cost, not result: outside the data version, so the same seed on CPU still gives the same version.
    summary = {**metrics, "data_version": data_version, "runtime_s": time.perf_counter() - started, **usage}
    trackers.summary(summary)  # before the outputs: a run whose tracker fails has not finished
    write_atomic(out / HELDOUT_FILE, frame_bytes(pd.concat(results, ignore_index=True)))
    write_atomic(out / CURVE_FILE, curve_data)
    write_atomic(out / METRICS_FILE, json.dumps(summary, indent=2).encode())
    trackers.finish("finished")
    if not cfg.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    reporter.report({k: v for k, v in {**metrics, **usage}.items() if v is not None}, data_version)
    reporter.info(f"finished in {time.perf_counter() - started:.1f} s: heldout_acc {metrics['final_heldout_acc']:.3f}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prism_assets.training.trainer")
    parser.add_argument("--config", required=True, help="path of the JSON run config")
    args = parser.parse_args(argv)
    cfg = RunConfig.from_json(args.config)
    stop = StopRequest()
    reporter = Reporter()
    trackers = None
    try:
        check_code_version("prism_assets.training.trainer", cfg.code_version)
        trackers = tracking.Trackers(cfg)  # a tracker's package missing: an error now, before anything is loaded
        metrics = train(cfg, reporter, stop, trackers)
    except BaseException as error:
        if trackers is not None:
            trackers.finish("failed")
        reporter.close(error)
        raise
    finally:
        # The run's outcome is decided: a warning or SIGTERM arriving now must not turn it into death by signal.
        # (Python restores default handlers while it shuts down, but leaves ignored signals ignored.)
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if metrics is None:  # stopped for a requeue: the Pipes channel stays open for the resumed attempt
        return stop.exit_code()
    reporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
