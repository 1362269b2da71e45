"""Padding-free rows: each sequence's log-probs and gradients are those of the sequence run alone."""

import pytest
import torch

from prism_assets.training import logps, packing
from prism_assets.training.logps import completion_logps, summed_logps

# fp32 on CPU: the same arithmetic in differently shaped matmuls and attention calls.
RTOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def sequences() -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(5, 700, (n,), generator=generator).tolist()

    return [
        (tokens(40), tokens(120)),
        ([], tokens(30)),  # keep_end truncation can leave no prompt: the first token has no predictor
        (tokens(7), tokens(1)),  # one completion token
        (tokens(300), tokens(200)),
        (tokens(1), tokens(2)),
    ]


def alone(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The definition, without packing or batching: one sequence through the plain model."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, :-1].float()
    token_logps = logits.log_softmax(-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
    return token_logps[max(len(prompt), 1) - 1 :].sum()


@pytest.mark.parametrize("chunk", [1024, 7])  # LOGITS_CHUNK: one chunk, or chunks that cut across sequences
def test_a_packed_row_gives_each_sequence_its_own_logps_and_gradients(model, monkeypatch, chunk):
    monkeypatch.setattr(logps, "LOGITS_CHUNK", chunk)
    seqs = sequences()
    model.zero_grad()
    packed = summed_logps(model, packing.pack(seqs, "cpu"))
    (packed * torch.arange(1.0, len(seqs) + 1)).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    single = torch.stack([alone(model, p, c) for p, c in seqs])
    (single * torch.arange(1.0, len(seqs) + 1)).sum().backward()
    assert model.config._attn_implementation == "sdpa"  # switched for packed rows only, then restored

    torch.testing.assert_close(packed, single.detach(), rtol=RTOL, atol=1e-3)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)
    # batched like the reference precompute: the same values, in the caller's order
    for batch_size in (2, 5):
        torch.testing.assert_close(completion_logps(model, seqs, batch_size), single.detach(), rtol=RTOL, atol=1e-3)


def plain_token_logps(head, states, targets):
    """The definition with all logits at once, autograd through them: what TokenLogps computes in chunks."""
    logits = head(states).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


# fp32: the same sums in other orders; bf16 autocast: the weight gradient is summed over chunks of bf16
# products in fp32 instead of one bf16 product (more exact, not bit-equal).
@pytest.mark.parametrize(("autocast", "tolerance"), [(False, 1e-5), (True, 2e-2)])
def test_the_lm_head_in_chunks_gives_the_values_and_gradients_of_all_logits_at_once(monkeypatch, autocast, tolerance):
    monkeypatch.setattr(logps, "LOGITS_CHUNK", 7)
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50)  # with a bias (Qwen's head has none): its gradient is checked too
    states = torch.randn(23, 16, generator=generator).requires_grad_()  # 23 positions: 3 chunks of 7 and 2
    targets = torch.randint(0, 50, (23,), generator=generator)
    upstream = torch.randn(23, generator=generator)
    runs = []
    for token_logps in (logps.token_logps, plain_token_logps):
        head.zero_grad()
        states.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            values = token_logps(head, states, targets)
        (values * upstream).sum().backward()
        runs.append([values.detach(), states.grad, head.weight.grad, head.bias.grad])
    for name, chunked, plain in zip(("values", "states", "weight", "bias"), *runs):
        assert chunked.dtype == plain.dtype, name
        torch.testing.assert_close(chunked, plain, rtol=tolerance, atol=tolerance, msg=name)


def test_pack_layout():
    seqs = [([1, 2], [3, 4, 5]), ([], [6, 7])]
    packed = packing.pack(seqs, "cpu")
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert packed.bounds == (0, 5, 7) and packed.cu_seq_lens.tolist() == [0, 5, 7] and packed.max_length == 5
    # completion tokens 3, 4, 5 are predicted from positions 1, 2, 3; token 7 from 5 (6 opens its sequence)
    assert packed.predicting.tolist() == [1, 2, 3, 5] and packed.targets.tolist() == [3, 4, 5, 7]
    assert packed.rows.tolist() == [0, 0, 0, 1] and packed.count == 2
    with pytest.raises(ValueError, match="at least one token"):
        packing.pack([([1], [2]), ([], [])], "cpu")


def test_sliding_window_models_are_refused_by_name(model):
    import copy

    sliding = copy.deepcopy(model)
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding_attention"):
        summed_logps(sliding, packing.pack(sequences(), "cpu"))


def heads_of(model) -> tuple[int, int, int]:
    config = model.config
    return config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads


def test_the_kernel_is_chosen_once_per_device_dtype_and_head_shape_and_said_why(model, monkeypatch):
    monkeypatch.setattr(packing, "_CHOSEN", {})
    choices: list[tuple[torch.device, torch.dtype, tuple[int, int, int]]] = []
    choose = packing._choose

    def recorded(*args):
        choices.append(args)
        return choose(*args)

    monkeypatch.setattr(packing, "_choose", recorded)
    for _ in range(2):
        summed_logps(model, packing.pack(sequences(), "cpu"))
    # decided by the model's own forward, for its heads (4 query, 2 key/value, dimension 16), once
    assert choices == [(torch.device("cpu"), torch.float32, heads_of(model))]
    assert packing.kernels_used() == (
        "cpu float32 (4 heads, 2 kv, dim 16): sdpa per sequence — "
        "flash varlen needs CUDA and bf16/fp16 (cpu, torch.float32)"
    )


def test_the_kernel_self_check_fails_wrong_kernels_and_runs_inside_a_checkpointed_layer():
    cpu, exact = torch.device("cpu"), packing.KERNELS[packing.SDPA_PER_SEQUENCE]

    def leaky(q, k, v, bounds, cu, max_length, scaling):  # the whole row as one sequence: attends across them
        return exact(q, k, v, (bounds[0], bounds[-1]), cu, max_length, scaling)

    def missing(*args):
        raise RuntimeError("no kernel image for this device")

    assert packing.self_check(leaky, cpu, torch.float32)[1].startswith("disagreed")
    assert packing.self_check(missing, cpu, torch.float32) == (
        False,
        "failed its self-check: RuntimeError: no kernel image for this device",
    )

    def no_small_heads(q, k, v, *args):  # a kernel built without the model's head dimension
        if q.shape[-1] < 32:
            raise RuntimeError(f"head dimension {q.shape[-1]} not supported")
        return exact(q, k, v, *args)

    # checked at the model's own head shape: a shape the kernel lacks is caught before training, not during it
    assert packing.self_check(no_small_heads, cpu, torch.float32)[0]
    assert packing.self_check(no_small_heads, cpu, torch.float32, (4, 2, 16)) == (
        False,
        "failed its self-check: RuntimeError: head dimension 16 not supported",
    )
    assert packing.self_check(exact, cpu, torch.float32, (14, 2, 64))[0]  # Qwen2.5-0.5B's heads
    # The check first runs inside a model's forward: under no_grad (evaluation), or in a layer whose
    # activations gradient checkpointing recomputes in backward — where the check does not run again.
    with torch.no_grad():
        assert packing.self_check(exact, cpu, torch.float32)[0]
    outcomes: list[tuple[bool, str]] = []

    def layer(x):
        if not outcomes:
            outcomes.append(packing.self_check(exact, cpu, torch.float32))
        return (2 * x).sin()

    x = torch.randn(5, requires_grad=True)
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert outcomes[0][0], outcomes
    torch.testing.assert_close(x.grad, 2 * (2 * x.detach()).cos())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_bf16_flash_varlen_is_used_and_matches(model):
    device = torch.device("cuda")
    cuda_model = model.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed = summed_logps(cuda_model, packing.pack(sequences(), device))
    # the kernel the model's forward chose, for its own heads
    assert "cuda:0 bfloat16 (4 heads, 2 kv, dim 16): flash varlen" in packing.kernels_used(), packing.kernels_used()
    single = torch.stack([alone(model.float().cpu(), p, c) for p, c in sequences()])
    torch.testing.assert_close(packed.cpu(), single.detach(), rtol=2e-2, atol=1.0)  # bf16 activations
