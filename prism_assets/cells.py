"""What one DPO partition trains on: a cell's users and pairs, the pairs' reference log-probs, and its run config.

A cell is the baseline (every pair) or one group of a split (`partitions.parse_cell`). Owns reading a group's users
from `significant_splits`, the digest of those users a run records (so a table can tell a run of today's group from
one of a split of the same name made otherwise), the balanced training size, joining the pairs with their
`reference_logps`, and the trainer's config of a partition. Imports no Dagster: a problem is a `CellError`, which the
asset turns into a failure that is not retried.
"""

import hashlib

import numpy as np
import pandas as pd
from pydantic import ValidationError

from prism_assets import partitions
from prism_assets.training.run_folder import (
    PAIRS_FILE,
    REFERENCE_COLUMNS,
    TEXT_DIGEST_COLUMN,
    TOKEN_COLUMNS,
    pair_text_digests,
    split_heldout,
)
from prism_assets.training.settings import RunConfig, TrainingSettings, validation_problems


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


def balanced_train_pairs(pairs: pd.DataFrame, splits: dict, split: str, settings: TrainingSettings) -> int:
    """Training pairs of the split's smaller group (after its held-out pairs are set aside)."""
    sizes = []
    for group in partitions.GROUPS:
        train, _ = split_heldout(
            group_pairs(pairs, splits, split, group), settings.heldout_fraction, settings.heldout_max_pairs
        )
        sizes.append(len(train))
    return min(sizes)


def with_references(pairs: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """The pairs with their base-model log-probs and token ids. A stale reference_logps is an error: a pair without
    log-probs, or one whose text is not what they were computed from (pair ids alone cannot tell: another PRISM
    release or synthetic configuration reuses them for other text)."""
    carried = [*REFERENCE_COLUMNS, *TOKEN_COLUMNS, TEXT_DIGEST_COLUMN]
    merged = pairs.merge(references[["pair_id", *carried]], on="pair_id", how="left", validate="one_to_one")
    missing = int(merged[REFERENCE_COLUMNS[0]].isna().sum())
    if missing:
        raise CellError(f"{missing} of {len(pairs)} pairs have no reference log-probs: rematerialize reference_logps")
    changed = merged[TEXT_DIGEST_COLUMN].to_numpy() != np.asarray(pair_text_digests(pairs), dtype=object)
    if changed.any():
        raise CellError(
            f"{int(changed.sum())} of {len(pairs)} pairs (first: {merged['pair_id'][changed].iloc[0]!r}) have other "
            "text than reference_logps computed its log-probs from: rematerialize reference_logps"
        )
    return merged.drop(columns=TEXT_DIGEST_COLUMN)


def run_config(
    settings: TrainingSettings,
    base_model: str,
    cell: str,
    seed: int,
    max_train_pairs: int | None,
    experiment: str,
    code_version: str,
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
