"""Peak memory and time of a training step's LM head: all logits at once against `logps.token_logps` in chunks.

The LM head of a DPO step on the Qwen2.5-0.5B shape (hidden 896, vocabulary 151,936) over the completion
positions of one batch (8 pairs × 2 responses × ≈ 140 tokens ≈ 2.2k positions): forward and backward, as
`plain` (the projection's logits materialized whole, fp32 log-softmax, autograd through them: what the step
did before) and as `chunked` (`logps.TokenLogps`, LOGITS_CHUNK positions at a time in both passes). On CUDA
in bf16 autocast over fp32 weights, as the trainer runs; on CPU in fp32. Each variant runs in its own
process, so its peak (GPU: max allocated; CPU: the growth of peak resident memory) is its own, and the
table prints the ratio chunked ÷ plain. Both variants' values and gradients (of the last timed step) are compared
before the table is printed: a mismatch stops the benchmark.
Usage: python benchmarks/lm_head.py [--positions 2200] [--repeat 5] [--device auto|cpu|cuda]
"""

import argparse
import multiprocessing
import queue as queues
import resource
import statistics
import time
import traceback

import torch

from prism_assets.training import logps

HIDDEN, VOCAB = 896, 151_936  # Qwen2.5-0.5B: the LM head is the tied token embedding


def plain(head, states, targets):
    logits = head(states).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


VARIANTS = {"plain": plain, "chunked": logps.token_logps}


def inputs(positions: int, device: str):
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02, generator=generator)
    states = torch.randn(positions, HIDDEN, generator=generator)
    targets = torch.randint(0, VOCAB, (positions,), generator=generator)
    upstream = torch.randn(positions, generator=generator)
    return head.to(device), states.to(device).requires_grad_(), targets.to(device), upstream.to(device)


def step(variant: str, head, states, targets, upstream):
    head.zero_grad(set_to_none=True)
    states.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=states.is_cuda):
        values = VARIANTS[variant](head, states, targets)
    (values * upstream).sum().backward()
    return values.detach(), states.grad, head.weight.grad


def measure(variant: str, positions: int, repeat: int, device: str, queue) -> None:
    """In a fresh process: one step to warm up, then `repeat` timed steps; the peak of all above the inputs'.
    What goes wrong goes back to the parent as its traceback."""
    try:
        queue.put(timed(variant, positions, repeat, device))
    except BaseException:  # the parent prints it
        queue.put({"error": traceback.format_exc()})


def timed(variant: str, positions: int, repeat: int, device: str) -> dict:
    head, states, targets, upstream = inputs(positions, device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the process's peak so far: its imports and the inputs
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(variant, head, states, targets, upstream)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        result = None  # the last step's gradients are not kept alive through this one
        started = time.perf_counter()
        result = step(variant, head, states, targets, upstream)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = (
        torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) - base
    assert result is not None  # repeat ≥ 1
    values, state_grads, weight_grads = (t.float().cpu() for t in result)
    rows = torch.cat([targets.cpu()[:500], torch.arange(0, VOCAB, 151)])  # target rows and others, to compare
    return {
        "ms": 1e3 * statistics.median(times),
        "peak_gib": peak / 2**30,
        "result": [values.numpy(), state_grads.numpy(), weight_grads[rows].numpy()],
    }


def run(variant: str, positions: int, repeat: int, device: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(variant, positions, repeat, device, queue))
    process.start()
    while True:  # a child that dies without a word (killed, out of memory) must not leave the parent waiting
        try:
            result = queue.get(timeout=5)
            break
        except queues.Empty:
            if not process.is_alive():
                raise SystemExit(
                    f"the {variant} variant's process ended (exit code {process.exitcode}) without a result"
                ) from None
    process.join()
    if "error" in result:
        raise SystemExit(f"the {variant} variant failed on {device}:\n{result['error']}")
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--positions", type=int, default=2200, help="completion positions in the step")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args()
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    precision = "bf16 autocast" if device == "cuda" else "fp32"
    print(
        f"LM head {HIDDEN} → {VOCAB:,}, {args.positions} positions, forward + backward, {device} {precision}, "
        f"LOGITS_CHUNK {logps.LOGITS_CHUNK}; median of {args.repeat}"
    )
    results = {name: run(name, args.positions, args.repeat, device) for name in VARIANTS}
    tolerance = 2e-2 if device == "cuda" else 1e-4
    names = ("values", "state gradients", "weight gradients (a sample of rows)")
    for name, a, b in zip(names, *(r["result"] for r in results.values())):
        torch.testing.assert_close(
            torch.from_numpy(b),
            torch.from_numpy(a),
            rtol=tolerance,
            atol=tolerance,
            msg=f"chunked and plain differ in {name}",
        )
    print("| variant | ms/step | peak memory above the inputs (GiB) |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ms']:.1f} | {r['peak_gib']:.2f} |")
    plain_, chunked = results["plain"], results["chunked"]
    print(
        f"chunked ÷ plain: time {chunked['ms'] / plain_['ms']:.2f}×, "
        f"peak memory {chunked['peak_gib'] / plain_['peak_gib']:.2f}×"
    )


if __name__ == "__main__":
    main()
