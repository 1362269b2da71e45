"""What a run directory holds and the held-out rule: what both the asset and the trainer read.

Owns the names of the files a run writes, the columns its pairs file carries, the pairs' text digest
and the held-out split (a pair's pair_id hash decides it, so every seed of a group holds out the same
pairs). Imports neither torch nor Dagster.
"""

import hashlib
import json

import pandas as pd

from prism_assets import versions

RUN_CONFIG_FILE, CURVE_FILE, METRICS_FILE = "run.json", "curve.parquet", "metrics.json"
CHECKPOINTS_DIR = "trainer"  # checkpoint-<step>/ while a run trains
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
