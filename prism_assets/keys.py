"""Every asset's key, in one place: the assets all experiments share, and each experiment's `<experiment>/<name>`."""

import re

import dagster as dg

from prism_assets.training.settings import REFERENCE_FIELDS, TrainingSettings, fingerprint

RAW_PRISM = dg.AssetKey("raw_prism")
WITHIN_MODEL_PAIRS = dg.AssetKey("within_model_pairs")
CORRESPONDENCE_TABLE = dg.AssetKey("correspondence_table")
RESEARCH_REPORT = dg.AssetKey("research_report")
REFERENCE_PREFIX = "reference_logps"  # reference_logps/<model>_<hash>: one per base model and its settings


def ordered_logit_fit(experiment: str) -> dg.AssetKey:
    return dg.AssetKey([experiment, "ordered_logit_fit"])


def significant_splits(experiment: str) -> dg.AssetKey:
    return dg.AssetKey([experiment, "significant_splits"])


def group_dpo_run(experiment: str) -> dg.AssetKey:
    return dg.AssetKey([experiment, "group_dpo_run"])


def reference_logps(settings: TrainingSettings) -> dg.AssetKey:
    """`reference_logps/<model>_<hash>`: one per base model and the settings its log-probs depend on."""
    model = re.sub(r"[^A-Za-z0-9]+", "_", settings.base_model.rsplit("/", 1)[-1]).strip("_").lower()
    return dg.AssetKey([REFERENCE_PREFIX, f"{model}_{fingerprint(settings, REFERENCE_FIELDS)[:6]}"])
