"""DPO training throughput: stock TRL against the project's trainer, on the same synthetic pairs, in one run.

`stock` is what a user running the original experiment with plain TRL gets (../shared/perf/
stock_trl_baseline.py): DPOTrainer with a live reference model and TRL's defaults (gradient
checkpointing on), batch 8, β 0.1, lr 5e-6, max length 1024, bf16 autocast over fp32 weights on CUDA.
`project` is the trainer's own step (`prism_assets.training.engine`): reference log-probs precomputed
once by `reference_logps` (their one-off cost printed apart: it is shared by every run of a grid), no
reference model, no gradient checkpointing, padding-free rows (`packing`: FlashAttention's varlen
kernel on CUDA), the LM head only where a completion token is predicted, no Trainer loop, no wait for
the device between logging steps. `trl+refs` is TRL's DPOTrainer given the same precomputed references and settings
(`trl_reference.make_trainer`), to show what the references alone buy. All train the
same model on the same conversational pairs whose token lengths follow PRISM's (prompt and earlier
turns ≈ 60 tokens, responses ≈ 565 ± 388 characters ≈ 140 tokens).

Prints one JSON line per measurement and a table: ms/step (the mean over the timed steps after warm-up,
the device drained only at both ends, so a loop that never waits for it is timed as it runs), real
(unpadded) tokens/s, peak memory, and project/stock ratios — per run, and for K runs packed side by side
(K worker processes on one device, as `runs_per_gpu` places them). The project's rows are repeated as the
trainer runs them, with one held-out evaluation (256 pairs, timed) every 25 steps (every logging step of
the original recipe) and every 100 (its `eval_steps`); the last line estimates the device-hours of the
research grid (25 runs: baseline, 8 splits and 4 random splits, × 5 seeds × 2000 steps). A variant that fails is
reported with its error and the others still run. Numbers are never asserted in tests.

    python benchmarks/dpo_throughput.py --tiny            # CPU, the tiny Qwen2 (seconds)
    python benchmarks/dpo_throughput.py --packed 3        # GPU, the Qwen2.5-0.5B shape (random weights)
"""

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from prism_assets.experiments import ExperimentSpec  # noqa: E402
from prism_assets.training import engine, packing, tiny_model  # noqa: E402
from prism_assets.training.logps import sequences_of, tokenize_pairs  # noqa: E402
from prism_assets.training.reference import reference_logps  # noqa: E402
from prism_assets.training.run_folder import REFERENCE_COLUMNS  # noqa: E402
from prism_assets.training.settings import RunConfig  # noqa: E402

STOCK, TRL_REFS, PROJECT = "stock", "trl+refs", "project"
HELDOUT_PAIRS = 256  # one evaluation's pairs (a run evaluates its held-out users' pairs: thousands at 0.5B scale)
EVAL_EVERY = (25, 100)  # held-out evaluation every logging step of the original recipe; its eval_steps
# baseline + (8 splits and the default random splits) × 2 groups, 5 seeds, of the original recipe's steps
RANDOM_SPLITS = ExperimentSpec.model_fields["random_splits"].default
GRID_RUNS, GRID_STEPS = (1 + (8 + RANDOM_SPLITS) * 2) * 5, 2000


def qwen05_directory(directory: Path) -> Path:
    """Qwen2.5-0.5B-Instruct's architecture with random weights, and the tiny model's byte-level BPE tokenizer
    (its ids use the first rows of the 151,936-token embedding; every word `word_list` picks is one token)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_model.save_tokenizer(tiny_model.train_tokenizer(), directory)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,  # type: ignore[call-arg]  # accepted at runtime (into rope_parameters), not typed
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


def synthetic_pairs(n: int, words: list[str], rng: np.random.Generator) -> pd.DataFrame:
    """n conversational pairs with PRISM's token lengths (each word ≈ one token)."""

    def text(tokens):
        return " ".join(rng.choice(words, size=tokens))

    sigma = math.sqrt(math.log(1 + (388 / 565) ** 2))
    mu = math.log(565) - sigma**2 / 2

    def response():
        return text(int(min(max(rng.lognormal(mu, sigma) / 4, 1), 1100)))

    rows = [
        {
            "pair_id": f"p{i}",
            "prompt": [{"role": "user", "content": text(int(min(max(rng.lognormal(math.log(60), 0.7), 8), 600)))}],
            "chosen": response(),
            "rejected": response(),
        }
        for i in range(n)
    ]
    return pd.DataFrame(rows)


def word_list(tokenizer) -> list[str]:
    """Words the tokenizer encodes as one token each (after a space): a synthetic text of n words is n tokens."""
    return sorted(
        {
            w
            for w in (tokenizer.convert_tokens_to_string([t]).strip() for t in tokenizer.get_vocab())
            if w.isalpha() and len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
        }
    )[:500]


def check_lengths(tokenizer, pairs: pd.DataFrame, low: int = 250, high: int = 650) -> float:
    """Mean real tokens per pair (prompt + chosen, prompt + rejected) of the first pairs, as the trainer tokenizes
    them; outside [low, high] (PRISM-shaped pairs are ≈ 434) the model directory's tokenizer did not load as it
    was written, and every number would be of other sequences than intended: an error, not a table."""
    chosen, rejected = tokenize_pairs(tokenizer, pairs.head(64), max_length=1024)
    mean = float(np.mean([len(p) + len(c) + len(q) + len(r) for (p, c), (q, r) in zip(chosen, rejected)]))
    if not low <= mean <= high:
        raise SystemExit(
            f"the synthetic pairs are {mean:.0f} tokens each under {tokenizer.name_or_path}, not "
            f"PRISM's ≈ 434 ({low}–{high}): its tokenizer does not encode each word as one token "
            "(a model directory an older version of this benchmark left in --workdir: delete it)"
        )
    return mean


def measure(
    variant: str, model_dir: Path, pairs: pd.DataFrame, steps: int, warm: int, out: Path, checkpoint: bool = False
) -> dict:
    """Train `variant` for warm + steps steps; ms/step over the steps after warm-up (and, with `checkpoint`, the
    cost of one of the trainer's checkpoints of the project's model and optimizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl_reference import make_trainer

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # transformers' @wraps(Module.to) hides the bound self from mypy: hence the ignore
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)  # type: ignore[arg-type]

    class Clock(TrainerCallback):
        """The time at the end of the warm-up and at the end of the last step, the device drained at both (and
        nowhere else: a loop that never waits for the device is timed as it runs); the peak memory of training."""

        def __init__(self):
            self.ticks, self.peak_gb = [], None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warm, warm + steps):
                if cuda:
                    torch.cuda.synchronize()
                    self.peak_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                self.ticks.append(time.perf_counter())

    clock = Clock()
    result: dict[str, object] = {"variant": variant, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    cfg = RunConfig(
        base_model=str(model_dir),
        pairs_path="-",
        output_dir=str(out / variant),
        seed=0,
        max_steps=steps + warm,
        batch_size=8,
        beta=0.1,
        learning_rate=5e-6,
        logging_steps=min(25, steps + warm),  # the original recipe logs every 25 steps
        max_length=1024,
    )
    if variant in (PROJECT, TRL_REFS):
        started = time.perf_counter()
        references = reference_logps(model, tokenizer, pairs, cfg.max_length, batch_size=64)
        result["reference_s_all_pairs"] = round(time.perf_counter() - started, 2)
        pairs = pairs.merge(references, on="pair_id")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if variant == PROJECT:
        # A run's start: tokenizing its pairs (as runs did), or reading back the ids reference_logps stored.
        started = time.perf_counter()
        tokenize_pairs(tokenizer, pairs, cfg.max_length)
        result["tokenize_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        chosen, rejected, stored = sequences_of(tokenizer, pairs, cfg.max_length)
        assert stored, "the pairs lost the token ids reference_logps stored"
        result["stored_ids_s"] = round(time.perf_counter() - started, 3)
        refs = [pairs[c].to_numpy() for c in REFERENCE_COLUMNS]
        optimizer, schedule = engine.make_optimizer(model, cfg.learning_rate, cfg.max_steps, cuda)
        model.train()
        results = []
        for step in range(cfg.max_steps):
            rows = engine.batch_indices(len(pairs), cfg.batch_size, cfg.seed, step)
            batch = engine.collate(
                [chosen[i] for i in rows], [rejected[i] for i in rows], refs[0][rows], refs[1][rows], device
            )
            results.append(engine.train_step(model, batch, cfg.beta, optimizer, schedule))
            clock.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
        lengths = [len(p) + len(c) + len(p2) + len(r) for (p, c), (p2, r) in zip(chosen, rejected)]
        mean_loss = float(np.mean([m["loss"] for m in engine.read_metrics(results)]))
        result["attention_kernel"] = packing.kernels_used()
        result.update(heldout_eval_cost(model, tokenizer, pairs.head(HELDOUT_PAIRS), cfg))
        if checkpoint:
            result.update(checkpoint_cost(out / "checkpoints", cfg, model, optimizer, schedule))
    else:
        if variant == TRL_REFS:
            trainer = make_trainer(cfg, model, tokenizer, pairs, cuda, [clock])
        else:
            from datasets import Dataset

            conversations = {
                "prompt": list(pairs["prompt"]),
                "chosen": [[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
                "rejected": [[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
            }
            args = DPOConfig(
                output_dir=str(out / variant),
                per_device_train_batch_size=8,
                learning_rate=5e-6,
                beta=0.1,
                max_steps=steps + warm,
                logging_steps=min(25, steps + warm),  # the original recipe logs every 25 steps
                save_strategy="no",
                report_to="none",
                seed=0,
                bf16=cuda,
                use_cpu=not cuda,
                max_length=1024,
                dataloader_num_workers=2 if cuda else 0,
                disable_tqdm=True,
            )
            trainer = DPOTrainer(
                model=model,
                ref_model=copy.deepcopy(model).eval(),
                args=args,
                train_dataset=Dataset.from_dict(conversations),
                processing_class=tokenizer,
                callbacks=[clock],
            )
        trainer.train()
        data = trainer.train_dataset
        lengths = [
            min(len(p) + len(c), 1024) + min(len(p) + len(r), 1024)
            for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
        ]
        mean_loss = trainer.state.log_history[-1]["train_loss"]  # the Trainer's mean over the whole run
    step_s = (clock.ticks[1] - clock.ticks[0]) / steps
    tokens_per_step = float(np.mean(lengths)) * 8
    result.update(
        {
            "step_ms": round(1000 * step_s, 2),
            "tokens_per_s": round(tokens_per_step / step_s),
            "real_tokens_per_step": round(tokens_per_step),
            "peak_gpu_gb": clock.peak_gb,
            "mean_loss": round(mean_loss, 4),
        }
    )
    return result


def heldout_eval_cost(model, tokenizer, heldout: pd.DataFrame, cfg: RunConfig) -> dict:
    """Milliseconds (and on CUDA the peak memory) of one held-out evaluation as the trainer runs it
    (`HeldoutEvaluator`), after one untimed."""
    from prism_assets.training.metrics import TAIL_FRACTION
    from prism_assets.training.run_folder import OWN_COLUMN
    from prism_assets.training.trainer import HeldoutEvaluator

    heldout = heldout.assign(**{OWN_COLUMN: True, "user_id": heldout.get("user_id", heldout["pair_id"])})
    evaluator = HeldoutEvaluator(model, tokenizer, heldout, cfg)
    every_pair = max(cfg.full_evaluation_steps(TAIL_FRACTION))  # a step at which every held-out pair is evaluated
    evaluator.evaluate(model, every_pair)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    evaluator.evaluate(model, every_pair)  # ends by copying its numbers to the host: the device is drained
    return {
        "heldout_eval_ms": round(1000 * (time.perf_counter() - started), 2),
        # the run's memory while it evaluates (weights and optimizer state included)
        "heldout_eval_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


def checkpoint_cost(directory: Path, cfg: RunConfig, model, optimizer, schedule) -> dict:
    """Seconds and size of one checkpoint as the trainer writes it (`save_checkpoint`)."""
    from prism_assets.training.trainer import save_checkpoint

    started = time.perf_counter()
    target = save_checkpoint(directory, 1, cfg, model, optimizer, schedule, [])
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in target.iterdir())
    shutil.rmtree(directory)
    return {"checkpoint_s": round(seconds, 2), "checkpoint_gib": round(size / 2**30, 2)}


def with_heldout(row: dict, every: int) -> dict:
    """A project row as the trainer runs it: one held-out evaluation every `every` steps added to each step."""
    step_ms = row["step_ms"] + row["heldout_eval_ms"] / every
    return {
        **row,
        "variant": f"{row['variant']}, held-out every {every}",
        "step_ms": round(step_ms, 2),
        "tokens_per_s": round(row["tokens_per_s"] * row["step_ms"] / step_ms),
    }


def packed(variant: str, k: int, argv: list[str]) -> dict:
    """K workers of one variant at once on the same device; their throughputs add up."""
    threads = str(max(1, (os.cpu_count() or 1) // k))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--worker", variant],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(k)
    ]
    outputs = [w.communicate() for w in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        if worker.returncode:
            raise RuntimeError(f"a worker exited with {worker.returncode}: {stderr.strip().splitlines()[-1:]}")
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    return {
        "variant": f"{variant} ×{k} packed",
        "device": results[0]["device"],
        "step_ms": round(float(np.mean([r["step_ms"] for r in results])), 2),
        "tokens_per_s": sum(r["tokens_per_s"] for r in results),
        "peak_gpu_gb": results[0]["peak_gpu_gb"],
        **(
            {"heldout_eval_ms": round(float(np.mean([r["heldout_eval_ms"] for r in results])), 2)}
            if variant == PROJECT
            else {}
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen2 on CPU (a smoke run: seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 100, --tiny 30)")
    parser.add_argument("--warm", type=int, default=None, help="untimed warm-up steps (default 20, --tiny 5)")
    parser.add_argument("--packed", type=int, default=0, help="also K runs of each variant side by side (0: no)")
    parser.add_argument("--workdir", default=None, help="where the model and pairs are built (default: a temp dir)")
    parser.add_argument("--worker", choices=[STOCK, TRL_REFS, PROJECT], help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (30 if args.tiny else 100)
    warm = args.warm or (5 if args.tiny else 20)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dpo_throughput_"))
    model_dir = work / ("tiny-qwen2" if args.tiny else "qwen2.5-0.5b-shape")
    pairs_path = work / "pairs.parquet"
    if args.worker:  # one measurement in a packed group: the parent built the model and the pairs
        print(
            json.dumps(
                measure(args.worker, model_dir, pd.read_parquet(pairs_path), steps, warm, work / str(os.getpid()))
            )
        )
        return 0

    from transformers import AutoTokenizer

    if not (model_dir / "config.json").exists():
        tiny_model.build_tiny_qwen2(model_dir) if args.tiny else qwen05_directory(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # as every variant loads it
    synthetic_pairs(max(8 * (steps + warm), HELDOUT_PAIRS), word_list(tokenizer), np.random.default_rng(0)).to_parquet(
        pairs_path, index=False
    )
    pairs = pd.read_parquet(pairs_path)
    tokens_per_pair = check_lengths(tokenizer, pairs)
    argv = ["--workdir", str(work), "--steps", str(steps), "--warm", str(warm), *(["--tiny"] if args.tiny else [])]
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
                "pairs": len(pairs),
                "tokens_per_pair": round(tokens_per_pair),
                "steps": steps,
                "warm": warm,
                "workdir": str(work),
            }
        ),
        flush=True,
    )
    rows = []
    for variant in (STOCK, TRL_REFS, PROJECT):
        rows.append(reported(variant, lambda v=variant: measure(v, model_dir, pairs, steps, warm, work, v == PROJECT)))
    if args.packed > 1:
        for variant in (STOCK, PROJECT):
            rows.append(reported(f"{variant} ×{args.packed} packed", lambda v=variant: packed(v, args.packed, argv)))
    stock, project = rows[0], rows[2]
    rows += [
        with_heldout(row, every)
        for row in rows
        if row["variant"].startswith(PROJECT) and "error" not in row
        for every in EVAL_EVERY
    ]
    print(
        "\n| variant | device | ms/step | real tokens/s | peak GPU GiB | tokens/s ÷ stock |\n|---|---|---|---|---|---|"
    )
    for row in rows:
        if "error" in row:
            print(f"| {row['variant']} | failed: {row['error']} | | | | |")
            continue
        ratio = f"{row['tokens_per_s'] / stock['tokens_per_s']:.2f}×" if "error" not in stock else "—"
        print(
            f"| {row['variant']} | {row['device']} | {row['step_ms']:.1f} | {row['tokens_per_s']:,} | "
            f"{row['peak_gpu_gb'] if row['peak_gpu_gb'] is not None else '—'} | {ratio} |"
        )
    if "error" not in stock and "error" not in project:
        eval_peak = "" if project["heldout_eval_peak_gb"] is None else f", peak {project['heldout_eval_peak_gb']} GiB"
        print(
            f"\nproject/stock per run: {stock['step_ms'] / project['step_ms']:.2f}× faster steps; reference "
            f"log-probs of all {len(pairs)} pairs once: {project['reference_s_all_pairs']} s (shared by every run "
            f"of a grid); one held-out evaluation ({HELDOUT_PAIRS} pairs): "
            f"{project['heldout_eval_ms']:.0f} ms{eval_peak}; "
            f"one checkpoint (model and optimizer, {project['checkpoint_gib']} GiB): {project['checkpoint_s']} s; "
            f"token ids of the {len(pairs)} pairs at a run's start: tokenized {project['tokenize_s']} s, read back "
            f"from reference_logps {project['stored_ids_s']} s; attention: {project['attention_kernel']}"
        )
        best = max(
            (r for r in rows if r["variant"].endswith(f"held-out every {EVAL_EVERY[-1]}")),
            key=lambda r: r["tokens_per_s"],
        )
        tokens = GRID_RUNS * GRID_STEPS * project["real_tokens_per_step"]
        stock_h, best_h = (tokens / r["tokens_per_s"] / 3600 for r in (stock, best))
        print(
            f"grid of {GRID_RUNS} runs × {GRID_STEPS} steps, training only (no start-up, reference log-probs or "
            f"checkpoints): stock {stock_h:.1f} device-hours (no held-out evaluation); {best['variant']}: "
            f"{best_h:.1f} ({stock_h / best_h:.1f}× less)"
        )
    return 1 if any("error" in row for row in rows) else 0


def reported(variant: str, measurement) -> dict:
    """The measurement's row, printed as a JSON line; a failure becomes a row naming its error."""
    try:
        row = measurement()
    except Exception as error:  # one broken variant must not cost the others' numbers
        row = {"variant": variant, "error": f"{type(error).__name__}: {str(error)[:300]}"}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
