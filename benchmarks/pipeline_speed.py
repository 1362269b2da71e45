"""Seconds per stage of raw_prism → significant_splits on the full-size synthetic PRISM (1,500 users).

Runs the stages' own functions in order and then the same four assets through Dagster (in-process,
temporary instance), and prints each stage's seconds. As a baseline in the same process it fits the
same ordered logit with statsmodels' stock OrderedModel (numerical derivatives) and prints the ratio.
Usage: python benchmarks/pipeline_speed.py [--users 1500] [--no-baseline]
"""

import argparse
import tempfile
import time
from pathlib import Path

import dagster as dg
import pandas as pd
from statsmodels.miscmodels.ordinal_model import OrderedModel

from prism_assets.assets import data, stats
from prism_assets.dataset import loading, pairs, synthetic
from prism_assets.experiments import ExperimentSpec, resolve
from prism_assets.statistics import ordered_logit, splits
from resources.io_managers import ParquetIOManager
from resources.prism_source import PrismSource

AUTO = resolve("auto", ExperimentSpec(preset="auto"), {}, "tiny", "benchmark")


def timed(label, fn, timings):
    started = time.perf_counter()
    value = fn()
    timings[label] = time.perf_counter() - started
    print(f"{label:<34} {timings[label]:7.2f} s", flush=True)
    return value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg = synthetic.SyntheticConfig(num_users=args.users)
        timed("generate synthetic PRISM", lambda: synthetic.write_synthetic_prism(tmp / "prism", cfg), timings)
        tables = timed("load jsonl → tables", lambda: loading.load_prism_directory(tmp / "prism"), timings)
        result = timed(
            "within_model_pairs", lambda: pairs.within_model_pairs(tables.utterances, tables.conversations), timings
        )
        fit = timed(
            "ordered logit (analytic score)",
            lambda: ordered_logit.cluster_robust_ordered_logit(result.pairs, tables.survey),
            timings,
        )
        users = set(result.pairs["user_id"])
        levels = {
            v: [r, *fit.coefficients.loc[fit.coefficients["variable"] == v, "level"]]
            for v, r in fit.reference_levels.items()
        }
        timed(
            "significant_splits",
            lambda: splits.splits_from_fit(fit.coefficients, tables.survey, users, levels, 0.05),
            timings,
        )
        stage_total = sum(timings.values())
        print(f"{'stages total':<34} {stage_total:7.2f} s   (target ≤ 15 s)")
        print(f"pairs: {len(result.pairs)}, users: {result.pairs['user_id'].nunique()}, boundaries: {fit.boundaries}")

        resources = {
            "prism_source": PrismSource(synthetic_users=args.users, synthetic_dir=str(tmp / "dagster_prism")),
            "io_manager": ParquetIOManager(base_dir=str(tmp / "assets")),
        }
        with dg.instance_for_test() as instance:
            timed(
                "all four assets through Dagster",
                lambda: dg.materialize(
                    [data.raw_prism, data.within_model_pairs, *stats.build_statistics(AUTO)],
                    instance=instance,
                    resources=resources,
                ),
                timings,
            )

        if not args.no_baseline:
            kept, X, _, _, _ = ordered_logit.design_matrix(result.pairs, tables.survey, ordered_logit.CovariateSpec())
            y = ordered_logit.gap_outcome(kept["score_gap"], ordered_logit.quartile_boundaries(kept["score_gap"]))
            X = X / X.abs().max().clip(lower=1)
            groups = pd.factorize(kept["user_id"])[0]
            timed(
                "baseline: stock OrderedModel",
                lambda: OrderedModel(y, X, distr="logit").fit(
                    method="bfgs", cov_type="cluster", cov_kwds={"groups": groups}, disp=False, maxiter=2000
                ),
                timings,
            )
            ratio = timings["baseline: stock OrderedModel"] / timings["ordered logit (analytic score)"]
            print(f"ordered logit speed-up over stock statsmodels: {ratio:.1f}x")


if __name__ == "__main__":
    main()
