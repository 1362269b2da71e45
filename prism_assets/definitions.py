"""The Dagster code location: every asset, check and resource, wired from the environment.

The only module that reads environment variables. One switch per concern:
- PRISM_SOURCE: "synthetic" (default), "hf" (HannahRoseKirk/prism-alignment on the Hub), or a
  directory holding PRISM's survey/conversations/utterances jsonl files;
- PRISM_SYNTHETIC_USERS / PRISM_SYNTHETIC_SEED: size and seed of the synthetic PRISM;
- PRISM_STORAGE: where asset outputs live (default storage/, beside DAGSTER_HOME's instance files).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from prism_assets import data, stats
from resources.io_managers import ParquetIOManager

STORAGE = Path(os.environ.get("PRISM_STORAGE", "storage")).resolve()

ASSETS = [data.raw_prism, data.within_model_pairs, stats.ordered_logit_fit, stats.significant_splits]
CHECKS = [data.chosen_scored_higher, data.both_responses_from_one_model, data.no_duplicated_interaction]

RESOURCES = {
    "prism_source": data.PrismSource(
        source=os.environ.get("PRISM_SOURCE", data.SYNTHETIC),
        synthetic_users=int(os.environ.get("PRISM_SYNTHETIC_USERS", "1500")),
        synthetic_seed=int(os.environ.get("PRISM_SYNTHETIC_SEED", "0")),
        synthetic_dir=str(STORAGE / "synthetic_prism"),
    ),
    "io_manager": ParquetIOManager(base_dir=str(STORAGE / "assets")),
}

defs = dg.Definitions(assets=ASSETS, asset_checks=CHECKS, resources=RESOURCES)
