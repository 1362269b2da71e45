"""Data assets: `raw_prism` (the three PRISM tables) and `within_model_pairs`, with the pairs' checks.

Owns the metadata a researcher reads in the UI: the source (`resources.prism_source`), row counts, and every dropped
row counted by reason. The logic lives in `prism_assets.dataset`; these assets wire it.
"""

import sys

import dagster as dg
import pandas as pd

from prism_assets import versions
from prism_assets.dataset import loading, schema, synthetic
from prism_assets.dataset import pairs as pairs_lib
from resources import prism_source as source_module
from resources.prism_source import PrismSource


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    return frame.to_markdown(index=False, floatfmt=floatfmt)


@dg.asset(
    group_name="data",
    kinds={"parquet"},
    owners=versions.OWNERS,
    code_version=versions.source_version(sys.modules[__name__], source_module, loading, schema, synthetic),
    description="PRISM survey, conversations and utterances as typed tables (the embedded default is SYNTHETIC: "
    "generated in the real schema with planted effects). Metadata names the source and counts dropped rows.",
)
def raw_prism(context: dg.AssetExecutionContext, prism_source: PrismSource) -> dict:
    tables, source_metadata = prism_source.load()
    context.log.info(f"PRISM from {tables.source}: {len(tables.survey)} users, {len(tables.utterances)} utterances")
    for reason, count in tables.dropped.items():
        context.log.warning(f"dropped {count} rows: {reason}")
    context.add_output_metadata(
        {
            "source": tables.source,
            **source_metadata,
            "num_survey_rows": len(tables.survey),
            "num_conversations": len(tables.conversations),
            "num_utterances": len(tables.utterances),
            "dropped": dg.MetadataValue.json(tables.dropped),
            **{f"dropped_{reason}": count for reason, count in tables.dropped.items()},
        }
    )
    return {
        "survey": tables.survey,
        "conversations": tables.conversations,
        "utterances": tables.utterances,
        "source": tables.source,
        "dropped": tables.dropped,
    }


class PairsConfig(dg.Config):
    drop_empty_responses: bool = False  # PRISM's "EMPTY STRING" responses are real (bad) answers: kept by default


@dg.asset(
    group_name="data",
    kinds={"parquet"},
    owners=versions.OWNERS,
    code_version=versions.source_version(sys.modules[__name__], pairs_lib),
    description="Within-model preference pairs: two responses of one model to one later turn (turn ≥ 1), "
    "scored apart; chosen = higher score; prompt = the conversation up to that turn as chat messages.",
)
def within_model_pairs(context: dg.AssetExecutionContext, config: PairsConfig, raw_prism: dict) -> pd.DataFrame:
    result = pairs_lib.within_model_pairs(raw_prism["utterances"], raw_prism["conversations"])
    pairs, dropped = result.pairs, dict(result.dropped)
    if config.drop_empty_responses:
        empty = pairs["chosen"].map(pairs_lib.is_empty) | pairs["rejected"].map(pairs_lib.is_empty)
        dropped["empty_response"] = int(empty.sum())
        pairs = pairs[~empty].reset_index(drop=True)
    if pairs.empty:
        reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.items() if count) or "none"
        raise dg.Failure(
            f"no within-model pairs in {raw_prism['source']}: {len(raw_prism['utterances'])} utterances, every "
            f"later-turn interaction dropped ({reasons})",
            allow_retries=False,
        )
    gap = pairs["score_gap"]
    summary = pd.DataFrame(
        {
            "statistic": ["pairs", "users", "conversations", "mean gap", "median gap", "empty responses kept"],
            "value": [
                len(pairs),
                pairs["user_id"].nunique(),
                pairs["conversation_id"].nunique(),
                round(float(gap.mean()), 2),
                float(gap.median()),
                0 if config.drop_empty_responses else result.empty_responses,
            ],
        }
    )
    context.add_output_metadata(
        {
            "num_pairs": len(pairs),
            "num_users": int(pairs["user_id"].nunique()),
            "mean_score_gap": float(gap.mean()),
            "median_score_gap": float(gap.median()),
            "empty_responses": result.empty_responses,
            "dropped": dg.MetadataValue.json(dropped),
            **{f"dropped_{reason}": count for reason, count in dropped.items()},
            "source": raw_prism["source"],
            "summary": dg.MetadataValue.md(markdown_table(summary)),
        }
    )
    return pairs


def _check(passed: bool, failing: int, description: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=bool(passed), metadata={"failing_rows": failing}, description=description)


@dg.asset_check(
    asset=within_model_pairs, description="Every pair's chosen response scored higher than its rejected one."
)
def chosen_scored_higher(within_model_pairs: pd.DataFrame) -> dg.AssetCheckResult:
    failing = int((within_model_pairs["chosen_score"] <= within_model_pairs["rejected_score"]).sum())
    return _check(failing == 0, failing, "chosen_score > rejected_score")


@dg.asset_check(asset=within_model_pairs, description="Both responses of every pair come from the same model.")
def both_responses_from_one_model(within_model_pairs: pd.DataFrame) -> dg.AssetCheckResult:
    pairs = within_model_pairs
    failing = int(
        (
            (pairs["chosen_model_name"] != pairs["rejected_model_name"])
            | (pairs["chosen_model_name"] != pairs["model_name"])
        ).sum()
    )
    return _check(failing == 0, failing, "chosen_model_name == rejected_model_name == model_name")


@dg.asset_check(asset=within_model_pairs, description="No interaction appears in two pairs.")
def no_duplicated_interaction(within_model_pairs: pd.DataFrame) -> dg.AssetCheckResult:
    failing = int(within_model_pairs["pair_id"].duplicated().sum())
    return _check(failing == 0, failing, "pair_id (the interaction id) is unique")
