"""A pair's text digest: a hash of what tokenizing it reads, what names a run's pairs and what the reference log-probs
were computed from. Its own module, so that the job's code (which checks digests) does not include the pair rule."""

import hashlib
import json

import pandas as pd

TEXT_DIGEST = "pair_text_digest"  # the column within_model_pairs carries


def pair_text_digests(pairs: pd.DataFrame) -> list[str]:
    """Per pair, a hash of what tokenizing it reads: its prompt messages' roles and contents, and both responses."""

    def digest(prompt, chosen: str, rejected: str) -> str:
        text = json.dumps([[[m["role"], m["content"]] for m in prompt], chosen, rejected], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return [digest(*row) for row in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
