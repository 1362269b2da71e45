"""Every kind of bad PRISM input ends in an error naming file, line and field, or in a drop counted by its reason; a
damaged stored output, a base model or a tracking server that cannot be had, in one error naming it."""

import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from builders import conversation, survey_row, write_prism

from prism_assets.dataset import pairs as pairs_lib
from prism_assets.dataset.loading import PrismFormatError, load_prism_directory
from prism_assets.statistics.ordered_logit import CovariateSpec, cluster_robust_ordered_logit


def _prism(tmp_path, survey=None, conversations=None, utterances=None):
    """Two users, one conversation with a scored later turn; any table given replaces the built one."""
    conv, utts = conversation("u1", "c1", [[("m1", 60, "a"), ("m2", 40, "b")], [("m1", 70, "x"), ("m1", 30, "y")]])
    return write_prism(
        tmp_path / "prism",
        [survey_row("u1"), survey_row("u2")] if survey is None else survey,
        [conv] if conversations is None else conversations,
        utts if utterances is None else utterances,
    )


def _utterances(**changes):
    """The built utterances with `changes` applied to the later turn's first response (row 2)."""
    _, utts = conversation("u1", "c1", [[("m1", 60, "a"), ("m2", 40, "b")], [("m1", 70, "x"), ("m1", 30, "y")]])
    utts[2].update(changes)
    return utts


# -- empty or fully dropped inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("survey", r"survey\.jsonl: no survey rows"),
        ("conversations", r"conversations\.jsonl: no usable conversations \(0 rows read"),
        ("utterances", r"utterances\.jsonl: no usable utterances \(0 rows read"),
    ],
)
def test_an_empty_file_stops_the_load_naming_it(tmp_path, table, message):
    with pytest.raises(PrismFormatError, match=message):
        load_prism_directory(_prism(tmp_path, **{table: []}))


def test_a_file_whose_every_row_is_dropped_names_the_reasons(tmp_path):
    utterances = [{**row, "score": str(row["score"])} for row in _utterances()]
    with pytest.raises(
        PrismFormatError, match=r"utterances\.jsonl: no usable utterances \(4 rows read; dropped: utterances_score_not"
    ):
        load_prism_directory(_prism(tmp_path, utterances=utterances))


def test_user_ids_of_another_type_are_an_error_naming_the_line(tmp_path):
    survey = [survey_row("u1"), survey_row(2)]  # type: ignore[arg-type]  # the bad input this test is about
    with pytest.raises(PrismFormatError, match=r"survey\.jsonl:2: user_id: Input should be a valid string \(got 2\)"):
        load_prism_directory(_prism(tmp_path, survey=survey))


def test_no_pairs_is_an_error_naming_every_drop(tmp_path):
    import dagster as dg

    from prism_assets.assets import data

    utterances = _utterances(score=30)  # the later turn's two responses tie
    tables = load_prism_directory(_prism(tmp_path, utterances=utterances))
    raw = {"utterances": tables.utterances, "conversations": tables.conversations, "source": "test"}
    with pytest.raises(dg.Failure, match=r"no within-model pairs in test: 4 utterances, .*\(score_tie 1\)"):
        data.within_model_pairs(dg.build_asset_context(), data.PairsConfig(), raw)


# -- responses that are not text -------------------------------------------------------------------------------


@pytest.mark.parametrize("response", [None, {"text": "x"}, 42, ["x"]])
def test_a_response_that_is_not_text_is_dropped_and_counted(tmp_path, response):
    tables = load_prism_directory(_prism(tmp_path, utterances=_utterances(model_response=response)))
    assert tables.dropped == {"utterances_response_not_text": 1}
    assert tables.utterances["model_response"].map(type).eq(str).all()
    result = pairs_lib.within_model_pairs(tables.utterances, tables.conversations)
    assert result.pairs.empty and result.dropped["interaction_not_two_responses"] == 1


@pytest.mark.parametrize("empty", ["", "   ", "EMPTY STRING"])
def test_empty_responses_are_counted_as_empty(tmp_path, empty):
    tables = load_prism_directory(_prism(tmp_path, utterances=_utterances(model_response=empty)))
    result = pairs_lib.within_model_pairs(tables.utterances, tables.conversations)
    assert len(result.pairs) == 1 and result.empty_responses == 1


def test_a_pair_of_identical_texts_is_dropped_with_its_own_reason(tmp_path):
    tables = load_prism_directory(_prism(tmp_path, utterances=_utterances(model_response="y")))
    result = pairs_lib.within_model_pairs(tables.utterances, tables.conversations)
    assert result.pairs.empty and result.dropped["identical_responses"] == 1


# -- bytes, types and structure --------------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path):
    directory = _prism(tmp_path)
    lines = (directory / "utterances.jsonl").read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"user message", b"user \xff message")
    (directory / "utterances.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(PrismFormatError, match=r"utterances\.jsonl:2: not UTF-8 text \(byte 0xff at column \d+\)"):
        load_prism_directory(directory)


def test_malformed_json_is_named_once(tmp_path):
    directory = _prism(tmp_path)
    (directory / "survey.jsonl").write_text('{"user_id": "u1", "age": "\t"}\n')
    with pytest.raises(PrismFormatError) as error:
        load_prism_directory(directory)
    assert "survey.jsonl:1: malformed JSON: Invalid control character at (column" in str(error.value)
    assert "at at" not in str(error.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("if_chosen", "yes", r"utterances\.jsonl:3: if_chosen: Input should be a valid boolean \(got 'yes'\)"),
        ("within_turn_id", "zero", r"utterances\.jsonl:3: within_turn_id: Input should be a valid integer"),
        ("turn", "1", r"utterances\.jsonl:3: turn: Input should be a valid integer \(got '1'\)"),
        ("utterance_id", None, r"utterances\.jsonl:3: utterance_id: Input should be a valid string \(got None\)"),
    ],
)
def test_a_field_of_the_wrong_type_names_file_line_field_and_value(tmp_path, field, value, message):
    with pytest.raises(PrismFormatError, match=message):
        load_prism_directory(_prism(tmp_path, utterances=_utterances(**{field: value})))


def test_a_field_outside_the_codebook_of_mixed_types_is_kept_as_text(tmp_path):
    utterances = _utterances()
    for i, value in enumerate([1, "two", {"three": 3}, None]):
        utterances[i]["annotator_note"] = value
    tables = load_prism_directory(_prism(tmp_path, utterances=utterances))
    tables.utterances.to_parquet(tmp_path / "u.parquet")  # one type per column: parquet takes it
    stored = list(pd.read_parquet(tmp_path / "u.parquet")["annotator_note"])
    assert stored[:3] == ["1", "two", '{"three": 3}'] and pd.isna(stored[3])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (["turn", 0], r"conversation_history\[1\]: Input should be a valid dictionary"),
        ({"role": "user", "content": "hi"}, r"missing required field 'conversation_history\[1\]\.turn'"),
        ({"turn": "0", "role": "user", "content": "hi"}, r"conversation_history\[1\]\.turn: Input should be a valid"),
        ({"turn": 0, "role": "bot", "content": "hi"}, r"conversation_history\[1\]\.role: Input should be 'user'"),
    ],
)
def test_a_malformed_history_item_names_the_conversation_and_item(tmp_path, item, message):
    conv, _ = conversation("u1", "c1", [[("m1", 60, "a"), ("m2", 40, "b")], [("m1", 70, "x"), ("m1", 30, "y")]])
    conv["conversation_history"][1] = item
    with pytest.raises(PrismFormatError, match=r"conversations\.jsonl:1: conversation 'c1': " + message):
        load_prism_directory(_prism(tmp_path, conversations=[conv]))


# -- wrong reasons ---------------------------------------------------------------------------------------------


def test_an_interaction_id_reused_elsewhere_is_an_error_naming_both_lines(tmp_path):
    turns = [[("m1", 60, "a")], [("m1", 70, "x"), ("m1", 30, "y")]]
    (c1, u1), (c2, u2) = conversation("u1", "c1", turns), conversation("u1", "c2", turns)
    for row in u2:
        row["interaction_id"] = row["interaction_id"].replace("c2", "c1")  # c2's turns reuse c1's ids
    write_prism(tmp_path / "p", [survey_row("u1")], [c1, c2], u1 + u2)
    with pytest.raises(
        PrismFormatError,
        match=r"utterances\.jsonl:4: duplicate interaction_id 'c1-t0': line 1 has it in conversation 'c1' turn 0, "
        r"this line in conversation 'c2' turn 0",
    ):
        load_prism_directory(tmp_path / "p")


def test_a_response_given_twice_in_one_interaction_is_an_error(tmp_path):
    utterances = _utterances()
    utterances.append({**utterances[2], "utterance_id": "c1-t1-copy"})
    with pytest.raises(
        PrismFormatError, match=r"utterances\.jsonl:5: duplicate within_turn_id 0 in interaction 'c1-t1'"
    ):
        load_prism_directory(_prism(tmp_path, utterances=utterances))


@pytest.mark.parametrize(
    ("score", "reason"),
    [
        ("70", "utterances_score_not_a_number"),
        (None, "utterances_score_not_a_number"),
        (True, "utterances_score_not_a_number"),
        (float("nan"), "utterances_score_not_a_number"),
        (0, "utterances_score_outside_1_100"),
        (70.5, "utterances_score_outside_1_100"),
    ],
)
def test_a_score_is_dropped_under_the_reason_that_fits_it(tmp_path, score, reason):
    assert load_prism_directory(_prism(tmp_path, utterances=_utterances(score=score))).dropped == {reason: 1}


def test_a_survey_row_without_a_user_id_is_an_error_not_a_missing_user(tmp_path):
    survey = [survey_row("u1"), survey_row(None)]  # type: ignore[arg-type]  # the bad input this test is about
    with pytest.raises(PrismFormatError, match=r"survey\.jsonl:2: user_id: Input should be a valid string"):
        load_prism_directory(_prism(tmp_path, survey=survey))


# -- covariates that cannot be fitted --------------------------------------------------------------------------


def test_a_stated_preference_that_is_not_finite_names_the_field(tmp_path):
    directory = _prism(tmp_path)
    lines = (directory / "survey.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"safety": 50', '"safety": Infinity')
    (directory / "survey.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        PrismFormatError, match=r"survey\.jsonl:2: stated_prefs\.safety: Input should be a finite number \(got inf\)"
    ):
        load_prism_directory(directory)


def _fit_data(full_synthetic_dir):
    tables = load_prism_directory(full_synthetic_dir)
    return pairs_lib.within_model_pairs(tables.utterances, tables.conversations).pairs, tables.survey


def test_a_constant_covariate_is_left_out_of_the_fit_with_its_reason(full_synthetic_dir):
    pairs, survey = _fit_data(full_synthetic_dir)
    survey = survey.assign(stated_prefs_values=50.0)
    fit = cluster_robust_ordered_logit(
        pairs, survey, CovariateSpec(continuous=("stated_prefs_values", "stated_prefs_safety"))
    )
    assert fit.excluded == {"stated_prefs_values": "constant (50 for every user with pairs)"}
    assert "stated_prefs_values" not in set(fit.coefficients["term"]) and fit.converged


def test_a_level_that_separates_the_outcome_is_left_out_with_its_pairs(full_synthetic_dir):
    pairs, survey = _fit_data(full_synthetic_dir)
    # Every pair of the users in one gender level gets the largest gap: that level's β has no finite estimate.
    level = "Non-binary / third gender"
    users = set(survey.loc[survey["gender"] == level, "user_id"])
    pairs = pairs.assign(score_gap=pairs["score_gap"].where(~pairs["user_id"].isin(users), 99))
    fit = cluster_robust_ordered_logit(pairs, survey, CovariateSpec(min_level_users=1))
    term = f"gender[{level}]"
    assert fit.excluded[term].startswith("separates the outcome: all its") and term not in set(
        fit.coefficients["term"]
    )
    assert fit.dropped["pairs_of_separating_levels"] == int(pairs["user_id"].isin(users).sum())
    assert all(math.isfinite(b) for b in fit.coefficients["beta"]) and fit.converged


def test_a_categorical_covariate_left_with_one_level_is_left_out(full_synthetic_dir):
    pairs, survey = _fit_data(full_synthetic_dir)
    fit = cluster_robust_ordered_logit(pairs, survey.assign(gender="Female"), CovariateSpec())
    assert fit.excluded == {"gender": "one usable level (Female)"}


def test_a_reference_level_left_without_pairs_gets_another_reference():
    """B's level b1 holds exactly the users of A's reference level a0 and separates the outcome: once its pairs
    leave the fit, A's other levels cover every pair and one of them becomes A's reference."""
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(300)]
    a = ["a0"] * 120 + ["a1"] * 90 + ["a2"] * 90
    survey = pd.DataFrame(
        {"user_id": users, "A": a, "B": ["b1" if x == "a0" else "b0" for x in a], "x": rng.uniform(0, 100, 300)}
    )
    pairs = pd.DataFrame({"user_id": np.repeat(users, 10), "score_gap": rng.integers(1, 60, 3000)})
    pairs.loc[pairs["user_id"].isin(users[:120]), "score_gap"] = 99
    fit = cluster_robust_ordered_logit(pairs, survey, CovariateSpec(("A", "B"), ("x",), min_level_users=1))
    assert fit.excluded["B[b1]"].startswith("separates the outcome: all its 1200 pairs")
    assert fit.reference_levels["A"] in ("a1", "a2") and fit.num_pairs == 1800
    assert set(fit.coefficients["term"]) == {"x", "A[a1]", "A[a2]"} - {f"A[{fit.reference_levels['A']}]"}
    assert np.isfinite(fit.coefficients["beta"]).all() and fit.converged


def test_a_history_that_skips_a_turn_gives_no_prompts_after_the_gap(tmp_path):
    turns = [[("m1", 60, "a")], [("m1", 70, "x"), ("m1", 30, "y")], [("m1", 80, "p"), ("m1", 20, "q")]]
    conv, utts = conversation("u1", "c1", turns)
    conv["conversation_history"] = [item for item in conv["conversation_history"] if item["turn"] != 1]
    tables = load_prism_directory(_prism(tmp_path, conversations=[conv], utterances=utts))
    result = pairs_lib.within_model_pairs(tables.utterances, tables.conversations)
    # turn 1 is missing from the history; turn 2's prompt would lack that exchange
    assert result.pairs.empty
    assert result.dropped["history_without_turn"] == 1 and result.dropped["history_with_gap"] == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"user_id": "u1", "user_id": "u2"}', "malformed JSON: key 'user_id' appears twice in one object"),
        ('{"score": ' + "9" * 5000 + "}", "malformed JSON: Exceeds the limit"),
    ],
)
def test_json_that_python_would_misread_is_an_error(tmp_path, text, message):
    directory = _prism(tmp_path)
    (directory / "utterances.jsonl").write_text(text + "\n")
    with pytest.raises(PrismFormatError, match=rf"utterances\.jsonl:1: {message}"):
        load_prism_directory(directory)


@pytest.mark.parametrize(("field", "value"), [("score", 10**400), ("turn", 2**70)])
def test_huge_integers_are_a_drop_or_an_error_not_an_overflow(tmp_path, field, value):
    utterances = _utterances(**{field: value})
    if field == "score":
        assert load_prism_directory(_prism(tmp_path, utterances=utterances)).dropped == {
            "utterances_score_outside_1_100": 1
        }
    else:
        with pytest.raises(PrismFormatError, match=r"utterances\.jsonl:3: turn: Input should be less than 2147483648"):
            load_prism_directory(_prism(tmp_path, utterances=utterances))


def test_utterances_without_the_optional_within_turn_id_still_pair(tmp_path):
    utterances = [{k: v for k, v in row.items() if k != "within_turn_id"} for row in _utterances()]
    tables = load_prism_directory(_prism(tmp_path, utterances=utterances))
    assert len(pairs_lib.within_model_pairs(tables.utterances, tables.conversations).pairs) == 1


# -- what the platform reads besides PRISM: stored outputs, the base model, a tracking server ------------------


def _stored_run(tmp_path):
    """A group_dpo_run partition's stored value, as the IO manager writes it: a dict with a table and numbers."""
    from resources.io_managers import write_bundle

    directory = tmp_path / "assets" / "v3" / "group_dpo_run" / "S1_age.A" / "0"
    write_bundle(directory, {"curve": pd.DataFrame({"step": [5, 10], "loss": [0.7, 0.6]}), "final_heldout_acc": 0.6})
    return directory


def test_a_stored_output_reads_back_as_written(tmp_path):
    from resources.io_managers import read_bundle

    bundle = read_bundle(_stored_run(tmp_path))
    assert set(bundle) == {"curve", "final_heldout_acc"} and list(bundle["curve"]["step"]) == [5, 10]


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        ("truncate", "values.json", r"cannot be read \(JSONDecodeError: "),
        ("delete", "curve.parquet", r"missing \(values\.json lists it\)"),
        ("truncate", "curve.parquet", r"cannot be read \("),
        ("delete", "values.json", "missing, and so is value.parquet"),
    ],
)
def test_a_damaged_stored_output_is_one_error_naming_the_file(tmp_path, damage, file, problem):
    from resources.io_managers import StoredOutputError, read_bundle

    directory = _stored_run(tmp_path)
    path = directory / file
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.unlink()
    with pytest.raises(StoredOutputError, match=rf"^{re.escape(str(path))}: {problem}") as error:
        read_bundle(directory)
    assert str(error.value).endswith("this stored output is damaged: materialize it again")


def test_a_hub_model_that_cannot_be_fetched_fails_the_job_naming_it_and_how_to_provide_it(tmp_path):
    """The Hub is out of reach (offline here): the reference job's error names the model and the way round."""
    pd.DataFrame({"pair_id": ["p1"], "prompt": ["hi"], "chosen": ["a"], "rejected": ["b"]}).to_parquet(
        tmp_path / "pairs.parquet"
    )
    config = {"base_model": "someone/missing-model", "max_length": 64, "pairs_path": "pairs.parquet"}
    (tmp_path / "reference.json").write_text(json.dumps({**config, "output_path": "reference_logps.parquet"}))
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets.training.reference", "--config", str(tmp_path / "reference.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("prism_assets.training.base_model.BaseModelError: base_model 'someone/missing-model' ")
    assert "it is no local directory, and the Hugging Face Hub gave no copy" in last
    assert "`hf download someone/missing-model --local-dir <dir>`" in last and "set base_model to <dir>" in last
    assert not (tmp_path / "reference_logps.parquet").exists()


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9", "http://no-such-host.invalid:5000"])
def test_an_unreachable_mlflow_server_fails_the_run_in_seconds_naming_it(tmp_path, uri):
    from prism_assets.training import tracking
    from prism_assets.training.settings import RunConfig

    cfg = RunConfig(
        base_model="m", pairs_path="p", output_dir=str(tmp_path), seed=0, report_to=["mlflow"], mlflow_tracking_uri=uri
    )
    started = time.monotonic()
    with pytest.raises(tracking.TrackerError) as error:
        tracking.Trackers(cfg)  # made before the run loads anything
    assert time.monotonic() - started < 10
    assert str(error.value).startswith(f"report_to mlflow: the MLflow tracking server at {uri} cannot be reached (")
    assert str(error.value).endswith("start it, or fix mlflow_tracking_uri (DPO_MLFLOW_TRACKING_URI)")
