"""The DPO training step the trainer runs: TRL's sigmoid DPO loss and metrics, without TRL's per-step overhead.

Owns one step's arithmetic (policy log-probs of a padding-free row, reference log-probs from the pairs, TRL's
loss, rewards and accuracy), the optimizer and schedule (the Trainer's defaults) and the order of batches (a
function of seed and step, so a resumed run sees exactly the batches it had not). `tests/test_engine.py`
checks it against TRL's DPOTrainer on the same batches.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prism_assets.training import packing
from prism_assets.training.logps import autocast_for, summed_logps

MAX_GRAD_NORM = 1.0


@dataclass
class Batch:
    sequences: packing.Packed  # B chosen sequences, then their B rejected ones, in one padding-free row
    ref_chosen: torch.Tensor  # (B,) the base model's summed completion log-probs
    ref_rejected: torch.Tensor


@dataclass
class Step:
    values: torch.Tensor  # METRICS of the step, still on the device (reading them waits for it)
    learning_rate: float  # the rate the step used (what the Trainer logs)


METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def collate(chosen: list, rejected: list, ref_chosen, ref_rejected, device) -> Batch:
    """One batch from (prompt_ids, completion_ids) sequences and their reference log-probs."""
    refs = torch.as_tensor(np.stack([ref_chosen, ref_rejected]), dtype=torch.float32)
    if torch.device(device).type == "cuda":
        refs = refs.pin_memory()
    refs = refs.to(device, non_blocking=True)
    return Batch(packing.pack(chosen + rejected, device), refs[0], refs[1])


def sequence_logps(model, batch: Batch) -> torch.Tensor:
    """(2B,) Σ log p(completion token | earlier tokens), fp32; the LM head only at predicting positions."""
    return summed_logps(model, batch.sequences)


def implicit_rewards(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """DPO's implicit rewards β·(log π − log π_ref) of the chosen and the rejected responses; their difference is the
    margin the loss, the accuracies and the held-out evaluation read — the one place it is computed."""
    return beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def dpo_loss(policy: torch.Tensor, batch: Batch, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL's sigmoid DPO loss and the metrics it logs, from the policy's (2B,) log-probs."""
    chosen, rejected = policy.chunk(2)
    chosen_reward, rejected_reward = implicit_rewards(chosen, rejected, batch.ref_chosen, batch.ref_rejected, beta)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    metrics = {
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float().mean(),
        "rewards/margins": (chosen_reward - rejected_reward).mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def make_optimizer(model, learning_rate: float, max_steps: int, use_cuda: bool):
    """The Trainer's defaults: AdamW without weight decay, linear decay to 0 over max_steps, no warm-up."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=use_cuda
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (max_steps - step) / max_steps))
    return optimizer, schedule


def train_step(model, batch: Batch, beta: float, optimizer, schedule) -> Step:
    """Forward, loss, backward, clip, optimizer and schedule step. Nothing here waits for the device: on CUDA
    the host queues the next step while this one runs; `read_metrics` fetches many steps' metrics at once."""
    # Backward inside the packed attention too: gradient checkpointing recomputes the forward there.
    with packing.attention_of(model):
        with autocast_for(batch.sequences.input_ids.device):
            policy = sequence_logps(model, batch)
        loss, metrics = dpo_loss(policy, batch, beta)
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    learning_rate = schedule.get_last_lr()[0]  # the rate this step used (what the Trainer logs)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    values = torch.stack([loss.detach(), grad_norm.detach().float(), *(metrics[k] for k in METRICS[2:])])
    return Step(values, learning_rate)


def read_metrics(steps: list[Step]) -> list[dict]:
    """Each step's metrics as floats (one wait for the device for all of them) and its learning rate."""
    if not steps:
        return []
    values = torch.stack([s.values for s in steps]).tolist()
    return [{**dict(zip(METRICS, row)), "learning_rate": s.learning_rate} for row, s in zip(values, steps)]


def batch_indices(num_pairs: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The training pairs of step `step` (0-based): epoch e is a permutation seeded by (seed, e)."""
    per_epoch = math.ceil(num_pairs / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()
