"""The reference precompute: `python -m prism_assets.training.reference --config reference.json`.

Computes, once per base model and pairs version, the frozen base model's summed log-probability of
every pair's chosen and rejected response — tokenized and truncated exactly as the trainer's TRL
DPOTrainer does (`logps.tokenize_pairs`) — in large padding-free batches (bf16 autocast on CUDA, fp32
on CPU), and writes `pair_id, ref_chosen_logps, ref_rejected_logps`, the token ids they are of
(TOKEN_COLUMNS) and a digest of each pair's text (TEXT_DIGEST_COLUMN) as parquet (atomically). Every
DPO run then reads these instead of loading and running a reference model, and the ids instead of
tokenizing its pairs again. Reports through dagster-pipes like the trainer; imports nothing else of Dagster.
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from prism_assets.training.base_model import load_base_model
from prism_assets.training.logps import frozen_logps, token_columns, tokenize_pairs
from prism_assets.training.reporting import Reporter
from prism_assets.training.run_folder import (
    REFERENCE_COLUMNS,
    TEXT_DIGEST_COLUMN,
    check_code_version,
    pair_text_digests,
)
from prism_assets.training.settings import ReferenceConfig


def reference_logps(model, tokenizer, pairs: pd.DataFrame, max_length: int, batch_size: int) -> pd.DataFrame:
    """pair_id, the model's summed completion log-probs of each pair's chosen and rejected response, their ids, and
    a digest of the text they are of."""
    chosen, rejected = tokenize_pairs(tokenizer, pairs, max_length)
    values = frozen_logps(model, chosen + rejected, batch_size)
    return pd.DataFrame(
        {
            "pair_id": pairs["pair_id"].to_numpy(),
            REFERENCE_COLUMNS[0]: values[: len(chosen)].numpy(),
            REFERENCE_COLUMNS[1]: values[len(chosen) :].numpy(),
            **token_columns(chosen, rejected),
            TEXT_DIGEST_COLUMN: pair_text_digests(pairs),
        }
    )


def run(cfg: ReferenceConfig, reporter) -> pd.DataFrame:
    started = time.perf_counter()
    pairs = pd.read_parquet(cfg.pairs_path, columns=["pair_id", "prompt", "chosen", "rejected"])
    if pairs["pair_id"].duplicated().any():
        raise ValueError(f"{cfg.pairs_path}: duplicated pair_id values")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    tokenizer, model = load_base_model(cfg.base_model, torch.float32)
    if use_cuda:
        model.to("cuda")  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self from mypy
    reporter.info(
        f"reference log-probs of {len(pairs)} pairs under {cfg.base_model} on {'cuda' if use_cuda else 'cpu'}"
    )
    frame = reference_logps(model, tokenizer, pairs, cfg.max_length, cfg.batch_size)
    output = Path(cfg.output_path)
    tmp = output.with_name(f".{output.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(output)
    data_version = hashlib.sha256(output.read_bytes()).hexdigest()[:24]
    elapsed = time.perf_counter() - started
    reporter.report(
        {
            "num_pairs": len(frame),
            "runtime_s": elapsed,
            "mean_ref_chosen_logps": float(frame[REFERENCE_COLUMNS[0]].mean()),
        },
        data_version,
    )
    reporter.info(f"{len(frame)} pairs in {elapsed:.1f} s → {output}")
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prism_assets.training.reference")
    parser.add_argument("--config", required=True, help="path of the JSON reference config")
    cfg = ReferenceConfig.from_json(parser.parse_args(argv).config)
    reporter = Reporter()
    try:
        check_code_version("prism_assets.training.reference", cfg.code_version)
        run(cfg, reporter)
    except BaseException as error:
        reporter.close(error)
        raise
    reporter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
