#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one go: the GPU tests (pytest -m gpu: FlashAttention's varlen kernel against
# per-sequence attention, the training step against TRL's DPOTrainer in bf16, the trainer end to end and resumed),
# the LM head's memory benchmark and the DPO throughput benchmark on the Qwen2.5-0.5B shape. Writes device.txt,
# gpu-tests.log, lm_head.log and dpo_throughput.log (its last lines: the README's table) into OUTPUT_DIR; exits
# non-zero if any part failed.
#
#   scripts/gpu-check.sh [OUTPUT_DIR [BENCHMARK_ARGS...]]     (default: gpu-check/; e.g. --steps 100)
#
# PYTHON (default python3) must import torch with CUDA, transformers, trl, datasets, pytest and this project
# (an environment from `pip install -e '.[test]'` with a CUDA build of torch, or PYTHONPATH=$PWD). PACKED, STEPS
# and WARM set the benchmark's --packed (3), --steps (60) and --warm (10); WORKDIR where it builds the 0.5B model,
# its pairs and one 5.5 GiB checkpoint (default: a temporary directory, removed afterwards).
set -uo pipefail
out=$(realpath -m -- "${1:-gpu-check}")  # relative to where it is run, before the cd below
workdir=$(realpath -m -- "${WORKDIR:-$(mktemp -d)}")
[ -n "${WORKDIR:-}" ] || trap 'rm -rf "$workdir"' EXIT
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{ nvidia-smi -L; "$python" -c 'import torch, transformers, trl
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, trl {trl.__version__}")
assert torch.cuda.is_available(), "torch sees no CUDA device"'; } 2>&1 | tee "$out/device.txt" || exit 1

# Only the modules that hold GPU tests: the others import what a GPU machine need not have (Dagster, a browser).
"$python" -m pytest -m gpu -p no:cacheprovider -rA -q $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
"$python" benchmarks/lm_head.py 2>&1 | tee "$out/lm_head.log"
head_benchmark=${PIPESTATUS[0]}
"$python" benchmarks/dpo_throughput.py --packed "${PACKED:-3}" --steps "${STEPS:-60}" --warm "${WARM:-10}" \
  --workdir "$workdir" "${@:2}" 2>&1 | grep --line-buffered -v "^Loading\|^Writing" | tee "$out/dpo_throughput.log"
benchmark=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; lm_head: exit $head_benchmark; dpo_throughput: exit $benchmark" | tee -a "$out/device.txt"
[ "$tests" = 0 ] && [ "$benchmark" = 0 ] && [ "$head_benchmark" = 0 ]
