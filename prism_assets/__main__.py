"""`python -m prism_assets run`: materialize the whole pipeline into the Dagster instance.

Dagster's CLI refuses partitioned assets without `--partition`, so the main job has this entry
point: it materializes the assets in dependency order through Dagster's API, recording every run in
the instance at DAGSTER_HOME, so `dagster dev` shows what it did.
"""

from __future__ import annotations

import argparse
import sys
import time

import dagster as dg


def run(args: argparse.Namespace) -> int:
    from prism_assets.definitions import ASSETS, CHECKS, RESOURCES

    instance = dg.DagsterInstance.get()
    run_config = {"ops": {"significant_splits": {"config": {"preset": args.preset}}}} if args.preset else None
    started = time.perf_counter()
    result = dg.materialize([*ASSETS, *CHECKS], instance=instance, resources=RESOURCES, run_config=run_config,
                            raise_on_error=False)
    elapsed = time.perf_counter() - started
    if not result.success:
        print(f"run {result.run_id} failed after {elapsed:.1f} s; see `dagster dev` or the log above", file=sys.stderr)
        return 1
    splits = result.output_for_node("significant_splits")["splits"]
    print(f"run {result.run_id} succeeded in {elapsed:.1f} s")
    print(splits[["split", "predicted", "users_a", "users_b", "pairs_a", "pairs_b"]].to_string(index=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prism_assets")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="materialize every asset into the instance at DAGSTER_HOME")
    run_parser.add_argument("--preset", choices=["auto", "v3"], default=None, help="split preset (default: auto)")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
