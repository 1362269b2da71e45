"""Within-model preference pairs: two responses of one model to the same later turn, scored apart.

Owns the rule the experiment rests on. A pair is a turn ≥ 1 interaction with exactly two scored responses from the
same model and score_gap ≥ 1; the higher-scored response is `chosen`. Its prompt is the conversation up to that turn
as chat messages: every earlier user message followed by the response the participant chose there, then this turn's
user message; each pair carries a digest of its text. Every interaction that does not become a pair is counted under
one reason (two identical texts are no preference); PRISM's "EMPTY STRING" becomes an empty response, and empty
responses ("", whitespace) are counted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from prism_assets.dataset import schema
from prism_assets.dataset.digests import TEXT_DIGEST, pair_text_digests

DROP_REASONS = (
    "interaction_not_two_responses",
    "cross_model_interaction",
    "score_tie",
    "identical_responses",
    "conversation_not_found",
    "history_without_turn",
    "history_without_chosen_response",
    "history_with_gap",
)
PAIR_COLUMNS = (
    "pair_id",
    "user_id",
    "conversation_id",
    "turn",
    "model_name",
    "prompt",
    "chosen",
    "rejected",
    "chosen_score",
    "rejected_score",
    "score_gap",
    "chosen_utterance_id",
    "rejected_utterance_id",
    "chosen_model_name",
    "rejected_model_name",
)


@dataclass
class PairsResult:
    pairs: pd.DataFrame
    dropped: dict[str, int]
    empty_responses: int


def _response_text(text: str) -> str:
    return "" if text == schema.EMPTY_RESPONSE else text


def is_empty(text: str) -> bool:
    """PRISM's "EMPTY STRING", an empty string, or only whitespace."""
    return not _response_text(text).strip()


def _prompts_by_turn(history: list[dict]) -> dict[int, list[dict] | str]:
    """turn → chat messages up to and including that turn's user message, or the reason there are none: an
    earlier turn has no chosen response, or the history skips a turn (its prompt would lack that exchange)."""
    users: dict[int, str] = {}
    chosen: dict[int, str] = {}
    for item in history:
        if item.get("role") == "user":
            users[item["turn"]] = item["content"]
        elif item.get("role") == "model" and item.get("if_chosen"):
            chosen[item["turn"]] = _response_text(item["content"])
    prompts: dict[int, list[dict] | str] = {}
    messages: list[dict] | str = []
    for expected, turn in enumerate(sorted(users)):
        if turn != expected and isinstance(messages, list):
            messages = "history_with_gap"
        prompts[turn] = (
            messages if isinstance(messages, str) else [*messages, {"role": "user", "content": users[turn]}]
        )
        if isinstance(messages, list):
            if turn in chosen:
                messages = [
                    *messages,
                    {"role": "user", "content": users[turn]},
                    {"role": "assistant", "content": chosen[turn]},
                ]
            else:
                messages = "history_without_chosen_response"
    return prompts


def within_model_pairs(utterances: pd.DataFrame, conversations: pd.DataFrame) -> PairsResult:
    dropped: Counter[str] = Counter(dict.fromkeys(DROP_REASONS, 0))
    later = utterances[utterances["turn"] >= 1].sort_values(["interaction_id", "within_turn_id", "utterance_id"])
    histories = dict(zip(conversations["conversation_id"], conversations["conversation_history"]))
    prompt_cache: dict[str, dict] = {}
    rows = []
    empty = 0
    columns = [
        "interaction_id",
        "user_id",
        "conversation_id",
        "turn",
        "model_name",
        "model_response",
        "score",
        "utterance_id",
    ]
    records = later[columns].itertuples(index=False, name=None)
    grouped: dict[str, list[tuple]] = {}
    for record in records:
        grouped.setdefault(record[0], []).append(record)
    for interaction_id, responses in grouped.items():
        if len(responses) != 2:
            dropped["interaction_not_two_responses"] += 1
            continue
        first, second = responses
        if first[4] != second[4]:
            dropped["cross_model_interaction"] += 1
            continue
        if first[6] == second[6]:
            dropped["score_tie"] += 1
            continue
        if _response_text(first[5]) == _response_text(second[5]):  # nothing to prefer between them
            dropped["identical_responses"] += 1
            continue
        conversation_id, turn = first[2], int(first[3])
        if conversation_id not in histories:
            dropped["conversation_not_found"] += 1
            continue
        if conversation_id not in prompt_cache:
            history = histories[conversation_id]
            prompt_cache[conversation_id] = _prompts_by_turn(
                json.loads(history) if isinstance(history, str) else history
            )
        prompts = prompt_cache[conversation_id]
        if turn not in prompts:  # the conversation's history has no user message for this turn
            dropped["history_without_turn"] += 1
            continue
        prompt = prompts[turn]
        if isinstance(prompt, str):
            dropped[prompt] += 1
            continue
        chosen, rejected = (first, second) if first[6] > second[6] else (second, first)
        empty += is_empty(chosen[5]) + is_empty(rejected[5])
        rows.append(
            (
                interaction_id,
                first[1],
                conversation_id,
                turn,
                first[4],
                prompt,
                _response_text(chosen[5]),
                _response_text(rejected[5]),
                int(chosen[6]),
                int(rejected[6]),
                int(chosen[6] - rejected[6]),
                chosen[7],
                rejected[7],
                chosen[4],
                rejected[4],
            )
        )
    pairs = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    pairs[TEXT_DIGEST] = pair_text_digests(pairs)
    return PairsResult(pairs=pairs, dropped=dict(dropped), empty_responses=int(empty))
