"""How often the verdicts are wrong about noise, and how often they find the planted effect, across synthetic worlds.

Runs the main job (`python -m prism_assets run`) once per synthetic generator seed, each in a fresh instance and
storage, and reads every experiment's correspondence table back. Each predicted split is classed by the age mix of
its two groups (the synthetic PRISM plants a DPO taste by age only; `truth.json` names it):

- planted: the groups' shares of the taste group differ by more than 0.5 (v3's and v2's S1_age);
- unplanted: by less than 0.15 (stated preferences, education, familiarity, region: drawn independently of age);
- indirect: in between (v2's S5_behavioral: a median split of the score gap, which age moves), counted in neither.

Per experiment it reports the family-wise false-positive rate (an experiment with any unplanted split MATCH or
MISMATCH, or its null control NOT OK, counts once), the null control's own rate, and how often the planted split is
MATCH, each with a 95% Wilson interval over the worlds, and writes every world's verdicts as JSON lines.

    python benchmarks/null_rates.py --seeds 1-10 --out null_rates.jsonl [--repo DIR] [--world none] [-- RUN ARGS]

`--repo` runs another checkout's main job (its `.venv` if it has one), so that two versions are measured on the
same worlds. `--world none` generates worlds with no planted effect at all (PRISM_SYNTHETIC_EFFECTS=none): every
split is unplanted. The run's own flags follow `--`.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

PRIMARY = "mean_heldout_acc_tail"
FLAGGED = ("MATCH", "MISMATCH")


def seeds_of(text: str) -> list[int]:
    """`1-10`, `3`, `1,4,9` → the seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def wilson(hits: int, n: int) -> tuple[float, float, float]:
    if n == 0:
        return math.nan, math.nan, math.nan
    z, p = 1.96, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


def taste_shares(storage: Path, experiment: str) -> dict[str, float]:
    """split → |share of the taste group in A − in B| among the users of each group, from the stored splits."""
    truth_path = next((storage / "synthetic_prism").glob("*/truth.json"))
    taste = json.loads(truth_path.read_text())["taste"]
    survey = pd.read_parquet(storage / "assets" / "raw_prism" / "survey.parquet")
    covariate = survey[taste["covariate"]] if taste["covariate"] in survey else pd.Series(dtype=object)
    in_taste = dict(zip(survey["user_id"], covariate.isin(taste["group_a_levels"])))
    membership = pd.read_parquet(storage / "assets" / experiment / "significant_splits" / "membership.parquet")
    membership = membership.assign(taste=membership["user_id"].map(in_taste).astype(float))
    shares = membership.groupby(["split", "group"])["taste"].mean().unstack()
    return (shares["A"] - shares["B"]).abs().to_dict()


def run_world(seed: int, args, repo: Path, python: str) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix=f"null-rates-{seed}-"))
    try:
        home, storage = root / "home", root / "storage"
        home.mkdir()
        shutil.copy(repo / "dagster.yaml", home / "dagster.yaml")
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "PRISM_STORAGE": str(storage),
            "PRISM_SYNTHETIC_SEED": str(seed),
            "PRISM_SYNTHETIC_USERS": str(args.users),
        }
        if args.world != "planted":
            env["PRISM_SYNTHETIC_EFFECTS"] = args.world
        started = time.perf_counter()
        done = subprocess.run(
            [python, "-m", "prism_assets", "run", *args.run_args],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-2000:]
            print(f"seed {seed}: the main job failed ({done.returncode}):\n{tail}", file=sys.stderr)
            return [{"seed": seed, "failed": True, "seconds": elapsed}]
        table = pd.read_parquet(storage / "assets" / "correspondence_table" / "table.parquet")
        table = table[table["metric"] == PRIMARY]
        rows = []
        for experiment, rows_of in table.groupby("experiment", sort=False):
            shares = taste_shares(storage, str(experiment))
            for row in rows_of.itertuples():
                if row.random:
                    continue
                share = shares.get(row.split, math.nan)
                kind = "planted" if share > 0.5 else "unplanted" if share < 0.15 else "indirect"
                if args.world == "none":
                    kind = "unplanted"
                rows.append(
                    {
                        "seed": seed,
                        "experiment": experiment,
                        "split": row.split,
                        "null_control": bool(row.null_control),
                        "kind": kind,
                        "taste_share_difference": share,
                        "verdict": row.verdict,
                        "mean_d": row.mean_d,
                        "p_adjusted": getattr(row, "p_adjusted", math.nan),
                        "mde": getattr(row, "mde", math.nan),
                        "seconds": elapsed,
                    }
                )
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summarize(rows: list[dict]) -> None:
    frame = pd.DataFrame([r for r in rows if not r.get("failed")])
    failed = sorted({r["seed"] for r in rows if r.get("failed")})
    if failed:
        print(f"worlds whose main job failed (left out): {failed}")
    if frame.empty:
        return
    print(f"{frame['seed'].nunique()} worlds, {frame['seconds'].groupby(frame['seed']).first().mean():.0f} s each")
    for experiment, mine in frame.groupby("experiment", sort=False):
        worlds = mine.groupby("seed")
        unplanted = mine[(mine["kind"] == "unplanted") & ~mine["null_control"]]
        family = worlds.apply(
            lambda w: bool(
                (w.loc[(w["kind"] == "unplanted") & ~w["null_control"], "verdict"].isin(FLAGGED)).any()
                or (w.loc[w["null_control"], "verdict"] == "null NOT OK").any()
            ),
            include_groups=False,
        )
        control = worlds.apply(lambda w: bool((w["verdict"] == "null NOT OK").any()), include_groups=False)
        split_flags = int(unplanted["verdict"].isin(FLAGGED).sum())
        print(f"\n{experiment}:")
        for label, hits, n in (
            ("worlds with a false flag (family-wise)", int(family.sum()), len(family)),
            ("worlds whose null control is NOT OK", int(control.sum()), len(control)),
            ("unplanted predicted splits flagged", split_flags, len(unplanted)),
        ):
            rate, low, high = wilson(hits, n)
            print(f"  {label:<40} {hits:>3} of {n:<4} {rate:6.1%} [{max(low, 0):.1%}, {high:.1%}]")
        planted = mine[mine["kind"] == "planted"]
        if len(planted):
            found = int((planted["verdict"] == "MATCH").sum())
            rate, low, high = wilson(found, len(planted))
            print(f"  {'planted split MATCH':<40} {found:>3} of {len(planted):<4} {rate:6.1%} [{low:.1%}, {high:.1%}]")
            if planted["mde"].notna().any():
                print(f"  {'its stated MDE (median)':<40} {planted['mde'].median():.3f}")
        flagged = unplanted[unplanted["verdict"].isin(FLAGGED)]
        for row in flagged.itertuples():
            print(f"  false flag: world {row.seed} {row.split} {row.verdict} (mean A − B {row.mean_d:+.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1-10", help="synthetic generator seeds: 1-10, or 3,7,11")
    parser.add_argument("--users", type=int, default=1500, help="synthetic users per world")
    parser.add_argument("--world", choices=("planted", "none"), default="planted", help="planted effects or none")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to run")
    parser.add_argument("--out", type=Path, help="append each world's verdicts here as JSON lines")
    parser.add_argument("--summarize", type=Path, help="only summarize this JSON-lines file of earlier worlds")
    parser.add_argument("run_args", nargs="*", help="the main job's own flags, after --")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize([json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()])
        return 0
    repo = args.repo.resolve()
    venv = repo / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    rows: list[dict] = []
    for seed in seeds_of(args.seeds):
        world = run_world(seed, args, repo, python)
        rows += world
        if args.out:
            with open(args.out, "a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in world)
        flags = [f"{r['experiment']}/{r['split']} {r['verdict']}" for r in world if r.get("verdict") in FLAGGED]
        print(f"world {seed}: {', '.join(flags) or 'no MATCH or MISMATCH'}", flush=True)
    summarize(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
