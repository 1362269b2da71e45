"""Sequence log-probabilities of responses given a chat prompt: the one definition the trainer uses.

Owns how a pair (prompt messages, chosen, rejected) becomes token ids, exactly as TRL's DPOTrainer
tokenizes conversational pairs — the chat template of the prompt with the generation prompt, of prompt
+ assistant message for each response, the completion starting where the prompt and both full
sequences stop agreeing — and its truncation (`keep_end`, which the trainer asks TRL for: a sequence
longer than `max_length` keeps its last `max_length` tokens, i.e. the whole response and the most recent
context). On the same ids, the summed log-probability of the completion tokens under a causal LM, in
padding-free rows (`packing`): what the reference precompute, the held-out evaluation and TRL compute.
The reference precompute stores the ids beside its log-probs (`token_columns`); a run reads them back
(`sequences_of`) instead of tokenizing its pairs again — after checking a sample against its own tokenizer.
"""

from contextlib import nullcontext

import numpy as np
import torch

from prism_assets.training import packing
from prism_assets.training.run_config import TOKEN_COLUMNS

LOGITS_CHUNK = 1024  # positions whose logits exist at once outside training (≈ 1.2 GiB in fp32 at 152k tokens)
CHECKED_PAIRS = 8  # stored ids checked against the tokenizer: the longest pairs (truncated, if any are) and the first


def common_prefix_length(a: list[int], b: list[int]) -> int:
    if a[:len(b)] == b[:len(a)]:  # the usual case, compared in C: one is a prefix of the other
        return min(len(a), len(b))
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


def split_pair(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int], max_length: int):
    """((prompt_ids, chosen_ids), (prompt_ids, rejected_ids)) from the prompt's and both full conversations'
    ids: the completion starts where all three stop agreeing; each sequence truncated on its own (keep_end)."""
    shared = min(common_prefix_length(prompt_ids, ids) for ids in (chosen_full, rejected_full))
    return tuple(keep_end(ids[:shared], ids[shared:], max_length) for ids in (chosen_full, rejected_full))


def messages(prompt) -> list[dict]:
    """A stored prompt (chat messages, possibly with extra keys) as role/content messages."""
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def tokenize_pairs(tokenizer, pairs, max_length: int) -> tuple[list, list]:
    """(chosen sequences, rejected sequences) of a pairs frame (prompt, chosen, rejected columns), as TRL's
    DPOTrainer tokenizes conversational pairs: the chat template of the prompt with the generation prompt and
    of prompt + assistant response, encoded without added special tokens (what `apply_chat_template(...,
    tokenize=True)` does one text at a time; here every text of the frame goes to the tokenizer in one batch)."""
    prompts = [messages(p) for p in pairs["prompt"]]
    texts = [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False) for prompt in prompts]
    for column in ("chosen", "rejected"):
        texts += [tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
                  for prompt, response in zip(prompts, pairs[column])]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    n = len(prompts)
    split = [split_pair(ids[i], ids[n + i], ids[2 * n + i], max_length) for i in range(n)]
    return [s[0] for s in split], [s[1] for s in split]


def token_columns(chosen: list, rejected: list) -> dict:
    """The columns (TOKEN_COLUMNS) holding each pair's two (prompt_ids, completion_ids) sequences, as int32 arrays."""
    columns = ([p for p, _ in chosen], [c for _, c in chosen], [p for p, _ in rejected], [c for _, c in rejected])
    return {name: [np.asarray(ids, dtype=np.int32) for ids in values] for name, values in zip(TOKEN_COLUMNS, columns)}


def sequences_of(tokenizer, pairs, max_length: int) -> tuple[list, list, bool]:
    """(chosen sequences, rejected sequences, whether they were stored) of a pairs frame: the ids the reference
    precompute stored (TOKEN_COLUMNS), or `tokenize_pairs`. Stored ids must be this tokenizer's at this max_length:
    a sample (the pairs with the longest stored sequences — a truncation at another max_length shows there first —
    and the first pairs) is tokenized again, and any difference is an error naming the pair."""
    if not set(TOKEN_COLUMNS) <= set(pairs.columns):
        return *tokenize_pairs(tokenizer, pairs, max_length), False
    for name in TOKEN_COLUMNS:
        absent = pairs[name].isna()  # None or NaN; an array of ids, even empty, is a value
        if absent.any():
            raise ValueError(f"pair {pairs['pair_id'][absent].iloc[0]!r} has no {name} ({int(absent.sum())} of "
                             f"{len(pairs)} pairs lack stored token ids): store them for every pair or for none")
    stored = [[np.asarray(ids).tolist() for ids in pairs[name]] for name in TOKEN_COLUMNS]
    chosen, rejected = list(zip(stored[0], stored[1])), list(zip(stored[2], stored[3]))
    lengths = np.array([max(len(p) + len(c), len(q) + len(r)) for (p, c), (q, r) in zip(chosen, rejected)], dtype=int)
    longest = np.argsort(-lengths, kind="stable")[:CHECKED_PAIRS // 2].tolist()
    sample = sorted({*longest, *range(min(CHECKED_PAIRS // 2, len(pairs)))})
    again = tokenize_pairs(tokenizer, pairs.iloc[sample], max_length)
    for position, i in enumerate(sample):
        if (chosen[i], rejected[i]) != (again[0][position], again[1][position]):
            raise ValueError(f"pair {pairs['pair_id'].iloc[i]!r}: its stored token ids ({', '.join(TOKEN_COLUMNS)}) are "
                             f"not what {getattr(tokenizer, 'name_or_path', 'the tokenizer')} gives at max_length "
                             f"{max_length}; they were made with another tokenizer or max_length (rematerialize "
                             "reference_logps, or drop those columns to tokenize here)")
    return chosen, rejected, True


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA over fp32 master weights; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def summed_logps(model, packed: packing.Packed) -> torch.Tensor:
    """(sequences,) Σ log p(completion token | earlier tokens), fp32 — the one definition the step, the reference
    precompute and the held-out evaluation share. A padding-free row (`packing.pack`); the LM head runs only
    where a completion token is predicted: prompts never reach the vocabulary projection. Without gradients
    (reference precompute, held-out evaluation) the LM head runs `LOGITS_CHUNK` positions at a time: the
    logits of a 32-sequence row over Qwen's 152k-token vocabulary would otherwise take several GiB at once."""
    with packing.attention_of(model):
        hidden = model.get_decoder()(**packing.decoder_kwargs(packed)).last_hidden_state[0]
    head, states = model.get_output_embeddings(), hidden[packed.predicting]
    chunk = max(len(states), 1) if torch.is_grad_enabled() else LOGITS_CHUNK
    token_logps = torch.cat([_token_logps(head, states[i:i + chunk], packed.targets[i:i + chunk])
                             for i in range(0, len(states), chunk)] or [states.new_zeros(0, dtype=torch.float32)])
    return torch.zeros(packed.count, device=token_logps.device, dtype=torch.float32).index_add(0, packed.rows, token_logps)


def _token_logps(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(states).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


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
