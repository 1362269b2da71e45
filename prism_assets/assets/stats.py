"""Statistics assets of each experiment: `<experiment>/ordered_logit_fit` and `<experiment>/significant_splits`.

Owns turning an experiment's statistics fields (boundaries, covariates, α, preset; `prism_assets.experiments`) into
its fit and splits, and the metadata shown in the UI: the coefficient table and bin boundaries, and the splits with
their rule, predicted direction and group sizes in users and pairs.
"""

import hashlib
import json
import sys

import dagster as dg
import pandas as pd

from prism_assets import keys, partitions, plots, versions
from prism_assets.assets.data import markdown_table
from prism_assets.experiments import FIT_FIELDS, SPLIT_FIELDS, Experiment, ExperimentSpec
from prism_assets.statistics import ordered_logit
from prism_assets.statistics import splits as splits_lib

FIT_CODE_VERSION = versions.source_version(sys.modules[__name__], plots, ordered_logit)
SPLITS_CODE_VERSION = versions.source_version(sys.modules[__name__], plots, splits_lib, partitions)


def build_statistics(experiment: Experiment) -> list[dg.AssetsDefinition]:
    """`<experiment>/ordered_logit_fit` and `<experiment>/significant_splits`, their code versions hashing the
    experiment's statistics fields: a change marks only this experiment's assets unsynced."""
    name, spec = experiment.name, experiment.spec
    fit_fields, split_fields = (
        hashlib.sha256(json.dumps(spec.fields(names), sort_keys=True).encode()).hexdigest()[:12]
        for names in (FIT_FIELDS, SPLIT_FIELDS)
    )
    bins = "quartile bin (Y ∈ 1..4)" if spec.boundaries == "quartiles" else f"bin at gaps {spec.boundaries}"

    @dg.asset(
        key=keys.ordered_logit_fit(name),
        group_name=name,
        kinds={"statsmodels"},
        owners=versions.OWNERS,
        tags={"experiment": name},
        code_version=f"{FIT_CODE_VERSION}-{fit_fields}",
        description=f"{experiment.description}. Ordered logit of the score gap's {bins} on user covariates; "
        "statsmodels OrderedModel(logit), standard errors clustered by user. Metadata: coefficient table and "
        "plot with 95% CIs, score-gap histogram with the bin boundaries.",
    )
    def ordered_logit_fit(
        context: dg.AssetExecutionContext, raw_prism: dict, within_model_pairs: pd.DataFrame
    ) -> dict:
        covariates = ordered_logit.CovariateSpec(tuple(spec.categorical), tuple(spec.continuous), spec.min_level_users)
        pairs = discovery_part(within_model_pairs, spec, True)
        if spec.discovery_share:
            context.log.info(f"honest mode: the fit uses the discovery users' {len(pairs)} pairs")
        fit = ordered_logit.cluster_robust_ordered_logit(
            pairs, raw_prism["survey"], covariates, boundaries=spec.boundaries
        )
        return _fit_output(context, fit, pairs, raw_prism["source"])

    @dg.asset(
        key=keys.significant_splits(name),
        group_name=name,
        kinds={"pandas"},
        owners=versions.OWNERS,
        tags={"experiment": name},
        code_version=f"{SPLITS_CODE_VERSION}-{split_fields}",
        ins={"ordered_logit_fit": dg.AssetIn(key=keys.ordered_logit_fit(name))},
        description=f"{experiment.description}. Two-group user splits (preset {spec.preset}, α = {spec.alpha}), "
        f"each with its predicted direction, the Europe-vs-Americas null control and {spec.random_splits} random "
        "splits (the calibrated null); registers the experiment's DPO cells (splits too small to learn from are "
        "listed, not trained).",
    )
    def significant_splits(
        context: dg.AssetExecutionContext, raw_prism: dict, within_model_pairs: pd.DataFrame, ordered_logit_fit: dict
    ) -> dict:
        return _splits_output(context, experiment, raw_prism, within_model_pairs, ordered_logit_fit)

    return [ordered_logit_fit, significant_splits]


def discovery_part(pairs: pd.DataFrame, spec: ExperimentSpec, discovery: bool) -> pd.DataFrame:
    """Honest mode (`discovery_share`): the discovery users' pairs (the fit's) or the confirmation users' (the DPO
    runs'); without it, every pair for both."""
    if spec.discovery_share is None:
        return pairs
    chosen = splits_lib.discovery_users(pairs["user_id"], spec.discovery_share)
    return pairs[chosen if discovery else ~chosen].reset_index(drop=True)


def _fit_output(
    context: dg.AssetExecutionContext, fit: ordered_logit.OrderedLogitResult, pairs: pd.DataFrame, source: str
) -> dict:
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
                    plots.score_gap_histogram(pairs["score_gap"], fit.boundaries), "score-gap histogram"
                )
            ),
            "boundaries": dg.MetadataValue.json(fit.boundaries),
            "thresholds": dg.MetadataValue.json(fit.thresholds),
            "reference_levels": dg.MetadataValue.json(fit.reference_levels),
            "outcome_counts": dg.MetadataValue.json({str(k): v for k, v in fit.outcome_counts.items()}),
            "num_pairs": fit.num_pairs,
            "num_users": fit.num_users,
            "converged": fit.converged,
            "dropped": dg.MetadataValue.json(fit.dropped),
            "excluded_from_fit": dg.MetadataValue.json(fit.excluded),
            "significant_terms_at_0.05": int((fit.coefficients["p"] < 0.05).sum()),
            "source": source,
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
                "random": split.random,
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


def too_small(table: pd.DataFrame, spec: ExperimentSpec) -> pd.Series:
    """Splits with a group below the experiment's smallest group (users or pairs)."""
    users = table[["users_a", "users_b"]].min(axis=1)
    pairs = table[["pairs_a", "pairs_b"]].min(axis=1)
    return (users < spec.min_group_users) | (pairs < spec.min_group_pairs)


def register_cells(instance: dg.DagsterInstance, experiment: str, split_names: list[str]) -> list[str]:
    """Make the experiment's `cell` partitions exactly baseline + <split>.A/B of these splits (stale ones removed)."""
    name = partitions.cells_name(experiment)
    cells = partitions.cells_for_splits(split_names)
    existing = set(instance.get_dynamic_partitions(name))
    for stale in sorted(existing - set(cells)):
        instance.delete_dynamic_partition(name, stale)
    instance.add_dynamic_partitions(name, [c for c in cells if c not in existing])
    return cells


def memberships_for(
    spec: ExperimentSpec, fit: dict, survey: pd.DataFrame, pairs: pd.DataFrame
) -> list[splits_lib.SplitMembership]:
    """The experiment's splits: its preset's, or (auto) one per covariate significant at its α."""
    coefficients, analysed_users = fit["coefficients"], set(pairs["user_id"])
    if spec.preset == "v3":
        return splits_lib.v3_splits(coefficients, survey, analysed_users)
    fitted_levels = {
        variable: [fit["reference_levels"][variable], *coefficients.loc[coefficients["variable"] == variable, "level"]]
        for variable in fit["reference_levels"]
    }
    if spec.preset == "v2":
        return splits_lib.v2_splits(coefficients, survey, analysed_users, pairs, fitted_levels)
    return splits_lib.splits_from_fit(coefficients, survey, analysed_users, fitted_levels, spec.alpha)


def _splits_output(
    context: dg.AssetExecutionContext,
    experiment: Experiment,
    raw_prism: dict,
    within_model_pairs: pd.DataFrame,
    ordered_logit_fit: dict,
) -> dict:
    spec = experiment.spec
    # honest mode: splits (and so the DPO runs) of the confirmation users only, none of whose pairs chose a direction
    within_model_pairs = discovery_part(within_model_pairs, spec, False)
    memberships = memberships_for(spec, ordered_logit_fit, raw_prism["survey"], within_model_pairs)
    memberships = [
        splits_lib.SplitMembership(m.split, m.users[m.users["user_id"].isin(set(within_model_pairs["user_id"]))])
        for m in memberships
    ]
    memberships += splits_lib.random_splits(set(within_model_pairs["user_id"]), spec.random_splits)
    table, membership = split_tables(memberships, within_model_pairs)
    empty = (table["pairs_a"] == 0) | (table["pairs_b"] == 0)
    if (empty & table["null_control"]).any():
        raise ValueError("the null control (Europe vs Americas) has a group without pairs: no noise yardstick")
    dropped_splits = list(table.loc[empty, "split"])
    for name in dropped_splits:
        context.log.warning(f"split {name} dropped: one of its groups has no pairs")
    table = table[~empty].reset_index(drop=True)
    membership = membership[membership["split"].isin(table["split"])].reset_index(drop=True)
    table["trained"] = ~too_small(table, spec) | spec.train_small_splits | table["null_control"]
    for row in table[~table["trained"]].itertuples():
        context.log.warning(
            f"split {row.split} is not trained: a group is below the smallest a split may have "
            f"(users {row.users_a}/{row.users_b}, pairs {row.pairs_a}/{row.pairs_b}; min_group_users "
            f"{spec.min_group_users}, min_group_pairs {spec.min_group_pairs}; train_small_splits trains it)"
        )
    cells = register_cells(context.instance, experiment.name, list(table.loc[table["trained"], "split"]))
    context.log.info(f"DPO cells of {experiment.name}: {', '.join(cells)}")
    context.add_output_metadata(
        {
            "splits": dg.MetadataValue.md(markdown_table(table.drop(columns=["rule"]), ".3g")),
            "dpo_cells": dg.MetadataValue.json(cells),
            "num_splits": len(table),
            "dropped_splits_with_an_empty_group": dg.MetadataValue.json(dropped_splits),
            "split_names": dg.MetadataValue.json(list(table["split"])),
            "not_trained_too_small": dg.MetadataValue.json(list(table.loc[~table["trained"], "split"])),
            "random_splits": spec.random_splits,
            "experiment": experiment.name,
            "preset": spec.preset,
            "alpha": spec.alpha,
            "source": raw_prism["source"],
        }
    )
    # the users DPO trains and is evaluated on: the confirmation users in honest mode, everyone otherwise (None)
    dpo_users = sorted(within_model_pairs["user_id"].unique()) if spec.discovery_share else None
    return {
        "splits": table,
        "membership": membership,
        "preset": spec.preset,
        "alpha": spec.alpha,
        "dpo_users": dpo_users,
    }
