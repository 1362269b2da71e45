"""Sequence log-probabilities of responses given a chat prompt: the one definition the trainer uses.

Owns how a (prompt messages, response) pair becomes token ids — the chat template with the generation
prompt for the prompt, the template of prompt + assistant message for the whole, the difference being
the completion (as TRL tokenizes conversational pairs) — and the summed log-probability of the
completion tokens under a causal LM, batched with right padding. Too-long sequences keep the last
`max_length // 2` prompt tokens and then cut the completion at `max_length`.
"""

from contextlib import nullcontext

import torch


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def tokenize_completion(tokenizer, prompt: list[dict], response: str, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    full_ids = _ids(tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}],
                                                  tokenize=True, return_dict=False))
    if full_ids[:len(prompt_ids)] == prompt_ids:
        completion_ids = full_ids[len(prompt_ids):]
    else:  # a template that rewrites earlier turns: tokenize the response on its own
        completion_ids = _ids(tokenizer(response, add_special_tokens=False)) + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(completion_ids) > max_length:
        prompt_ids = prompt_ids[-(max_length // 2):] if len(prompt_ids) > max_length // 2 else prompt_ids
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return prompt_ids, completion_ids


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA over fp32 master weights; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def completion_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Σ log p(completion token | previous tokens) for each (prompt_ids, completion_ids); fp32, on CPU."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    out = []
    for start in range(0, len(order), batch_size):  # similar lengths together: less padding
        chunk = [sequences[i] for i in order[start:start + batch_size]]
        width = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (p, c) in enumerate(chunk):
            ids[row, :len(p) + len(c)] = torch.tensor(p + c)
            mask[row, :len(p) + len(c)] = 1
            labels[row, len(p):len(p) + len(c)] = torch.tensor(c)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        with autocast_for(device):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        token_logps = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((token_logps * (targets != -100)).sum(-1).cpu())
    if not out:
        return torch.zeros(0)
    result = torch.empty(len(sequences))
    result[torch.tensor(order)] = torch.cat(out)
    return result
