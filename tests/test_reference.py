"""Reference log-probs computed once (reference_logps) against TRL's own precompute, and training on them."""

import copy
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from builders import run_job

from prism_assets.training.logps import messages, sequences_of, token_columns, tokenize_pairs
from prism_assets.training.reference import reference_logps
from prism_assets.training.run_folder import REFERENCE_COLUMNS, TOKEN_COLUMNS

# Stated tolerance: 2e-4 relative (at most 0.05 nats on these sums of 10–300 token log-probs). Same token ids,
# fp32 on CPU, but TRL computes the LM head in chunks and pads batches differently: the float rounding of
# different matmul shapes moves each sum by up to 1e-4 relative (measured 9.7e-5). One wrong token would
# move it by nats.
RTOL, ATOL = 2e-4, 1e-3


@pytest.fixture(scope="module")
def pairs(small_pairs_path):
    return pd.read_parquet(small_pairs_path).head(48).reset_index(drop=True)


def test_reference_logps_equal_trls_own_precompute(tiny_model_dir, pairs, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    max_length = 96  # short enough that a third of these pairs are truncated
    ours = reference_logps(model, tokenizer, pairs, max_length, batch_size=16)

    dataset = Dataset.from_dict(
        {
            "prompt": [messages(p) for p in pairs["prompt"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in pairs["chosen"]],
            "rejected": [[{"role": "assistant", "content": r}] for r in pairs["rejected"]],
        }
    )
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_length=max_length,
        truncation_mode="keep_end",
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=8,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    trl = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train_dataset
    assert isinstance(trl, Dataset)  # a Dataset given, a Dataset prepared
    lengths = [len(p) + len(c) for p, c in zip(trl["prompt_ids"], trl["chosen_ids"])]
    assert sum(n > max_length for n in lengths) >= 10  # truncation is exercised
    for column in REFERENCE_COLUMNS:
        np.testing.assert_allclose(ours[column].to_numpy(), np.asarray(trl[column]), rtol=RTOL, atol=ATOL)
    # the ids they are of, stored for the runs: TRL's untruncated ids, truncated as TRL's keep_end does
    for side in ("chosen", "rejected"):
        for prompt, completion, trl_prompt, trl_completion in zip(
            ours[f"{side}_prompt_ids"], ours[f"{side}_completion_ids"], trl["prompt_ids"], trl[f"{side}_ids"]
        ):
            assert [*prompt, *completion] == (trl_prompt + trl_completion)[-max_length:]
            assert len(completion) == min(len(trl_completion), max_length)


def test_stored_token_ids_are_read_back_and_refused_when_another_max_length_made_them(tiny_model_dir, pairs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # the columns the reference precompute stores, at three max_lengths
    stored = {
        length: pairs.assign(**token_columns(*tokenize_pairs(tokenizer, pairs, length))) for length in (64, 96, 128)
    }
    chosen, rejected, was_stored = sequences_of(tokenizer, stored[96], 96)
    assert was_stored and (chosen, rejected) == tokenize_pairs(tokenizer, pairs, 96)
    assert sequences_of(tokenizer, pairs, 96)[2] is False  # no stored ids: tokenized
    refused = (
        r"pair '.+': its stored token ids .* at max_length 96; they were made with another tokenizer or max_length"
    )
    for length in (64, 128):  # truncated more, or less, than the run's max_length: refused, the pair named
        with pytest.raises(ValueError, match=refused):
            sequences_of(tokenizer, stored[length], 96)
    other = copy.deepcopy(tokenizer)  # another tokenizer: here the same vocabulary, one character more in the template
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", " <|im_start|>")
    with pytest.raises(ValueError, match=refused):
        sequences_of(other, stored[96], 96)
    missing = stored[96].copy()
    missing.loc[3, "rejected_completion_ids"] = None
    with pytest.raises(
        ValueError, match=rf"pair '{pairs['pair_id'][3]}' has no rejected_completion_ids \(1 of 48 pairs"
    ):
        sequences_of(tokenizer, missing, 96)


def test_a_run_fed_reference_logps_trains_as_one_that_computes_them_itself(tiny_model_dir, pairs, tmp_path):
    plain = tmp_path / "plain.parquet"
    pairs.to_parquet(plain, index=False)
    run_job(
        tmp_path,
        "reference",
        module="prism_assets.training.reference",
        base_model=str(tiny_model_dir),
        pairs_path=str(plain),
        output_path=str(tmp_path / "ref.parquet"),
        max_length=96,
    )
    fed = tmp_path / "fed.parquet"
    pairs.merge(pd.read_parquet(tmp_path / "ref.parquet"), on="pair_id").to_parquet(fed, index=False)

    common: dict[str, Any] = {
        "base_model": str(tiny_model_dir),
        "seed": 0,
        "max_steps": 4,
        "logging_steps": 2,
        "learning_rate": 1e-3,
        "max_length": 96,
        "curve_heldout_pairs": 8,
        "batch_size": 4,
    }
    for name, path in (("live", plain), ("fed", fed)):
        run_job(tmp_path, name, pairs_path=str(path), output_dir=str(tmp_path / name), **common)
    ran = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in ("live", "fed")}
    assert (ran["fed"]["reference_logps"], ran["fed"]["token_ids"]) == ("precomputed", "stored")
    assert (ran["live"]["reference_logps"], ran["live"]["token_ids"]) == ("computed", "tokenized")
    assert set(TOKEN_COLUMNS) <= set(pd.read_parquet(fed).columns)
    live, fed_curve = (pd.read_parquet(tmp_path / name / "curve.parquet") for name in ("live", "fed"))
    assert list(fed_curve["step"]) == [2, 4]
    columns = ["loss", "margin", "pref_acc", "reward_chosen", "reward_rejected", "heldout_acc", "heldout_margin"]
    np.testing.assert_allclose(fed_curve[columns].to_numpy(), live[columns].to_numpy(), rtol=1e-4, atol=1e-5)
