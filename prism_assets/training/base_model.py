"""The base model a job trains or scores: its tokenizer and causal LM, loaded from a local directory or the Hub.

Owns the one error of a base model that cannot be had (`BaseModelError`): a Hub id with no copy here (the Hub
unreachable, offline, or no such model) says how to provide one, a local directory that holds none says so. Job side:
imports transformers only when a model is loaded.
"""

from pathlib import Path


class BaseModelError(RuntimeError):
    """The base model cannot be loaded; the message says how to provide it."""


def load_base_model(name: str, dtype):
    """(tokenizer, model) of `name`, a local directory or a Hugging Face Hub id (fetched, or from the Hub's cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # A job's log is no terminal; and tqdm's bars take a multiprocessing lock, which a trainer forked from the main
    # job's worker would leave registered with that worker's resource tracker ("leaked semaphore objects").
    transformers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as error:
        why = next(iter(str(error).strip().splitlines()), "").rstrip(".") or type(error).__name__
        if Path(name).expanduser().is_dir():
            raise BaseModelError(
                f"base_model {name}: this directory holds no tokenizer and causal LM transformers can load ({why})"
            ) from None
        if name.startswith(("/", ".", "~")):
            raise BaseModelError(f"base_model {name}: no such directory") from None
        if not isinstance(error, OSError):  # a model the Hub (or its cache) gave, which transformers cannot load
            raise
        raise BaseModelError(
            f"base_model {name!r} cannot be loaded: it is no local directory, and the Hugging Face Hub gave no copy "
            f"({why}). Download it where the jobs run, `hf download {name} --local-dir <dir>` (`huggingface-cli "
            "download` in older huggingface_hub), and set base_model to <dir> (DPO_BASE_MODEL, or the experiment's "
            "base_model)"
        ) from None
    return tokenizer, model
