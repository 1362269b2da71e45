"""What one DPO partition trains on and evaluates: a cell's users and pairs, their reference log-probs, its config.

A cell is the baseline (every pair) or one group of a split (`partitions.parse_cell`). Owns reading a group's users
from `significant_splits`, the digest of those users a run records (so a table can tell a run of today's group from
one of a split of the same name made otherwise), the pairs a run reads (its own, and the other users' held-out pairs
of its seed), the balanced training size, joining the pairs with their `reference_logps`, and the trainer's config.
Imports no Dagster: a problem is a `CellError`, which the asset turns into a failure that is not retried.
"""

import hashlib

import numpy as np
import pandas as pd
from pydantic import ValidationError

from prism_assets import partitions
from prism_assets.training.run_folder import (
    OWN_COLUMN,
    PAIRS_FILE,
    REFERENCE_COLUMNS,
    TEXT_DIGEST_COLUMN,
    TOKEN_COLUMNS,
    heldout_users,
    pair_hash,
    text_digests,
)
from prism_assets.training.settings import RunConfig, TrainingSettings, validation_problems

REFERENCE_DIGEST = "reference_text_digest"  # the digest of the text the reference log-probs were computed from


class CellError(ValueError):
    """A cell cannot be trained as asked (a split gone, stale reference log-probs, settings the schema refuses)."""


def group_users(splits: dict, split: str, group: str) -> pd.Series:
    """The user ids of one group of a split in significant_splits."""
    membership = splits["membership"]
    if split not in set(membership["split"]):
        raise CellError(
            f"split {split!r} is not in significant_splits (have {sorted(set(membership['split']))}); "
            "rematerialize significant_splits or drop the stale partition"
        )
    return membership[(membership["split"] == split) & (membership["group"] == group)]["user_id"]


def group_pairs(pairs: pd.DataFrame, splits: dict, split: str | None, group: str | None) -> pd.DataFrame:
    """The pairs of one cell: all pairs for the baseline, else the pairs of the group's users."""
    if split is None:
        return pairs
    assert group is not None  # parse_cell gives a group with every split
    return pairs[pairs["user_id"].isin(set(group_users(splits, split, group)))]


def membership_digest(splits: dict, split: str | None, group: str | None) -> str | None:
    """A hash of the users a cell trains on (None for the baseline, which trains on all pairs)."""
    if split is None:
        return None
    assert group is not None  # parse_cell gives a group with every split
    users = sorted(group_users(splits, split, group).astype(str))
    return hashlib.sha256("\n".join(users).encode()).hexdigest()[:16]


def run_pairs(
    pairs: pd.DataFrame, splits: dict, split: str | None, group: str | None, settings: TrainingSettings, seed: int
) -> pd.DataFrame:
    """The pairs a run reads: its cell's (`own`: what it trains on, but for its seed's held-out users) and, of the
    other users held out in the seed's fold (`heldout_users`), those of `heldout_cross_share` (`cross_users`), which
    it evaluates and never trains on — so that each group's models are also read on the other group's held-out pairs.
    The baseline's own pairs are every pair: it is read on every held-out user."""
    if splits.get("dpo_users") is not None:  # honest mode: the confirmation users only, baseline and held-out included
        pairs = pairs[pairs["user_id"].isin(set(splits["dpo_users"]))]
    own = pairs.index.isin(group_pairs(pairs, splits, split, group).index)
    fold = heldout_users(pairs["user_id"], settings.heldout_share, seed).to_numpy()
    evaluated_only = ~own & fold & cross_users(pairs["user_id"], settings.heldout_cross_share).to_numpy()
    return pairs[own | evaluated_only].assign(**{OWN_COLUMN: own[own | evaluated_only]})


def cross_users(user_ids: pd.Series, share: float) -> pd.Series:
    """Whether each user is among the `share` of users whose held-out pairs the other groups' runs also evaluate (by a
    hash of the id, independent of the folds: the same users in every split and seed)."""
    position = ("cross:" + user_ids.astype(str)).map(pair_hash).astype("float64") / 2.0**64
    return position < share


def balanced_train_pairs(pairs: pd.DataFrame, splits: dict, split: str, settings: TrainingSettings, seed: int) -> int:
    """Training pairs of the split's smaller group in this seed (its held-out users set aside)."""
    sizes = []
    for group in partitions.GROUPS:
        mine = group_pairs(pairs, splits, split, group)
        sizes.append(int((~heldout_users(mine["user_id"], settings.heldout_share, seed)).sum()))
    return min(sizes)


def with_references(pairs: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """The pairs with their base-model log-probs and token ids. A stale reference_logps is an error: a pair without
    log-probs, or one whose text is not what they were computed from (pair ids alone cannot tell: another PRISM
    release or synthetic configuration reuses them for other text)."""
    computed_from = references[["pair_id", *REFERENCE_COLUMNS, *TOKEN_COLUMNS, TEXT_DIGEST_COLUMN]].rename(
        columns={TEXT_DIGEST_COLUMN: REFERENCE_DIGEST}
    )
    merged = pairs.merge(computed_from, on="pair_id", how="left", validate="one_to_one")
    missing = int(merged[REFERENCE_COLUMNS[0]].isna().sum())
    if missing:
        raise CellError(f"{missing} of {len(pairs)} pairs have no reference log-probs: rematerialize reference_logps")
    changed = merged[REFERENCE_DIGEST].to_numpy() != np.asarray(text_digests(pairs), dtype=object)
    if changed.any():
        raise CellError(
            f"{int(changed.sum())} of {len(pairs)} pairs (first: {merged['pair_id'][changed].iloc[0]!r}) have other "
            "text than reference_logps computed its log-probs from: rematerialize reference_logps"
        )
    return merged.drop(columns=REFERENCE_DIGEST)


def run_config(
    settings: TrainingSettings,
    base_model: str,
    cell: str,
    seed: int,
    max_train_pairs: int | None,
    experiment: str,
    code_version: str | None,
) -> RunConfig:
    """The trainer's config of one partition: every field of the schema as the settings have it (the base model
    resolved to a path), the run's pairs file and seed."""
    split, group = partitions.parse_cell(cell)
    try:
        return RunConfig(
            **{**settings.training_values(), "base_model": base_model},
            pairs_path=PAIRS_FILE,
            output_dir=".",
            seed=seed,
            max_train_pairs=max_train_pairs,
            label={"experiment": experiment, "cell": cell, "split": split, "group": group, "seed": seed},
            code_version=code_version,
        )
    except ValidationError as error:  # settings the schema refuses: a retry would repeat it
        raise CellError(f"DPO settings: {validation_problems(error)}") from None
