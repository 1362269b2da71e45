"""Padding-free batches: sequences laid end to end in one row, each attending only to itself.

Owns `pack` (one row, positions restarting per sequence, completion positions recorded on the host) and
`packed_attention`, the transformers attention used while a packed row is computed: PyTorch's varlen
FlashAttention on CUDA, or SDPA per sequence, chosen once per device, dtype and head shape after a
self-check (`kernel_for`). README, "Training step", explains why and what was measured.
"""

import functools
import inspect
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

PACKED_ATTENTION = "prism_packed"
FLASH_VARLEN, SDPA_PER_SEQUENCE = "flash varlen", "sdpa per sequence"


@dataclass
class Packed:
    """S sequences in one row of N tokens; M of them are completion tokens predicted by their previous token."""

    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N), 0 at each sequence's first token
    cu_seq_lens: torch.Tensor  # (S + 1,) int32: where each sequence starts, then N
    bounds: tuple[int, ...]  # the same, on the host
    max_length: int  # the longest sequence
    predicting: torch.Tensor  # (M,) positions whose next token is a completion token
    targets: torch.Tensor  # (M,) those completion tokens
    rows: torch.Tensor  # (M,) the sequence each belongs to

    @property
    def count(self) -> int:
        return len(self.bounds) - 1


def pack(sequences: list[tuple[list[int], list[int]]], device) -> Packed:
    """One padding-free row of (prompt_ids, completion_ids) sequences, built on the host and sent in three copies."""
    device = torch.device(device)
    lengths = np.array([len(p) + len(c) for p, c in sequences], dtype=np.int64)
    if len(lengths) == 0 or (lengths == 0).any():
        raise ValueError("pack: every sequence needs at least one token")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter(
        itertools.chain.from_iterable(p + c for p, c in sequences), dtype=np.int64, count=int(bounds[-1])
    )
    positions = np.arange(bounds[-1]) - np.repeat(bounds[:-1], lengths)
    # Completion token at absolute index a is predicted by a − 1; a sequence's first token has no predictor.
    completion = [
        np.arange(start + max(len(p), 1), start + len(p) + len(c)) for start, (p, c) in zip(bounds[:-1], sequences)
    ]
    targets_at = np.concatenate(completion)
    rows = np.repeat(np.arange(len(sequences)), [len(c) for c in completion])
    tokens = torch.from_numpy(np.stack([ids, positions]))
    index = torch.from_numpy(np.stack([targets_at - 1, ids[targets_at], rows]))
    cu = torch.from_numpy(bounds.astype(np.int32))
    if device.type == "cuda":  # pinned, so the copies neither block the host nor wait for the device
        tokens, index, cu = tokens.pin_memory(), index.pin_memory(), cu.pin_memory()
    tokens, index, cu = (t.to(device, non_blocking=True) for t in (tokens, index, cu))
    return Packed(
        input_ids=tokens[0:1],
        position_ids=tokens[1:2],
        cu_seq_lens=cu,
        bounds=tuple(bounds.tolist()),
        max_length=int(lengths.max()),
        predicting=index[0],
        targets=index[1],
        rows=index[2],
    )


def decoder_kwargs(packed: Packed) -> dict:
    """What the decoder's forward takes for a packed row (transformers' flash-attention kwargs + host bounds)."""
    return {
        "input_ids": packed.input_ids,
        "position_ids": packed.position_ids,
        "use_cache": False,
        "cu_seq_lens_q": packed.cu_seq_lens,
        "cu_seq_lens_k": packed.cu_seq_lens,
        "max_length_q": packed.max_length,
        "max_length_k": packed.max_length,
        "packed_bounds": packed.bounds,
    }


@contextmanager
def attention_of(model):
    """The model's attention is `packed_attention` inside the block, whatever it was before (and after)."""
    config = model.config
    sliding = [t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"]
    if sliding or getattr(config, "use_sliding_window", False):
        raise ValueError(
            f"{type(model).__name__}: packed attention implements full causal attention only; "
            f"this model has {sorted(set(sliding)) or 'sliding-window'} layers"
        )
    _register()
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)  # a dict entry: idempotent


def packed_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_bounds: tuple[int, ...] | None = None,
    cu_seq_lens_q=None,
    max_length_q: int | None = None,
    **kwargs,
):
    """transformers attention function: query (1, Hq, N, D), key/value (1, Hkv, N, D) → ((1, N, Hq, D), None)."""
    if packed_bounds is None:
        raise ValueError("packed attention takes packed rows only (prism_assets.training.packing.pack)")
    if dropout:
        raise ValueError("packed attention has no attention dropout (the model's attention_dropout must be 0)")
    heads = (query.shape[1], key.shape[1], query.shape[-1])
    kernel = KERNELS[kernel_for(query.device, _compute_dtype(query), heads)]
    return kernel(query, key, value, packed_bounds, cu_seq_lens_q, max_length_q, scaling), None


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return query.dtype


def _per_sequence(query, key, value, bounds, cu_seq_lens, max_length, scaling):
    dtype = _compute_dtype(query)
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e].to(dtype),
            key[:, :, s:e].to(dtype),
            value[:, :, s:e].to(dtype),
            is_causal=True,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2)


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(query, key, value, bounds, cu_seq_lens, max_length, scaling):
    from torch.nn.attention.varlen import varlen_attn

    dtype = _compute_dtype(query)
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))  # (N, H, D)
    parameters = _varlen_parameters()
    options = {}
    if "scale" in parameters:
        options["scale"] = scaling
    elif scaling is not None:  # torch 2.10 scales by D^-1/2 only: scale the queries to the model's factor
        q = q * (scaling * q.shape[-1] ** 0.5)
    # torch 2.10 spells causality is_causal=True; later releases window_size=(-1, 0).
    options.update({"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True})
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    output = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)
    assert isinstance(output, torch.Tensor)  # a tuple only with return_aux
    return output.unsqueeze(0)


KERNELS = {FLASH_VARLEN: _flash_varlen, SDPA_PER_SEQUENCE: _per_sequence}
SELF_CHECK_HEADS = (8, 2, 64)  # query heads, key/value heads, head dimension: a grouped-query shape
_CHOSEN: dict[
    tuple[str, torch.dtype, tuple[int, int, int]], tuple[str, str]
] = {}  # (device, dtype, heads) → (kernel, why)


def kernel_for(device: torch.device, dtype: torch.dtype, heads: tuple[int, int, int] = SELF_CHECK_HEADS) -> str:
    """The attention kernel packed rows use on this device, in this dtype, for `heads` (query heads, key/value heads,
    head dimension); decided once (see the module doc)."""
    key = (str(device), dtype, cast(tuple[int, int, int], tuple(heads)))
    if key not in _CHOSEN:
        _CHOSEN[key] = _choose(device, dtype, key[2])
    return _CHOSEN[key][0]


def _choose(device: torch.device, dtype: torch.dtype, heads: tuple[int, int, int]) -> tuple[str, str]:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return SDPA_PER_SEQUENCE, f"flash varlen needs CUDA and bf16/fp16 ({device.type}, {dtype})"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return SDPA_PER_SEQUENCE, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    agrees, note = self_check(_flash_varlen, device, dtype, heads)
    return (FLASH_VARLEN if agrees else SDPA_PER_SEQUENCE), f"flash varlen {note}"


def self_check(
    kernel, device, dtype, heads: tuple[int, int, int] = SELF_CHECK_HEADS, tolerance: float = 5e-2
) -> tuple[bool, str]:
    """Does `kernel` give per-sequence causal attention's outputs and gradients on a small row of three sequences
    with these `heads` (query heads, key/value heads, head dimension) and a non-default scale? Relative to the
    largest value: two bf16 kernels differ by ~1e-2 at most, a wrong mask, scale or head grouping by O(1).
    Runs isolated from the caller's autograd state — it is first called inside a model's forward, which may be
    under no_grad (evaluation) or inside a checkpointed layer, whose saved-tensor hooks must not see these
    tensors (the recomputation does not repeat them)."""
    generator = torch.Generator(device=device).manual_seed(0)
    bounds = (0, 5, 70, 200)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    query_heads, kv_heads, dim = heads
    q, k, v = (
        torch.randn(1, n, 200, dim, device=device, dtype=dtype, generator=generator, requires_grad=True)
        for n in (query_heads, kv_heads, kv_heads)
    )
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        try:
            out = kernel(q, k, v, bounds, cu, 130, 0.1)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        except Exception as error:  # e.g. no kernel for this GPU or build: the caller uses the exact per-sequence path
            return False, f"failed its self-check: {type(error).__name__}: {error}"
        reference = _per_sequence(q, k, v, bounds, cu, 130, 0.1)
        reference_grads = torch.autograd.grad(reference.float().square().sum(), (q, k, v))
    pairs = [(a.detach().float(), b.detach().float()) for a, b in zip((out, *grads), (reference, *reference_grads))]
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in pairs)
    if worst > tolerance:
        return False, f"disagreed with per-sequence attention (max relative error {worst:.3g})"
    return True, f"matched per-sequence attention (max relative error {worst:.3g})"


def kernels_used() -> str:
    """Which kernel packed attention used on each device, dtype and head shape so far, and why (run metadata)."""
    return "; ".join(
        f"{device} {str(dtype).removeprefix('torch.')} ({query_heads} heads, {kv_heads} kv, dim {dim}): "
        f"{kernel} — {note}"
        for (device, dtype, (query_heads, kv_heads, dim)), (kernel, note) in _CHOSEN.items()
    )
