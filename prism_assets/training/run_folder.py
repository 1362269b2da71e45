"""The run folder: the contract between the Dagster side (assets, launchers) and a job (trainer, reference, trackers).

Owns every name in a run's folder `<runs>/<run id>/seed<seed>/` (and a reference job's), the columns its pairs file
carries, the held-out rule, the run's identity (which names the folder), and what is done to the folder as a whole:
the lock a launch holds, an attempt's life (what a failed attempt leaves for a retry; the last finished run kept as
`<folder>.previous` until another succeeds), reading a finished run's outputs back (adopting it), atomic writes and
checkpoint pruning. Imports neither torch nor Dagster.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from prism_assets import versions
from prism_assets.dataset.digests import TEXT_DIGEST, pair_text_digests
from prism_assets.training.settings import RunConfig

# ---- the names ----

CONFIG_FILE = "config.json"  # what the asset asked for (RunConfig), written before the job starts
RUN_FILE = "run.json"  # the config as the job ran it: device, counts, where it resumed
PAIRS_FILE = "pairs.parquet"  # the run's pairs with their reference log-probs and token ids
CURVE_FILE, METRICS_FILE = "curve.parquet", "metrics.json"  # the outputs: one row per logged step, the summaries
HELDOUT_FILE = "heldout.parquet"  # one row per held-out pair and evaluation: what any later analysis resamples
CHECKPOINTS_DIR = "trainer"  # checkpoint-<step>/ while a run trains
CHECKPOINT_PREFIX, CHECKPOINT_STATE, CHECKPOINT_CURVE = "checkpoint-", "state.pt", "curve_rows.json"
CHECKPOINT_HELDOUT = "heldout_results.parquet"  # the held-out results so far
STDOUT_FILE, STDERR_FILE = "stdout.log", "stderr.log"  # a local job's output
PIPES_CONTEXT_FILE, PIPES_MESSAGES_FILE = "pipes_context.json", "pipes_messages.jsonl"
# What each job of the folder cost, a JSON line per job, where the launcher knows it (SLURM's accounting). Kept
# across the attempts of one run: a job that failed half-way cost GPU time too.
COST_FILE = "job_cost.jsonl"
TRACKING_FILE = "tracking.json"  # the experiment trackers' runs, for a resumed attempt to continue
JOB_SCRIPT, JOB_RECORD = "job.sbatch", "slurm_job.json"  # a SLURM job's script, and its id and follower
REFERENCE_CONFIG_FILE, REFERENCE_OUTPUT = "reference.json", "reference_logps.parquet"
LOCK_SUFFIX, PREVIOUS_SUFFIX = ".lock", ".previous"
# What an unfinished attempt leaves for the next one: its checkpoints, the config they were written under, the
# cost of its jobs and its trackers' runs.
RESUMABLE = (CHECKPOINTS_DIR, CONFIG_FILE, COST_FILE, TRACKING_FILE)


def job_stdout(job_id: str) -> str:
    """A SLURM job's stdout in the folder (`%j`: the pattern sbatch fills in)."""
    return f"slurm-{job_id}.out"


def job_stderr(job_id: str) -> str:
    return f"slurm-{job_id}.err"


def seed_dir(runs_dir: str | Path, run_id: str, seed: int) -> Path:
    """`<runs_dir>/<run id>/seed<seed>`: one folder per run and seed."""
    return (Path(runs_dir) / run_id / f"seed{seed}").resolve()


def reference_dir(runs_dir: str | Path, name: str) -> Path:
    return (Path(runs_dir) / "reference" / name).resolve()


# ---- the pairs file ----

# The base model's summed log-probs of each pair's responses (reference_logps), carried in the pairs file.
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# The token ids those log-probs are of (`logps.tokenize_pairs`: TRL's tokenization and keep_end truncation), also
# carried, so that a run need not tokenize its pairs again.
TOKEN_COLUMNS = ("chosen_prompt_ids", "chosen_completion_ids", "rejected_prompt_ids", "rejected_completion_ids")
# A digest of each pair's text (`pair_text_digests`): within_model_pairs carries it, and the reference log-probs
# record the one they were computed from; a run's pairs must still have that text.
TEXT_DIGEST_COLUMN = TEXT_DIGEST


def text_digests(pairs: pd.DataFrame) -> list[str]:
    """Each pair's text digest: the one it carries (within_model_pairs), or computed from its text."""
    return pairs[TEXT_DIGEST_COLUMN].tolist() if TEXT_DIGEST_COLUMN in pairs else pair_text_digests(pairs)


def pair_hash(pair_id: str) -> int:
    return int.from_bytes(hashlib.sha256(str(pair_id).encode()).digest()[:8], "big")


# Whether a pair belongs to the run's own cell (its group, or every pair for the baseline); the pairs file also
# carries the other users' held-out pairs, which the run evaluates but never trains on.
OWN_COLUMN = "own"


def heldout_users(user_ids: pd.Series, share: float, seed: int) -> pd.Series:
    """Whether each user is held out in `seed`'s fold: the users whose id hash, shifted by seed × share, falls in
    [0, share). Successive seeds hold out disjoint users (until the folds run out, after 1 / share seeds); every run of
    a seed, in every experiment, holds out the same users, so no run trains on a user another run of that seed
    evaluates."""
    position = user_ids.astype(str).map(pair_hash).astype("float64") / 2.0**64
    return ((position - seed * share) % 1.0) < share


# ---- the run's identity ----


def pairs_digest(pair_ids, text_digests) -> str:
    """A hash of a set of pairs: their ids and the digests of their text (`pair_text_digests`), in any order."""
    lines = sorted(f"{i} {d}" for i, d in zip(pair_ids, text_digests))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:24]


def run_id(code_version: str, base_model: str, trajectory: dict[str, Any], own: str, population: str) -> str:
    """The identity of a run over its seeds: the code that trains it, the base model (by name), every setting that
    decides its course but the seed, its own pairs and the pairs it holds out from (`pairs_digest` of each: ids and
    text; each seed's held-out users follow from the settings). Runs of two experiments with the same id are one run,
    and share a folder."""
    settings = {k: v for k, v in trajectory.items() if k != "seed"}
    identity = {"code": code_version, "base_model": base_model, "settings": settings, "pairs": own, "data": population}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- one launch at a time, one attempt at a time ----


@contextlib.contextmanager
def exclusive(path: Path, owner: str, log: Callable[[str], None], poll_s: float = 1.0) -> Iterator[None]:
    """Hold <path>.lock while a launch uses the folder `path`: a second launch of the same run (the same partition, or
    another experiment's partition sharing the run) waits for the first, naming it, and never touches its live folder.
    The operating system releases the lock with the process that holds it, so a crashed or restarted orchestrator
    leaves none behind."""
    lock = path.with_name(f"{path.name}{LOCK_SUFFIX}")
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
def attempt(path: Path, finished: str, log: Callable[[str], None], keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """The folder for one attempt (the caller holds it `exclusive`ly), with nothing of an earlier attempt but the names
    in `keep` of one that did not finish (its checkpoints, and the config they were written under): a rerun never
    reads another attempt's outputs, and a retry can resume. The last successful run's folder (one holding `finished`)
    is kept as <name>.previous until an attempt succeeds: a failed, killed or interrupted attempt never deletes it.
    A failed attempt stays in place, where its job may still write and its failure points."""
    previous = path.with_name(f"{path.name}{PREVIOUS_SUFFIX}")
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
    """An earlier attempt's checkpoints stay for the trainer to resume from when they were written for the same run
    (every setting that decides its course equal); any others are removed."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    if not checkpoints.exists():
        return
    try:
        same = RunConfig.model_validate_json((run_dir / CONFIG_FILE).read_text()).trajectory() == config.trajectory()
    except (OSError, ValueError):  # no config, or one this code cannot read
        same = False
    if same:
        log(f"an earlier attempt's checkpoints are in {checkpoints}: the trainer resumes from the newest")
    else:
        shutil.rmtree(checkpoints)
        log(f"removed an earlier attempt's checkpoints, written for other settings, from {run_dir}")


# ---- checkpoints ----


def checkpoint_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"{CHECKPOINT_PREFIX}{step}"


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The checkpoints written completely (training state and curve both present), newest first."""
    complete = [
        p
        for p in checkpoints.glob(f"{CHECKPOINT_PREFIX}*")
        if (p / CHECKPOINT_STATE).exists() and (p / CHECKPOINT_CURVE).exists()
    ]
    return sorted(complete, key=lambda p: int(p.name.rpartition("-")[2]), reverse=True)


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove the rest, incomplete ones of an earlier attempt included."""
    kept = set(complete_checkpoints(checkpoints)[:keep])
    for old in checkpoints.glob(f"{CHECKPOINT_PREFIX}*"):
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)


# ---- writing and reading back ----


def write_atomic(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """`data` (bytes, text, or a function writing the file it is given) at `path`, which holds the old contents or the
    new, never part of them."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    elif isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        data(tmp)
    os.replace(tmp, path)


class RunFolderError(ValueError):
    """A file of a run folder is missing or cannot be read: the message names it."""


@dataclass
class RunOutputs:
    """What a finished run left: its summaries, its learning curve, its held-out results and the config as it ran."""

    metrics: dict
    curve: pd.DataFrame
    heldout: pd.DataFrame
    record: dict


REQUIRED_METRICS = ("final_heldout_acc", "mean_heldout_acc_tail", "data_version")


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; a missing or damaged one is a RunFolderError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None


def read_outputs(run_dir: Path) -> RunOutputs:
    """A finished run's outputs; any one missing or damaged is a RunFolderError naming the file."""
    for name in (METRICS_FILE, CURVE_FILE, HELDOUT_FILE, RUN_FILE):
        if not (run_dir / name).exists():
            raise RunFolderError(
                f"the DPO run left no {name} in {run_dir}: it did not finish (see its stderr there: "
                f"{STDERR_FILE}, or {job_stderr('<job id>')} under SLURM)"
            )
    metrics, record = read_json(run_dir / METRICS_FILE), read_json(run_dir / RUN_FILE)
    curve, heldout = read_parquet(run_dir / CURVE_FILE), read_parquet(run_dir / HELDOUT_FILE)
    if not isinstance(metrics, dict) or not isinstance(record, dict):
        raise RunFolderError(f"{run_dir / METRICS_FILE} and {run_dir / RUN_FILE} must each hold a JSON object")
    missing = [key for key in REQUIRED_METRICS if key not in metrics]
    if missing or curve.empty or heldout.empty:
        empty = CURVE_FILE if curve.empty else HELDOUT_FILE
        raise RunFolderError(
            f"{run_dir / METRICS_FILE} lacks {missing}" if missing else f"{run_dir / empty} has no rows"
        )
    return RunOutputs(metrics, curve, heldout, record)


def read_parquet(path: Path) -> pd.DataFrame:
    """A parquet file of a run folder; a damaged one is a RunFolderError naming it."""
    try:
        return pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise RunFolderError(f"{path} cannot be read as parquet: {error}") from None


def finished_outputs(run_dir: Path, log: Callable[[str], None]) -> RunOutputs | None:
    """A finished run's outputs in `run_dir` (trained by this or another experiment), or None when there is none;
    outputs that cannot be read are trained again, saying so."""
    if not (run_dir / METRICS_FILE).exists():
        return None
    try:
        return read_outputs(run_dir)
    except RunFolderError as error:
        log(f"training {run_dir} again: its finished outputs cannot be read ({error})")
        return None


def run_cost(run_dir: Path) -> dict[str, float] | None:
    """The summed cost of every job the folder records (COST_FILE), or None where none is recorded."""
    path = run_dir / COST_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    jobs = list({job["job_id"]: job for job in map(json.loads, filter(str.strip, lines))}.values())  # once each
    if not jobs:
        return None
    elapsed = sum(job["elapsed_s"] for job in jobs)
    return {
        "jobs": len(jobs),
        **{name: sum(job[name] for job in jobs) for name in ("elapsed_s", "queue_wait_s", "gpu_hours")},
        "max_rss_mb": max(job["max_rss_mb"] for job in jobs),
        "cpu_efficiency": sum(job["cpu_efficiency"] * job["elapsed_s"] for job in jobs) / elapsed if elapsed else 0.0,
    }


def record_cost(run_dir: Path, job: dict) -> None:
    """Add one job's cost to the folder's COST_FILE."""
    with open(run_dir / COST_FILE, "a") as handle:
        handle.write(json.dumps(job) + "\n")


# ---- the code the job runs ----


class StaleCodeError(RuntimeError):
    """The job's environment runs other code than the asset that launched it recorded."""


def check_code_version(module: str, expected: str | None) -> None:
    """Refuse to run when `module` and the modules it imports here are not the code the asset recorded: a
    stale environment on the cluster would otherwise train with other code under this code's version."""
    found = versions.source_version(module)
    if expected is not None and found != expected:
        raise StaleCodeError(
            f"stale code: {module} here is version {found}, the asset that launched this job recorded {expected}; "
            "install this project's current version where the job runs (DPO_PYTHON, PRISM_SLURM_SETUP_LINES)"
        )
