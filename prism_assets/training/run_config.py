"""A DPO run's configuration and its fixed held-out split: what both the asset and the trainer read.

Owns the JSON run config (`RunConfig`, unknown or missing keys are errors), the names of the files a
run writes into its directory, and the held-out rule: a pair is held out when the hash of its pair_id
falls in the first `heldout_fraction` of the hash range (at most `heldout_max_pairs`, lowest hashes
first) among the run's own pairs, so every seed of a group holds out the same pairs and never trains on them.
Imports neither torch nor Dagster.
"""

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pandas as pd

RUN_CONFIG_FILE, CURVE_FILE, METRICS_FILE = "run.json", "curve.parquet", "metrics.json"
# The base model's summed log-probs of each pair's responses (reference_logps), carried in the pairs file.
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# The token ids those log-probs are of (`logps.tokenize_pairs`: TRL's tokenization and keep_end truncation), also
# carried, so that a run need not tokenize its pairs again.
TOKEN_COLUMNS = ("chosen_prompt_ids", "chosen_completion_ids", "rejected_prompt_ids", "rejected_completion_ids")
# A digest of each pair's text that both were made from (`pair_text_digests`): a run's pairs must still have that text.
TEXT_DIGEST_COLUMN = "pair_text_digest"


def pair_text_digests(pairs: pd.DataFrame) -> list[str]:
    """Per pair, a hash of what tokenizing it reads: its prompt messages' roles and contents, and both responses."""
    def digest(prompt, chosen: str, rejected: str) -> str:
        text = json.dumps([[[m["role"], m["content"]] for m in prompt], chosen, rejected], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return [digest(*row) for row in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]


@dataclasses.dataclass
class RunConfig:
    base_model: str
    pairs_path: str                         # relative paths: relative to the config file's directory
    output_dir: str
    seed: int
    user_ids: list[str] | None = None       # train on these users' pairs only (None: all pairs in the file)
    max_steps: int = 2000
    batch_size: int = 8
    beta: float = 0.1
    learning_rate: float = 5e-6
    logging_steps: int = 25
    eval_steps: int | None = None           # held-out evaluation every N steps (None: every logged step); the last
                                            # logged step is always evaluated
    max_length: int = 1024
    heldout_fraction: float = 0.1
    heldout_max_pairs: int = 256
    max_train_pairs: int | None = None      # balance_groups: both groups of a split train on this many pairs
    gradient_checkpointing: bool = False
    checkpoint_steps: int | None = None     # also checkpoint every N steps (a signal always checkpoints)
    checkpoint_minutes: float | None = None # also checkpoint at the first logged step N minutes after the last one
    keep_checkpoints: bool = False          # keep <output_dir>/trainer/checkpoint-* after a finished run
    device: str = "auto"                    # "auto", "cpu" or "cuda"
    label: dict = dataclasses.field(default_factory=dict)  # cell / split / group, for humans

    PATH_FIELDS = ("pairs_path", "output_dir")

    @classmethod
    def from_json(cls, path: str | Path) -> "RunConfig":
        config = read_config(cls, path)
        problem = step_problem(config)
        if problem:
            raise ValueError(f"{path}: {problem}")
        return config

    def last_logged(self, step: int) -> bool:
        """Whether `step` is the run's last logged step (max_steps need not be a multiple of logging_steps)."""
        return step + self.logging_steps > self.max_steps

    def evaluates_at(self, step: int) -> bool:
        """Whether the held-out pairs are evaluated at logged step `step`."""
        return self.eval_steps is None or step % self.eval_steps == 0 or self.last_logged(step)


def step_problem(settings) -> str | None:
    """What is wrong with the step intervals of `settings` (a RunConfig or the DPO settings), or None. Checkpoints
    and held-out evaluations happen on logged steps only, so a resumed run logs and evaluates exactly as an
    uninterrupted one. A checkpoint interval of 0 or None: no periodic checkpoints."""
    logging_steps, checkpoint_steps, eval_steps = settings.logging_steps, settings.checkpoint_steps, settings.eval_steps
    minutes = settings.checkpoint_minutes
    if minutes is not None and not (math.isfinite(minutes) and minutes >= 0):
        return f"checkpoint_minutes {minutes:g} must be a finite number of minutes, not negative"
    if logging_steps < 1:
        return f"logging_steps {logging_steps} must be at least 1"
    if checkpoint_steps is not None and checkpoint_steps < 0:
        return f"checkpoint_steps {checkpoint_steps} must not be negative"
    if checkpoint_steps and checkpoint_steps % logging_steps:
        return f"checkpoint_steps {checkpoint_steps} must be a multiple of logging_steps {logging_steps}"
    if eval_steps is not None and (eval_steps < 1 or eval_steps % logging_steps):
        return f"eval_steps {eval_steps} must be a positive multiple of logging_steps {logging_steps}"
    return None


@dataclasses.dataclass
class ReferenceConfig:
    """The reference precompute's job: the base model's log-probs of every pair in `pairs_path`."""

    base_model: str
    pairs_path: str
    output_path: str
    max_length: int = 1024
    batch_size: int = 32                    # sequences a forward pass (one padding-free row)
    device: str = "auto"

    PATH_FIELDS = ("pairs_path", "output_path")

    @classmethod
    def from_json(cls, path: str | Path) -> "ReferenceConfig":
        return read_config(cls, path)


def read_config(cls, path: str | Path):
    """A config dataclass from JSON: unknown or missing keys are errors; relative paths are relative to the file."""
    raw = json.loads(Path(path).read_text())
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw]
    if missing:
        raise ValueError(f"{path}: {cls.__name__} lacks {missing}")
    config = cls(**raw)
    # Relative paths are relative to the config file: a run directory can move (to a cluster) whole.
    here = Path(path).resolve().parent
    for name in cls.PATH_FIELDS:
        setattr(config, name, str(here / getattr(config, name)))
    return config


def pair_hash(pair_id: str) -> int:
    return int.from_bytes(hashlib.sha256(str(pair_id).encode()).digest()[:8], "big")


def split_heldout(pairs: pd.DataFrame, fraction: float, max_pairs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out): held-out = pairs whose pair_id hash falls in the first `fraction`, at most max_pairs."""
    ordered = pairs.reset_index(drop=True)
    ordered = ordered.assign(_hash=ordered["pair_id"].map(pair_hash)).sort_values("_hash")
    in_heldout = ordered["_hash"] < fraction * 2**64
    heldout = ordered[in_heldout].head(max_pairs)
    train = ordered.drop(index=heldout.index)
    return train.drop(columns="_hash").reset_index(drop=True), heldout.drop(columns="_hash").reset_index(drop=True)
