"""What a table rests on: which runs count, why the others do not, and whether the grid they make is complete.

Owns reading the runs an experiment's `group_dpo_run` partitions hold into one table, leaving out — by reason — the
runs of a split that no longer exists, of another group of users, of other DPO settings (the run's own record, not
today's environment) or of other data, the baseline included; and the grid's completeness: every trained split and
random split with every seed the runs have (`calibration.Completeness`), with the cells and seeds missing. Imports no
Dagster.
"""

from dataclasses import dataclass, field

import pandas as pd

from prism_assets import cells, partitions
from prism_assets.statistics import calibration

# Every metric of a run a table or the write-up reads, beside the correspondence's own.
RUN_COLUMNS = ["cell", "split", "group", "seed", "run_id", "membership_digest", "settings_fingerprint", "data_digest"]


def runs_table(runs: dict, metrics: list[str]) -> pd.DataFrame:
    """One row per run (partition value): its cell, seed, identity, what it was made of, and these metrics."""
    rows = [
        {
            "cell": run["cell"],
            "split": run["split"],
            "group": run["group"],
            "seed": int(run["seed"]),
            "run_id": run["run_id"],
            "membership_digest": run["membership_digest"],
            "settings_fingerprint": run["settings_fingerprint"],
            "data_digest": run.get("data_digest"),
            **{m: run["metrics"].get(m) for m in metrics},
            "num_heldout_pairs": run["metrics"].get("num_heldout_pairs"),
            "num_heldout_users": run["metrics"].get("num_heldout_users"),
            "gpu_hours": (run.get("cost") or {}).get("gpu_hours"),  # None: the launcher recorded no cost
        }
        for run in runs.values()
    ]
    return pd.DataFrame(rows, columns=[*RUN_COLUMNS, *metrics, "num_heldout_pairs", "num_heldout_users", "gpu_hours"])


def current_runs(
    runs: pd.DataFrame, splits: dict, settings_fingerprint: str, data_digest: str
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """(the runs the table is made of, the others as reason → ["cell seed N", ...]). Left out: a run whose split
    `significant_splits` no longer has, one that trained on other users than the split's group now holds (a split
    name is reused by another preset, α or fit), one trained under other DPO settings than the code location's, and
    one trained on other pairs than today's (another data version), the baseline's too — each would be scored against
    a prediction, or averaged with runs, it was not made for."""
    if runs.empty:
        return runs, {}
    names = set(splits["splits"]["split"])
    expected = {(s, g): cells.membership_digest(splits, s, g) for s in names for g in partitions.GROUPS}
    reasons = pd.Series(None, index=runs.index, dtype="object")
    gone = runs["split"].notna() & ~runs["split"].isin(names)
    reasons[gone] = "split no longer in significant_splits"
    expected_digest = pd.Series([expected.get((s, g)) for s, g in zip(runs["split"], runs["group"])], index=runs.index)
    other_users = ~gone & runs["split"].notna() & (runs["membership_digest"] != expected_digest)
    reasons[other_users] = "trained on other users than the group now holds"
    other_data = reasons.isna() & (runs["data_digest"] != data_digest)
    reasons[other_data] = "trained on other data (another version of the pairs)"
    other_settings = reasons.isna() & (runs["settings_fingerprint"] != settings_fingerprint)
    reasons[other_settings] = "trained under other DPO settings"
    left_out = {
        reason: [f"{cell} seed {seed}" for cell, seed in zip(group["cell"], group["seed"])]
        for reason, group in runs[reasons.notna()].groupby(reasons[reasons.notna()], sort=True)
    }
    return runs[reasons.isna()].reset_index(drop=True), left_out


@dataclass
class Grid:
    """The grid the kept runs make: its completeness and what is missing from it."""

    completeness: calibration.Completeness
    seeds: list[int]
    missing: list[str] = field(default_factory=list)  # "cell seed N" for every expected run absent


def grid(runs: pd.DataFrame, splits: pd.DataFrame, random_expected: int) -> Grid:
    """Which trained splits (predicted, the null control, random) have both groups' runs at every seed the runs have;
    `random_expected`: the random splits the experiment asks for (its `random_splits`)."""
    seeds = sorted(runs["seed"].unique().tolist()) if len(runs) else []
    have = set(zip(runs["cell"], runs["seed"])) if len(runs) else set()
    trained = splits[splits["trained"]] if "trained" in splits else splits
    random = trained["random"] if "random" in trained else pd.Series(False, index=trained.index)
    missing = [f"baseline seed {s}" for s in seeds if (partitions.BASELINE, s) not in have]
    done = {}
    for split in trained["split"]:
        absent = [f"{split}.{g} seed {s}" for g in partitions.GROUPS for s in seeds if (f"{split}.{g}", s) not in have]
        missing += absent
        done[split] = bool(seeds) and not absent
    family = trained[~random]["split"]  # the predicted splits and the null control
    randoms = trained[random]["split"]
    completeness = calibration.Completeness(
        predicted_done=sum(done[s] for s in family),
        predicted_expected=len(family),
        random_done=sum(done[s] for s in randoms),
        random_expected=random_expected,
        seeds=len(seeds),
    )
    return Grid(completeness, seeds, missing)
