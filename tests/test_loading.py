"""Reading PRISM jsonl: errors that name file, line and field; counted drops; the offline Hub path."""

import json
import os
import subprocess
import sys

import pytest
from builders import conversation, survey_row, write_prism

from prism_assets.dataset.loading import PrismFormatError, load_prism_directory


def _two_user_prism(tmp_path):
    conv, utts = conversation("u1", "c1", [[("m1", 60, "a"), ("m2", 40, "b")], [("m1", 70, "x"), ("m1", 30, "y")]])
    return write_prism(tmp_path / "prism", [survey_row("u1"), survey_row("u2")], [conv], utts)


def test_malformed_json_line_fails_with_file_and_line(tmp_path):
    directory = _two_user_prism(tmp_path)
    lines = (directory / "utterances.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]
    (directory / "utterances.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(PrismFormatError, match=r"utterances\.jsonl:3: malformed JSON"):
        load_prism_directory(directory)


def test_missing_required_field_fails_naming_field_and_row(tmp_path):
    directory = _two_user_prism(tmp_path)
    rows = [json.loads(line) for line in (directory / "survey.jsonl").read_text().splitlines()]
    del rows[1]["education"]
    (directory / "survey.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PrismFormatError, match=r"survey\.jsonl:2: missing required field 'education'"):
        load_prism_directory(directory)


@pytest.mark.parametrize("turn", [None, -1, "1", 1.5])
def test_a_turn_that_is_no_integer_from_0_fails_naming_file_and_line(tmp_path, turn):
    directory = _two_user_prism(tmp_path)
    rows = [json.loads(line) for line in (directory / "utterances.jsonl").read_text().splitlines()]
    rows[1]["turn"] = turn
    (directory / "utterances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PrismFormatError, match=rf"utterances\.jsonl:2: turn: Input should be .* \(got {turn!r}\)"):
        load_prism_directory(directory)


def test_duplicate_utterance_id_fails_naming_both_lines(tmp_path):
    directory = _two_user_prism(tmp_path)
    lines = (directory / "utterances.jsonl").read_text().splitlines()
    (directory / "utterances.jsonl").write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(PrismFormatError, match=r"utterances\.jsonl:5: duplicate utterance_id .* \(first on line 1\)"):
        load_prism_directory(directory)


def test_unknown_users_and_out_of_range_scores_are_dropped_and_counted(tmp_path):
    conv, utts = conversation("u1", "c1", [[("m1", 60, "a"), ("m2", 40, "b")], [("m1", 70, "x"), ("m1", 30, "y")]])
    ghost_conv, ghost_utts = conversation("ghost", "c2", [[("m1", 60, "a")], [("m1", 70, "x"), ("m1", 30, "y")]])
    utts[0]["score"] = 0
    utts[1]["score"] = 101
    utts[2]["score"] = 55.5
    directory = write_prism(tmp_path / "p", [survey_row("u1")], [conv, ghost_conv], utts + ghost_utts)
    tables = load_prism_directory(directory)
    assert tables.dropped == {
        "conversations_user_not_in_survey": 1,
        "utterances_score_outside_1_100": 3,
        "utterances_user_not_in_survey": 3,
    }
    assert list(tables.utterances["utterance_id"]) == ["c1-t1-r1"]
    assert list(tables.conversations["conversation_id"]) == ["c1"]


def test_survey_dicts_are_flattened_the_authors_way(tmp_path):
    tables = load_prism_directory(_two_user_prism(tmp_path))
    assert tables.survey.loc[0, "location_special_region"] == "UK"
    assert tables.survey.loc[0, "religion_simplified"] == "No Affiliation"
    assert tables.survey["stated_prefs_safety"].dtype.kind in "if"
    # utterance scalars keep their types: a boolean is no "true" text, a number no "0"
    assert {c: tables.utterances[c].dtype.kind for c in ("if_chosen", "within_turn_id", "score")} == {
        "if_chosen": "b",
        "within_turn_id": "i",
        "score": "i",
    }
    assert json.loads(tables.survey.loc[0, "lm_usecases"])["companionship"] is False


def test_missing_files_are_named(tmp_path):
    directory = _two_user_prism(tmp_path)
    (directory / "conversations.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="conversations.jsonl"):
        load_prism_directory(directory)


def test_hub_source_reads_the_hub_cache_offline(tmp_path):
    """The Hub loader resolves HannahRoseKirk/prism-alignment from a hub-style cache with HF_HUB_OFFLINE=1."""
    source = _two_user_prism(tmp_path)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--HannahRoseKirk--prism-alignment"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("survey", "conversations", "utterances"):
        (snapshot / f"{name}.jsonl").write_bytes((source / f"{name}.jsonl").read_bytes())
    code = (
        "from prism_assets.dataset.loading import load_prism_hub; t = load_prism_hub(); "
        "print(t.source, len(t.survey), len(t.utterances))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hub", "HannahRoseKirk/prism-alignment@main", "2", "4"]


def test_hub_source_without_cache_fails_offline_instead_of_falling_back(tmp_path):
    code = "from prism_assets.dataset.loading import load_prism_hub; load_prism_hub()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "survey.jsonl" in out.stderr or "offline" in out.stderr.lower()
