"""Statistics assets: `ordered_logit_fit` (score gap on user covariates) and `significant_splits`.

Owns the configuration a researcher changes here — the covariate set, α, the split preset — and
the metadata shown in the UI: the coefficient table and quartile boundaries, and the splits with
their rule, predicted direction and group sizes in users and pairs.
"""

import sys

import dagster as dg
import pandas as pd
from pydantic import Field

from prism_assets import partitions, plots, versions
from prism_assets.assets.data import markdown_table
from prism_assets.statistics import ordered_logit
from prism_assets.statistics import splits as splits_lib


class OrderedLogitConfig(dg.Config):
    categorical: list[str] = list(ordered_logit.DEFAULT_CATEGORICAL)
    continuous: list[str] = list(ordered_logit.DEFAULT_CONTINUOUS)
    min_level_users: int = Field(10, ge=1)


@dg.asset(
    group_name="statistics",
    kinds={"statsmodels"},
    owners=versions.OWNERS,
    code_version=versions.source_version(sys.modules[__name__], plots, ordered_logit),
    description="Ordered logit of the score gap's quartile bin (Y ∈ 1..4) on user covariates; statsmodels "
    "OrderedModel(logit), standard errors clustered by user. Metadata: coefficient table and plot with 95% CIs, "
    "score-gap histogram with the quartile boundaries.",
)
def ordered_logit_fit(
    context: dg.AssetExecutionContext, config: OrderedLogitConfig, raw_prism: dict, within_model_pairs: pd.DataFrame
) -> dict:
    spec = ordered_logit.CovariateSpec(tuple(config.categorical), tuple(config.continuous), config.min_level_users)
    fit = ordered_logit.cluster_robust_ordered_logit(within_model_pairs, raw_prism["survey"], spec)
    if not fit.converged:
        context.log.warning("the ordered logit did not converge; read its coefficients with care")
    for covariate, reason in fit.excluded.items():
        context.log.warning(f"{covariate} left out of the fit: {reason}")
    table = fit.coefficients[["term", "beta", "se", "z", "p", "ci_low", "ci_high"]]
    context.add_output_metadata(
        {
            "coefficients": dg.MetadataValue.md(markdown_table(table, ".4g")),
            "coefficient_plot": dg.MetadataValue.md(
                plots.markdown_image(plots.coefficient_plot(table), "coefficients")
            ),
            "score_gap_histogram": dg.MetadataValue.md(
                plots.markdown_image(
                    plots.score_gap_histogram(within_model_pairs["score_gap"], fit.boundaries), "score-gap histogram"
                )
            ),
            "quartile_boundaries": dg.MetadataValue.json(fit.boundaries),
            "thresholds": dg.MetadataValue.json(fit.thresholds),
            "reference_levels": dg.MetadataValue.json(fit.reference_levels),
            "outcome_counts": dg.MetadataValue.json({str(k): v for k, v in fit.outcome_counts.items()}),
            "num_pairs": fit.num_pairs,
            "num_users": fit.num_users,
            "converged": fit.converged,
            "dropped": dg.MetadataValue.json(fit.dropped),
            "excluded_from_fit": dg.MetadataValue.json(fit.excluded),
            "significant_terms_at_0.05": int((fit.coefficients["p"] < 0.05).sum()),
            "source": raw_prism["source"],
        }
    )
    return {
        "coefficients": fit.coefficients,
        "thresholds": fit.thresholds,
        "boundaries": fit.boundaries,
        "reference_levels": fit.reference_levels,
        "num_pairs": fit.num_pairs,
        "num_users": fit.num_users,
        "converged": fit.converged,
        "dropped": fit.dropped,
        "excluded": fit.excluded,
    }


class SplitsConfig(dg.Config):
    alpha: float = Field(0.05, gt=0, lt=1)
    preset: str = "auto"  # "auto": one split per significant covariate; "v3": the original experiment's eight


def split_tables(
    memberships: list[splits_lib.SplitMembership], pairs: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per split with group sizes in users and pairs, long membership table split/user_id/group)."""
    pairs_per_user = pairs.groupby("user_id").size()
    rows, members = [], []
    for membership in memberships:
        users = membership.users
        n_pairs = users["user_id"].map(pairs_per_user).fillna(0).groupby(users["group"]).sum()
        n_users = users[users["user_id"].isin(pairs_per_user.index)].groupby("group").size()
        split = membership.split
        rows.append(
            {
                "split": split.name,
                "variable": split.variable,
                "rule": split.rule,
                "group_a": split.group_a,
                "group_b": split.group_b,
                "predicted": split.predicted,
                "null_control": split.null_control,
                "beta": split.beta,
                "p": split.p,
                "users_a": int(n_users.get("A", 0)),
                "users_b": int(n_users.get("B", 0)),
                "pairs_a": int(n_pairs.get("A", 0)),
                "pairs_b": int(n_pairs.get("B", 0)),
            }
        )
        members.append(users.assign(split=split.name)[["split", "user_id", "group"]])
    return pd.DataFrame(rows), pd.concat(members, ignore_index=True)


def register_cells(instance: dg.DagsterInstance, split_names: list[str]) -> list[str]:
    """Make the `cell` partitions exactly baseline + <split>.A/B of these splits (stale cells are removed)."""
    cells = partitions.cells_for_splits(split_names)
    existing = set(instance.get_dynamic_partitions(partitions.CELL))
    for stale in sorted(existing - set(cells)):
        instance.delete_dynamic_partition(partitions.CELL, stale)
    instance.add_dynamic_partitions(partitions.CELL, [c for c in cells if c not in existing])
    return cells


@dg.asset(
    group_name="statistics",
    kinds={"pandas"},
    owners=versions.OWNERS,
    code_version=versions.source_version(sys.modules[__name__], plots, splits_lib, partitions),
    description="Two-group user splits: one per covariate significant in the ordered logit (or the v3 preset's "
    "eight), each with its predicted direction, plus the Europe-vs-Americas null control.",
)
def significant_splits(
    context: dg.AssetExecutionContext,
    config: SplitsConfig,
    raw_prism: dict,
    within_model_pairs: pd.DataFrame,
    ordered_logit_fit: dict,
) -> dict:
    if config.preset not in splits_lib.PRESETS:
        raise ValueError(f"unknown split preset {config.preset!r}; expected one of {splits_lib.PRESETS}")
    coefficients = ordered_logit_fit["coefficients"]
    analysed_users = set(within_model_pairs["user_id"])
    survey = raw_prism["survey"]
    if config.preset == "v3":
        memberships = splits_lib.v3_splits(coefficients, survey, analysed_users)
    else:
        fitted_levels = {
            variable: [
                ordered_logit_fit["reference_levels"][variable],
                *coefficients.loc[coefficients["variable"] == variable, "level"],
            ]
            for variable in ordered_logit_fit["reference_levels"]
        }
        memberships = splits_lib.splits_from_fit(coefficients, survey, analysed_users, fitted_levels, config.alpha)
    table, membership = split_tables(memberships, within_model_pairs)
    empty = (table["pairs_a"] == 0) | (table["pairs_b"] == 0)
    if (empty & table["null_control"]).any():
        raise ValueError("the null control (Europe vs Americas) has a group without pairs: no noise yardstick")
    dropped_splits = list(table.loc[empty, "split"])
    for name in dropped_splits:
        context.log.warning(f"split {name} dropped: one of its groups has no pairs")
    table = table[~empty].reset_index(drop=True)
    membership = membership[membership["split"].isin(table["split"])].reset_index(drop=True)
    cells = register_cells(context.instance, list(table["split"]))
    context.log.info(f"DPO cells: {', '.join(cells)}")
    context.add_output_metadata(
        {
            "splits": dg.MetadataValue.md(markdown_table(table.drop(columns=["rule"]), ".3g")),
            "dpo_cells": dg.MetadataValue.json(cells),
            "num_splits": len(table),
            "dropped_splits_with_an_empty_group": dg.MetadataValue.json(dropped_splits),
            "split_names": dg.MetadataValue.json(list(table["split"])),
            "preset": config.preset,
            "alpha": config.alpha,
            "source": raw_prism["source"],
        }
    )
    return {"splits": table, "membership": membership, "preset": config.preset, "alpha": config.alpha}
