"""The embedded default base model: a tiny Qwen2 and its tokenizer, built offline and deterministically.

Owns `build_tiny_qwen2(directory)`: a byte-level BPE tokenizer trained with Qwen2's own pre-tokenizer
pipeline (so `AutoTokenizer`, which loads it as `Qwen2Tokenizer`, gives the same ids as the trained
tokenizer), Qwen's chat template with <|im_start|>/<|im_end|>, and a 2-layer Qwen2 (hidden 64) with
seeded weights. It loads through the same `AutoModelForCausalLM`/`AutoTokenizer` path as
`Qwen/Qwen2.5-0.5B-Instruct`, so the whole pipeline runs on a CPU in minutes. torch, tokenizers and
transformers are imported inside the builders: the Dagster code location imports this module, and must
not pay seconds of imports for a model it only builds once.
"""

import hashlib
import json
from pathlib import Path

TINY = "tiny"  # the 2-layer model; "tiny:<layers>" another depth (model-size comparisons on a CPU)
TINY_LAYERS = 2
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split pattern (tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """Training text: the synthetic PRISM's vocabulary, chat roles and plain English punctuation."""
    from prism_assets.dataset import synthetic

    lines = [
        *synthetic.SENTENCES,
        *synthetic.FOLLOW_UPS,
        *synthetic.OPENERS.values(),
        *(frame for frames in synthetic.STYLE_FRAMES.values() for frame in frames),
    ]
    texts = [line.format(topic=topic, body="") for line in lines for topic in synthetic.TOPICS]
    texts += ["user", "assistant", "system", "The quick brown fox jumps over the lazy dog. 0123456789"]
    return texts


def train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_layers(base_model: str) -> int | None:
    """The depth a tiny base model name asks for ("tiny": 2, "tiny:4": 4), None for any other model; a malformed
    "tiny:" name is an error."""
    if base_model == TINY:
        return TINY_LAYERS
    if not base_model.startswith(f"{TINY}:"):
        return None
    layers = base_model.removeprefix(f"{TINY}:")
    if not layers.isdigit() or not 1 <= int(layers) <= 64:
        raise ValueError(f"base_model {base_model!r}: expected 'tiny' or 'tiny:<layers>' with 1 to 64 layers")
    return int(layers)


def tiny_model_dir(models_dir: str | Path, base_model: str) -> Path:
    """Where the tiny model of this name is built under `models_dir`."""
    layers = tiny_layers(base_model)
    return Path(models_dir) / ("tiny-qwen2" if layers == TINY_LAYERS else f"tiny-qwen2-{layers}l")


def build_tiny_qwen2(directory: str | Path, seed: int = 0, layers: int = TINY_LAYERS) -> Path:
    """Write the tiny model (`layers` deep) and tokenizer to `directory` (idempotent: an existing build is reused)."""
    directory = Path(directory)
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        return directory
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    staging = directory.with_name(directory.name + ".building")
    tokenizer = save_tokenizer(train_tokenizer(), staging)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(staging)
    staging.replace(directory)
    return directory


def save_tokenizer(tokenizer, directory: str | Path):
    """Write `tokenizer` (train_tokenizer's) to `directory` so that `AutoTokenizer` loads it as Qwen2Tokenizer,
    the class the real model uses — and the class transformers picks for a qwen2 model directory anyway, which
    rebuilds a byte-level BPE from the saved vocabulary and merges (any other tokenizer model would load wrong)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "Qwen2Tokenizer"
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return tokenizer


def fingerprint(directory: str | Path) -> str:
    """A hash of the model directory's files: what a run's config records as the base model's identity."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
