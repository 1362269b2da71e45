"""Seconds a DPO partition spends around the trainer: LocalLauncher's subprocess against its warm fork.

Runs the real trainer (the tiny model, the tiny recipe, synthetic pairs with precomputed reference log-probs and
token ids, as a partition gets them) through LocalLauncher inside a Dagster materialization, alternating the
subprocess launcher (the baseline) with a warm one (`warm_modules`), and prints per run the wall seconds of
`launcher.run` and of the whole materialization, the trainer's own (`runtime_s` of its metrics.json), the overhead
(wall − trainer), and where the seconds go, from the times the trainer's Pipes messages appear; then the medians
and the ratio overhead_subprocess / overhead_warm. The first warm run also pays the warm imports (once per process).
Usage: python benchmarks/launch_overhead.py [--runs 5] [--threads N] [--warm-modules m1,m2] [--users 300]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import dagster as dg
import pandas as pd

from prism_assets.training.run_folder import (
    METRICS_FILE,
    PAIRS_FILE,
    PIPES_MESSAGES_FILE,
    REFERENCE_COLUMNS,
    REFERENCE_CONFIG_FILE,
    REFERENCE_OUTPUT,
    TOKEN_COLUMNS,
)
from prism_assets.training.settings import RECIPES, ReferenceConfig, RunConfig
from resources.launcher import LocalLauncher

TRAINER, REFERENCE = "prism_assets.training.trainer", "prism_assets.training.reference"
# The trainer, and what it imports only inside train(): transformers' auto classes and the Qwen2 model and tokenizer.
WARM_MODULES = [
    TRAINER,
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen2.tokenization_qwen2",
]
# Phases between what the trainer reports, each ending where the trainer's message (or the launcher) says so.
PHASES = (
    ("start", "Pipes opened: interpreter, imports, config"),
    ("load", "pairs, tokenizer, model, held-out set loaded"),
    ("steps", "training steps and held-out evaluations"),
    ("write", "curve and metrics written, Pipes closed"),
    ("exit", "the process ended and was reaped"),
)


class MessageWatcher(threading.Thread):
    """When each line of the Pipes messages file appears, in seconds from `started` (polls every 5 ms)."""

    def __init__(self, path: Path, started: float):
        super().__init__(daemon=True)
        self.path, self.started = path, started
        self.seen: list[tuple[float, dict]] = []
        self.done = threading.Event()

    def run(self) -> None:
        offset, partial = 0, b""
        while not self.done.is_set():
            if self.path.exists():
                with open(self.path, "rb") as file:
                    file.seek(offset)
                    chunk = file.read()
                offset += len(chunk)
                now = time.perf_counter() - self.started
                *lines, partial = (partial + chunk).split(b"\n")
                self.seen += [(now, json.loads(line)) for line in lines if line.strip()]
            time.sleep(0.005)

    def phases(self, total: float) -> dict[str, float]:
        def first(test) -> float:
            return next(t for t, m in self.seen if test(m))

        def log(prefix: str):
            return lambda m: m["method"] == "log" and m["params"]["message"].startswith(prefix)

        opened = first(lambda m: m["method"] == "opened")
        loaded = first(log("DPO "))
        last_step = max(t for t, m in self.seen if log("step ")(m))
        closed = first(lambda m: m["method"] == "closed")
        bounds = [0.0, opened, loaded, last_step, closed, total]
        return {name: end - begin for (name, _), begin, end in zip(PHASES, bounds, bounds[1:])}


def prepare(workdir: Path, users: int) -> None:
    """The tiny model and the synthetic PRISM's pairs with the reference job's log-probs and token ids, in
    `workdir` (in a process of its own: this one, as a Dagster process, has imported neither torch nor
    transformers before its first run)."""
    from prism_assets.dataset import synthetic
    from prism_assets.dataset.loading import load_prism_directory
    from prism_assets.dataset.pairs import within_model_pairs
    from prism_assets.training.tiny_model import build_tiny_qwen2

    model = str(build_tiny_qwen2(workdir / "tiny-qwen2"))
    synthetic.write_synthetic_prism(workdir / "prism", synthetic.SyntheticConfig(seed=3, num_users=users))
    tables = load_prism_directory(workdir / "prism")
    pairs = within_model_pairs(tables.utterances, tables.conversations).pairs
    reference = workdir / "reference"
    reference.mkdir()
    pairs[["pair_id", "prompt", "chosen", "rejected"]].to_parquet(reference / PAIRS_FILE, index=False)
    config = ReferenceConfig(
        base_model=model,
        max_length=RECIPES["tiny"].max_length,
        pairs_path=PAIRS_FILE,
        output_path=REFERENCE_OUTPUT,
        device="cpu",
    )
    (reference / REFERENCE_CONFIG_FILE).write_text(config.model_dump_json())
    subprocess.run([sys.executable, "-m", REFERENCE, "--config", str(reference / REFERENCE_CONFIG_FILE)], check=True)
    refs = pd.read_parquet(reference / REFERENCE_OUTPUT)
    carried = refs[["pair_id", *REFERENCE_COLUMNS, *TOKEN_COLUMNS]]
    pairs.merge(carried, on="pair_id", validate="1:1").to_parquet(workdir / "pairs.parquet", index=False)


def import_seconds(modules: list[str]) -> float:
    """Seconds a new interpreter takes to import `modules`: what the first warm run of a process pays."""
    code = f"import importlib, time; t = time.perf_counter(); [importlib.import_module(m) for m in {modules!r}]; "
    code += "print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def partition(
    instance: dg.DagsterInstance, launcher: LocalLauncher, run_dir: Path, model: str, pairs: pd.DataFrame
) -> dict[str, float]:
    """One DPO run through `launcher` in a Dagster materialization: its seconds."""
    run_dir.mkdir(parents=True)
    pairs.to_parquet(run_dir / PAIRS_FILE, index=False)
    config = RunConfig(
        **{**RECIPES["tiny"].training_values(), "base_model": model, "device": "cpu"},
        pairs_path=PAIRS_FILE,
        output_dir=".",
        seed=0,
    )
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    seconds: dict[str, float] = {}

    @dg.asset
    def group_dpo_run(context: dg.AssetExecutionContext, launcher: LocalLauncher) -> dg.MaterializeResult:
        started = time.perf_counter()
        watcher = MessageWatcher(run_dir / PIPES_MESSAGES_FILE, started)
        watcher.start()
        invocation = launcher.run(
            context=context,
            command=[sys.executable, "-m", TRAINER, "--config", str(run_dir / "config.json")],
            run_dir=str(run_dir),
            outputs=[METRICS_FILE],
        )
        seconds["launcher.run"] = time.perf_counter() - started
        watcher.done.set()
        watcher.join()
        seconds.update(watcher.phases(seconds["launcher.run"]))
        return invocation.get_materialize_result()

    started = time.perf_counter()
    dg.materialize([group_dpo_run], instance=instance, resources={"launcher": launcher})
    seconds["materialize"] = time.perf_counter() - started
    seconds["trainer"] = json.loads((run_dir / METRICS_FILE).read_text())["runtime_s"]
    seconds["peak_rss_gb"] = json.loads((run_dir / METRICS_FILE).read_text())["peak_rss_gb"]
    return seconds


def show(label: str, s: dict[str, float]) -> None:
    print(
        f"{label:<16} {s['materialize']:6.2f} {s['launcher.run']:6.2f} {s['trainer']:6.2f} "
        f"{s['launcher.run'] - s['trainer']:6.2f} {s['materialize'] - s['trainer']:6.2f}  "
        + " ".join(f"{s[name]:5.2f}" for name, _ in PHASES)
        + f"  {s['peak_rss_gb']:5.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5, help="runs of each launcher (default 5)")
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2), help="threads_per_run (the CLI's default)"
    )
    parser.add_argument(
        "--warm-modules", default=",".join(WARM_MODULES), help="comma-separated warm_modules of the warm launcher"
    )
    parser.add_argument("--users", type=int, default=300, help="synthetic PRISM users (default 300)")
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # the data, in a process of its own
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), args.users)
        return
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    warm_modules = args.warm_modules.split(",")
    launchers = {
        "subprocess": LocalLauncher(threads_per_run=args.threads),
        "warm": LocalLauncher(threads_per_run=args.threads, warm_modules=warm_modules),
    }
    workdir = Path(tempfile.mkdtemp(prefix="launch_overhead_"))
    try:
        subprocess.run(
            [sys.executable, __file__, "--prepare", str(workdir), "--users", str(args.users)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        model, pairs = str(workdir / "tiny-qwen2"), pd.read_parquet(workdir / "pairs.parquet")
        print(f"{len(pairs)} pairs; threads_per_run {args.threads}; warm_modules {args.warm_modules}")
        print(f"torch imported here before the first run: {'torch' in sys.modules}")
        print(
            f"{'run':<16} {'mat.':>6} {'run()':>6} {'train':>6} {'ovh':>6} {'ovh+d':>6}  "
            + " ".join(f"{name:>5}" for name, _ in PHASES)
            + "  rss GB"
        )
        results: dict[str, list[dict[str, float]]] = {name: [] for name in launchers}
        with dg.instance_for_test() as instance:
            # Not counted: the first run reads torch's and transformers' files into the page cache.
            show("(cache warm-up)", partition(instance, launchers["subprocess"], workdir / "runs" / "0", model, pairs))
            for i in range(args.runs):
                for name, launcher in launchers.items():
                    seconds = partition(instance, launcher, workdir / "runs" / f"{name}-{i}", model, pairs)
                    results[name].append(seconds)
                    show(f"{name} {i}", seconds)
        print("\nmat.: dg.materialize wall; run(): launcher.run wall; train: the trainer's runtime_s (its imports")
        print("inside train() included); ovh: run() − train; ovh+d: mat. − train (Dagster's own run around it too);")
        print("the phases of run(), as the trainer's Pipes messages appear:")
        for name, meaning in PHASES:
            print(f"  {name:<6} {meaning}")
        counted = {"subprocess": results["subprocess"], "warm": results["warm"][1:]}  # the first warm one imports
        medians = {
            name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in counted.items()
        }
        print("\nmedians (warm: without its first run, which imports the warm modules)")
        for name, s in medians.items():
            show(name, s)
        first = results["warm"][0]
        print(
            f"first warm run of this process: overhead {first['launcher.run'] - first['trainer']:.2f} s, "
            f"{first['materialize']:.2f} s in all (the warm modules import in {import_seconds(warm_modules):.2f} s "
            "in a new interpreter)"
        )
        for label, key in (("launcher.run", "launcher.run"), ("materialization", "materialize")):
            sub, warm = (medians[n][key] - medians[n]["trainer"] for n in ("subprocess", "warm"))
            print(f"overhead_subprocess / overhead_warm ({label}): {sub:.2f} / {warm:.2f} s = {sub / warm:.1f}×")
        sub, warm = (medians[n]["materialize"] for n in ("subprocess", "warm"))
        print(
            f"a partition, subprocess / warm: {sub:.2f} / {warm:.2f} s = {sub / warm:.1f}× ({sub - warm:.2f} s saved)"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
