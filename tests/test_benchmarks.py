"""The DPO throughput benchmark runs end to end in its --tiny CPU mode, and its GPU shape tokenizes as PRISM's pairs
(its numbers are never asserted)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prism_assets.experiments import ExperimentSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dpo_throughput_tiny_prints_every_variant(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/dpo_throughput.py",
            "--tiny",
            "--steps",
            "4",
            "--warm",
            "2",
            "--packed",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| stock",
        "| trl+refs",
        "| project",
        "| stock ×2 packed",
        "| project ×2 packed",
        "| project, held-out every 25",
        "| project, held-out every 100",
        "| project ×2 packed, held-out every 25",
        "| project ×2 packed, held-out every 100",
    ]
    grid_runs = (1 + (8 + ExperimentSpec.model_fields["random_splits"].default) * 2) * 5  # the research grid, 5 seeds
    assert "project/stock per run:" in done.stdout
    assert f"grid of {grid_runs} runs × 2000 steps, training only" in done.stdout
    assert "pairs at a run's start: tokenized" in done.stdout


@pytest.fixture(scope="module")
def throughput():
    """benchmarks/dpo_throughput.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("dpo_throughput", REPO / "benchmarks" / "dpo_throughput.py")
    assert spec is not None and spec.loader is not None  # a .py file's path always has a source loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_qwen05_shape_directory_loads_a_tokenizer_that_gives_prism_lengths(throughput, tmp_path):
    """The GPU table's pairs: the 0.5B-shape directory loaded as every variant loads it (AutoTokenizer) must
    encode the benchmark's synthetic pairs at PRISM's ≈ 434 tokens a pair — a tokenizer that loads as another
    class gives other sequences, and the benchmark refuses to print a table of them."""
    from transformers import AutoConfig, AutoTokenizer

    directory = throughput.qwen05_directory(tmp_path / "qwen2.5-0.5b-shape")
    config = AutoConfig.from_pretrained(directory)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (151936, 896, 24)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    pairs = throughput.synthetic_pairs(64, throughput.word_list(tokenizer), np.random.default_rng(0))
    assert 400 <= throughput.check_lengths(tokenizer, pairs) <= 500
    # a text of n picked words is n tokens (the first after a newline may split)
    text = " ".join(throughput.word_list(tokenizer)[:50])
    assert len(tokenizer(" " + text, add_special_tokens=False)["input_ids"]) == 50

    # what the directory used to hold: a word-level tokenizer.json, which transformers loads as a Qwen2Tokenizer
    # with no merges — every word vanishes; the benchmark stops instead of timing near-empty sequences
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(
        models.WordLevel(
            vocab={"<unk>": 0, "<|im_end|>": 1, **{w: i + 2 for i, w in enumerate(throughput.word_list(tokenizer))}},
            unk_token="<unk>",
        )
    )
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = tokenizer.chat_template
    fast.save_pretrained(directory)
    with pytest.raises(SystemExit, match="not PRISM's"):
        throughput.check_lengths(AutoTokenizer.from_pretrained(directory), pairs)
