"""The training step against TRL's DPOTrainer: same batches → same loss, metrics, gradients and weights."""

import copy
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from trl_reference import make_trainer

from prism_assets.training import engine
from prism_assets.training.logps import tokenize_pairs
from prism_assets.training.reference import reference_logps
from prism_assets.training.run_folder import REFERENCE_COLUMNS
from prism_assets.training.settings import RunConfig

STEPS, BATCH, MAX_LENGTH = 4, 8, 96


class Tolerance(NamedTuple):
    """Stated tolerances, per device. On CPU both train in fp32 on the same token ids and batches; TRL computes the
    LM head over every position in chunks, this step only where a completion token is predicted — float rounding
    of different matmul shapes. On CUDA both run bf16 autocast over fp32 weights, TRL with padded SDPA attention,
    the step with padding-free FlashAttention: bf16 rounding of different kernels (on CPU, both in bf16 autocast
    differed by 4e-4 in loss, 1e-3 relative in grad norm, 7e-4 in rewards, 4% in the update)."""

    rtol: float  # metrics
    atol: float
    update_rtol: float  # ‖Δ_ours − Δ_TRL‖ / ‖Δ_TRL‖ of the weights
    same_accuracies: bool


TOLERANCES = {
    "cpu": Tolerance(1e-4, 1e-5, 1e-2, same_accuracies=True),
    "cuda": Tolerance(5e-2, 1e-2, 0.15, same_accuracies=False),
}  # a pair whose margin is ~0 may flip


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
        ),
    ],
)
def test_same_batches_give_trls_loss_metrics_and_weights(device, tiny_model_dir, small_pairs_path, tmp_path):
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tolerance, use_cuda = TOLERANCES[device], device == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pairs = pd.read_parquet(small_pairs_path).head(STEPS * BATCH).reset_index(drop=True)
    references = reference_logps(copy.deepcopy(base).to(device), tokenizer, pairs, MAX_LENGTH, 16)
    pairs = pairs.merge(references, on="pair_id")

    cfg = RunConfig(
        base_model=str(tiny_model_dir),
        pairs_path="-",
        output_dir=str(tmp_path),
        seed=0,
        max_steps=STEPS,
        batch_size=BATCH,
        learning_rate=1e-3,
        beta=0.1,
        logging_steps=1,
        max_length=MAX_LENGTH,
    )
    trl_model = copy.deepcopy(base)
    trainer = make_trainer(cfg, trl_model, tokenizer, pairs, use_cuda, [])
    trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(trainer.train_dataset)  # pairs in order
    trainer.train()
    trl_logs = [h for h in trainer.state.log_history if "loss" in h]

    model = copy.deepcopy(base).to(device)
    optimizer, schedule = engine.make_optimizer(model, cfg.learning_rate, STEPS, use_cuda=use_cuda)
    chosen, rejected = tokenize_pairs(tokenizer, pairs, MAX_LENGTH)
    steps = []
    for step in range(STEPS):
        rows = range(step * BATCH, (step + 1) * BATCH)
        ref_chosen, ref_rejected = (pairs.loc[rows, c].to_numpy() for c in REFERENCE_COLUMNS)
        batch = engine.collate(
            [chosen[i] for i in rows], [rejected[i] for i in rows], ref_chosen, ref_rejected, device
        )
        steps.append(engine.train_step(model, batch, cfg.beta, optimizer, schedule))
    ours = engine.read_metrics(steps)

    assert len(trl_logs) == STEPS
    for key in ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        np.testing.assert_allclose(
            [o[key] for o in ours], [t[key] for t in trl_logs], rtol=tolerance.rtol, atol=tolerance.atol, err_msg=key
        )
    # At step 0 the policy is the reference: every reward is 0 up to float noise, so which side wins is noise.
    assert abs(ours[0]["rewards/margins"]) < tolerance.atol
    if tolerance.same_accuracies:
        np.testing.assert_array_equal(
            [o["rewards/accuracies"] for o in ours[1:]], [t["rewards/accuracies"] for t in trl_logs[1:]]
        )
    # Weights: Adam moves a parameter by ≈ ±lr whatever its gradient's size, so where a gradient is ~0 its float
    # noise picks the sign; compare the whole update instead: ‖Δ_ours − Δ_TRL‖ / ‖Δ_TRL‖.
    flat = {
        name: torch.cat([p.detach().cpu().flatten() for p in m.parameters()])
        for name, m in (("base", base), ("ours", model), ("trl", trl_model))
    }
    update, trl_update = flat["ours"] - flat["base"], flat["trl"] - flat["base"]
    assert float(trl_update.norm()) > 1e-2  # it learned
    print("relative update difference", float((update - trl_update).norm() / trl_update.norm()))
    assert float((update - trl_update).norm() / trl_update.norm()) < tolerance.update_rtol


def test_batches_are_a_function_of_seed_and_step():
    first_epoch = [engine.batch_indices(20, 8, seed=3, step=s) for s in range(3)]
    assert sorted(sum(first_epoch, [])) == list(range(20)) and [len(b) for b in first_epoch] == [8, 8, 4]
    assert engine.batch_indices(20, 8, seed=3, step=1) == first_epoch[1]
    assert engine.batch_indices(20, 8, seed=3, step=3) != first_epoch[0]  # a new permutation each epoch
    assert engine.batch_indices(20, 8, seed=4, step=0) != first_epoch[0]
