"""Sequence log-probabilities of responses given a chat prompt: the one definition the trainer uses.

Owns how a pair becomes token ids (exactly as TRL's DPOTrainer tokenizes conversational pairs, with
`keep_end` truncation), the token ids stored beside the reference log-probs and checked when read back
(`sequences_of`), and the summed completion log-probs under a causal LM in padding-free rows, the LM head
applied a chunk of positions at a time in forward and backward (`TokenLogps`).
"""

from contextlib import nullcontext

import numpy as np
import torch

from prism_assets.training import packing
from prism_assets.training.run_folder import TOKEN_COLUMNS

LOGITS_CHUNK = 1024  # positions whose logits exist at once (fp32, 152k tokens: 0.6 GiB; a chunk's peak ≈ 1.2 GiB)
CHECKED_PAIRS = 8  # stored ids checked against the tokenizer: the longest pairs (truncated, if any are) and the first


def common_prefix_length(a: list[int], b: list[int]) -> int:
    if a[: len(b)] == b[: len(a)]:  # the usual case, compared in C: one is a prefix of the other
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
    return [], completion_ids[excess - len(prompt_ids) :]


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
        texts += [
            tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
            for prompt, response in zip(prompts, pairs[column])
        ]
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
            raise ValueError(
                f"pair {pairs['pair_id'][absent].iloc[0]!r} has no {name} ({int(absent.sum())} of "
                f"{len(pairs)} pairs lack stored token ids): store them for every pair or for none"
            )
    stored = [[np.asarray(ids).tolist() for ids in pairs[name]] for name in TOKEN_COLUMNS]
    chosen, rejected = list(zip(stored[0], stored[1])), list(zip(stored[2], stored[3]))
    lengths = np.array([max(len(p) + len(c), len(q) + len(r)) for (p, c), (q, r) in zip(chosen, rejected)], dtype=int)
    longest = np.argsort(-lengths, kind="stable")[: CHECKED_PAIRS // 2].tolist()
    sample = sorted({*longest, *range(min(CHECKED_PAIRS // 2, len(pairs)))})
    again = tokenize_pairs(tokenizer, pairs.iloc[sample], max_length)
    for position, i in enumerate(sample):
        if (chosen[i], rejected[i]) != (again[0][position], again[1][position]):
            raise ValueError(
                f"pair {pairs['pair_id'].iloc[i]!r}: its stored token ids ({', '.join(TOKEN_COLUMNS)}) are "
                f"not what {getattr(tokenizer, 'name_or_path', 'the tokenizer')} gives at max_length "
                f"{max_length}; they were made with another tokenizer or max_length (rematerialize "
                "reference_logps, or drop those columns to tokenize here)"
            )
    return chosen, rejected, True


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA over fp32 master weights; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def summed_logps(model, packed: packing.Packed) -> torch.Tensor:
    """(sequences,) Σ log p(completion token | earlier tokens), fp32 — the one definition the step, the reference
    precompute and the held-out evaluation share. A padding-free row (`packing.pack`); the LM head runs only
    where a completion token is predicted: prompts never reach the vocabulary projection, and the logits of those
    positions exist only `LOGITS_CHUNK` positions at a time, in the forward pass and in the backward pass
    (`TokenLogps`): a training step's ≈ 2.2k completion positions over Qwen's 152k-token vocabulary would
    otherwise hold several GiB of logits and their gradients at once."""
    with packing.attention_of(model):
        hidden = model.get_decoder()(**packing.decoder_kwargs(packed)).last_hidden_state[0]
    values = token_logps(model.get_output_embeddings(), hidden[packed.predicting], packed.targets)
    return torch.zeros(packed.count, device=values.device, dtype=torch.float32).index_add(0, packed.rows, values)


def token_logps(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(positions,) log p(target | state) through the LM head (a Linear), fp32, in chunks (`TokenLogps`); its
    matmuls in the autocast dtype where autocast is on (as the head's own forward would run them)."""
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"the model's output embeddings are a {type(head).__name__}, not a Linear layer: "
            "completion log-probs need the vocabulary projection's weight"
        )
    device = states.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    return TokenLogps.apply(states, head.weight, head.bias, targets, dtype)


class TokenLogps(torch.autograd.Function):
    """log p(target) = logit[target] − logsumexp(logits) at each position, logits = states·Wᵀ (+ b), computed
    `LOGITS_CHUNK` positions at a time in forward and again in backward, so the (positions × vocabulary) logits
    and their gradient never exist whole. The matmuls run in `dtype` (what autocast's linear would use: bf16 on
    CUDA), the softmax in fp32. Saved for backward: the states, the targets and each position's logsumexp.
    Gradient: ∂/∂logits = g·(onehot(target) − softmax), then through the projection."""

    @staticmethod
    def forward(ctx, states, weight, bias, targets, dtype):
        chunk, device = LOGITS_CHUNK, states.device.type
        with torch.autocast(device, enabled=False):
            w, b, s = _cast(weight, dtype), _cast(bias, dtype), states.to(dtype)
            out = torch.empty(len(s), device=states.device, dtype=torch.float32)
            lse = torch.empty_like(out)
            for i in range(0, len(s), chunk):
                logits = torch.nn.functional.linear(s[i : i + chunk], w, b).float()
                lse[i : i + chunk] = torch.logsumexp(logits, dim=-1)
                out[i : i + chunk] = logits.gather(1, targets[i : i + chunk, None]).squeeze(1) - lse[i : i + chunk]
        ctx.save_for_backward(states, weight, bias, targets, lse)
        ctx.dtype = dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        states, weight, bias, targets, lse = ctx.saved_tensors
        dtype, chunk, (need_states, need_weight, need_bias) = ctx.dtype, LOGITS_CHUNK, ctx.needs_input_grad[:3]
        accumulate = torch.promote_types(dtype, torch.float32)  # the weight's and bias's gradient sums
        with torch.autocast(states.device.type, enabled=False):  # a backward() called under autocast changes nothing
            w, b, s = _cast(weight, dtype), _cast(bias, dtype), states.to(dtype)
            grad_states = torch.empty_like(states) if need_states else None
            grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
            grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias else None
            for i in range(0, len(s), chunk):
                g = grad[i : i + chunk, None].float()
                probs = (
                    torch.nn.functional.linear(s[i : i + chunk], w, b).float().sub_(lse[i : i + chunk, None]).exp_()
                )
                grad_logits = probs.mul_(-g).scatter_add_(1, targets[i : i + chunk, None], g).to(dtype)
                if grad_states is not None:
                    grad_states[i : i + chunk] = grad_logits @ w
                if grad_weight is not None and dtype == accumulate:  # no (vocabulary × hidden) product beside the sum
                    grad_weight.addmm_(grad_logits.t(), s[i : i + chunk])
                elif grad_weight is not None:  # each chunk's bf16 product summed in fp32
                    grad_weight.add_(grad_logits.t() @ s[i : i + chunk])
                if grad_bias is not None:
                    grad_bias.add_(grad_logits.sum(0))
        return (
            grad_states,
            _cast(grad_weight, weight.dtype),
            _cast(grad_bias, None if bias is None else bias.dtype),
            None,
            None,
        )


def _cast(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)


@torch.no_grad()
def completion_logps(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 32) -> torch.Tensor:
    """summed_logps of each (prompt_ids, completion_ids), `batch_size` sequences to a packed row; on the host."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        with autocast_for(device):
            out.append(summed_logps(model, packing.pack(sequences[start : start + batch_size], device)).cpu())
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
