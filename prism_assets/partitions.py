"""Partition definitions of the DPO runs and the one parser of their keys.

Each experiment's `<experiment>/group_dpo_run` is partitioned by two dynamic dimensions: `cell` (`baseline`, or
`<split>.<group>` such as `S1_age.A`; the experiment's own set, `<experiment>_cell`) and `seed` (`0`, `1`, …; one set
shared by every experiment). Dagster accepts any string as a dynamic key, so every key is validated here before it is
registered or used: splits match `[A-Za-z0-9_-]+`, groups are A or B, seeds are non-negative integers. Imports nothing
from the project.
"""

import re

import dagster as dg

CELL, SEED = "cell", "seed"
BASELINE = "baseline"
GROUPS = ("A", "B")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
SEED_KEY = re.compile(r"0|[1-9][0-9]{0,9}")  # one spelling per seed: 1, never 01
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds

seed_partitions = dg.DynamicPartitionsDefinition(name=SEED)


def cells_name(experiment: str) -> str:
    """The name of an experiment's dynamic `cell` partitions."""
    return f"{experiment}_{CELL}"


def dpo_partitions(experiment: str) -> dg.MultiPartitionsDefinition:
    cells = dg.DynamicPartitionsDefinition(name=cells_name(experiment))
    return dg.MultiPartitionsDefinition({CELL: cells, SEED: seed_partitions})


def partition_key(cell: str, seed: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({CELL: cell, SEED: seed})


def validate_split_name(split: str) -> str:
    if not SPLIT_NAME.fullmatch(split) or split == BASELINE:
        raise ValueError(f"invalid split name {split!r}: expected [A-Za-z0-9_-]+ and not {BASELINE!r}")
    return split


def cell_key(split: str, group: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"invalid group {group!r} of split {split!r}: expected one of {GROUPS}")
    return f"{validate_split_name(split)}.{group}"


def parse_cell(cell: str) -> tuple[str | None, str | None]:
    """(split, group) of a cell key; (None, None) for the baseline run on all pairs."""
    if cell == BASELINE:
        return None, None
    split, dot, group = cell.rpartition(".")
    if not dot:
        raise ValueError(f"invalid cell key {cell!r}: expected {BASELINE!r} or '<split>.<A|B>'")
    cell_key(split, group)
    return split, group


def seed_key(seed: int | str) -> str:
    text = str(seed)
    if not SEED_KEY.fullmatch(text) or int(text) > MAX_SEED:
        raise ValueError(f"invalid seed {seed!r}: expected an integer from 0 to {MAX_SEED} without leading zeros")
    return text


def cells_for_splits(splits: list[str]) -> list[str]:
    return [BASELINE, *(cell_key(split, group) for split in splits for group in GROUPS)]
