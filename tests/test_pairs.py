"""Within-model pairs on hand-built PRISM rows: what becomes a pair, what is dropped and why."""

from builders import conversation, survey_row, write_prism

from prism_assets.dataset.loading import load_prism_directory
from prism_assets.dataset.pairs import within_model_pairs


def _pairs(tmp_path, conversations):
    convs, utts = zip(*conversations)
    tables = load_prism_directory(
        write_prism(tmp_path / "p", [survey_row("u1")], list(convs), [u for us in utts for u in us])
    )
    return within_model_pairs(tables.utterances, tables.conversations)


def test_pairs_drop_ties_cross_model_and_non_two_response_turns(tmp_path):
    result = _pairs(
        tmp_path,
        [
            conversation(
                "u1",
                "c1",
                [
                    [("m1", 80, "open a"), ("m2", 20, "open b"), ("m3", 50, "open c"), ("m4", 10, "open d")],
                    [("m1", 40, "worse"), ("m1", 90, "better")],  # a pair
                    [("m1", 55, "tie 1"), ("m1", 55, "tie 2")],  # tie
                    [("m1", 10, "x"), ("m1", 20, "y"), ("m1", 30, "z")],  # three responses
                    [("m1", 60, "EMPTY STRING"), ("m1", 70, "kept")],  # pair with an empty response
                    [("m1", 60, "one"), ("m2", 80, "other model")],  # cross-model
                    [("m1", 30, "alone")],  # one response
                ],
            ),
        ],
    )
    assert result.dropped == {
        "interaction_not_two_responses": 2,
        "cross_model_interaction": 1,
        "score_tie": 1,
        "identical_responses": 0,
        "conversation_not_found": 0,
        "history_without_turn": 0,
        "history_without_chosen_response": 0,
        "history_with_gap": 0,
    }
    pairs = result.pairs.set_index("turn")
    assert list(pairs.index) == [1, 4]
    assert (pairs.loc[1, "chosen"], pairs.loc[1, "rejected"], pairs.loc[1, "score_gap"]) == ("better", "worse", 50)
    assert (pairs.loc[4, "chosen"], pairs.loc[4, "rejected"]) == ("kept", "")
    assert result.empty_responses == 1
    assert (pairs["chosen_model_name"] == "m1").all() and (pairs["rejected_model_name"] == "m1").all()


def test_prompt_is_the_conversation_up_to_the_turn_with_the_chosen_responses(tmp_path):
    result = _pairs(
        tmp_path,
        [
            conversation(
                "u1",
                "c1",
                [
                    [("m1", 30, "m1 opening"), ("m2", 90, "m2 opening")],
                    [("m2", 10, "turn1 low"), ("m2", 60, "turn1 high")],
                    [("m2", 70, "turn2 high"), ("m2", 5, "turn2 low")],
                ],
            ),
        ],
    )
    prompt = list(result.pairs.set_index("turn").loc[2, "prompt"])
    assert [(m["role"], m["content"]) for m in prompt] == [
        ("user", "c1 user message 0"),
        ("assistant", "m2 opening"),
        ("user", "c1 user message 1"),
        ("assistant", "turn1 high"),
        ("user", "c1 user message 2"),
    ]


def test_tied_turn_uses_the_participants_recorded_choice_in_later_prompts(tmp_path):
    result = _pairs(
        tmp_path,
        [
            conversation(
                "u1",
                "c1",
                [
                    [("m1", 50, "first", False), ("m2", 50, "second", True)],
                    [("m2", 10, "low"), ("m2", 60, "high")],
                ],
            ),
        ],
    )
    assert list(result.pairs.loc[0, "prompt"])[1]["content"] == "second"


def test_a_turn_missing_from_the_history_is_dropped_under_its_own_reason(tmp_path):
    row, utterances = conversation("u1", "c1", [[("m1", 50, "a")], [("m1", 10, "low"), ("m1", 60, "high")]])
    row["conversation_history"] = [item for item in row["conversation_history"] if item["turn"] == 0]
    result = _pairs(tmp_path, [(row, utterances)])
    assert result.dropped["history_without_turn"] == 1 and result.dropped["history_without_chosen_response"] == 0
    assert result.pairs.empty
