"""Sequence log-probabilities of responses given a chat prompt: the one definition the trainer uses.

Owns how a pair (prompt messages, chosen, rejected) becomes token ids, exactly as TRL's DPOTrainer
tokenizes conversational pairs — the chat template of the prompt with the generation prompt, of prompt
+ assistant message for each response, the completion starting where the prompt and both full
sequences stop agreeing — and its truncation (`keep_end`, which the trainer asks TRL for: a sequence
longer than `max_length` keeps its last `max_length` tokens, i.e. the whole response and the most recent
context). On the same ids, the summed log-probability of the completion tokens under a causal LM, in
padding-free rows (`packing`): what the reference precompute, the held-out evaluation and TRL compute.
"""

from contextlib import nullcontext

import torch

from prism_assets.training import packing
from prism_assets.training.packing import Packed


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def keep_end(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """The last `max_length` tokens of prompt + completion, split back into (prompt, completion)."""
    excess = len(prompt_ids) + len(completion_ids) - max_length
    if excess <= 0:
        return prompt_ids, completion_ids
    if excess <= len(prompt_ids):
        return prompt_ids[excess:], completion_ids
    return [], completion_ids[excess - len(prompt_ids):]


def tokenize_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_length: int):
    """((prompt_ids, chosen_ids), (prompt_ids, rejected_ids)), each truncated on its own as TRL's collator does."""
    prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    full = [_ids(tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}],
                                               tokenize=True, return_dict=False)) for response in (chosen, rejected)]
    shared = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return tuple(keep_end(ids[:shared], ids[shared:], max_length) for ids in full)


def messages(prompt) -> list[dict]:
    """A stored prompt (chat messages, possibly with extra keys) as role/content messages."""
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def tokenize_pairs(tokenizer, pairs, max_length: int) -> tuple[list, list]:
    """(chosen sequences, rejected sequences) of a pairs frame (prompt, chosen, rejected columns)."""
    tokenized = [tokenize_pair(tokenizer, messages(p), c, r, max_length)
                 for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    return [t[0] for t in tokenized], [t[1] for t in tokenized]


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA over fp32 master weights; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def summed_logps(model, packed: Packed) -> torch.Tensor:
    """(sequences,) Σ log p(completion token | earlier tokens), fp32 — the one definition the step, the reference
    precompute and the held-out evaluation share. A padding-free row (`packing.pack`); the LM head runs only
    where a completion token is predicted: prompts never reach the vocabulary projection."""
    with packing.attention_of(model):
        hidden = model.get_decoder()(**packing.decoder_kwargs(packed)).last_hidden_state[0]
    logits = model.get_output_embeddings()(hidden[packed.predicting]).float()
    token_logps = logits.gather(1, packed.targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(packed.count, device=token_logps.device, dtype=torch.float32).index_add(0, packed.rows, token_logps)


@torch.no_grad()
def completion_logps(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 32) -> torch.Tensor:
    """summed_logps of each (prompt_ids, completion_ids), `batch_size` sequences to a packed row; on the host."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        with autocast_for(device):
            out.append(summed_logps(model, packing.pack(sequences[start:start + batch_size], device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def frozen_logps(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 32) -> torch.Tensor:
    """completion_logps with the model in eval mode (restored afterwards): the base model's or the policy's
    log-probs outside a training step."""
    was_training = model.training
    model.eval()
    try:
        return completion_logps(model, sequences, batch_size)
    finally:
        model.train(was_training)
