"""The synthetic PRISM: the real schema, realistic marginals, the PRISM quirks, determinism per seed."""

import json

import pandas as pd
import pytest

from prism_assets.dataset import schema, synthetic


@pytest.fixture(scope="module")
def rows(small_synthetic_dir):
    return {
        t: [json.loads(line) for line in (small_synthetic_dir / f"{t}.jsonl").read_text().splitlines()]
        for t in schema.TABLES
    }


def test_every_codebook_field_is_present(rows):
    for table, fields in schema.FIELDS.items():
        for row in rows[table]:
            assert set(fields) <= set(row), (table, set(fields) - set(row))
    survey = rows["survey"][0]
    assert set(schema.STATED_PREFS) <= set(survey["stated_prefs"])
    assert {"special_region", "reside_country", "birth_countryISO"} <= set(survey["location"])
    assert {"self_described", "categorised", "simplified"} == set(survey["religion"])


def test_prism_quirks_are_present(rows):
    utterances = pd.DataFrame(rows["utterances"])
    opening = utterances[utterances["turn"] == 0].groupby("interaction_id")
    assert opening["model_name"].nunique().eq(opening.size()).all()  # distinct models at turn 0
    assert opening.size().max() == 4
    later = utterances[utterances["turn"] >= 1].groupby("interaction_id")
    assert later.size().eq(2).all() and later["model_name"].nunique().eq(1).all()
    assert (later["score"].nunique() == 1).any()  # ties
    assert (utterances["model_response"] == schema.EMPTY_RESPONSE).any()
    assert utterances["score"].between(1, 100).all()
    assert later["if_chosen"].sum().eq(1).all()
    survey_only = [r for r in rows["survey"] if r["survey_only"]]
    assert survey_only and all(r["num_completed_conversations"] == 0 for r in survey_only)


def test_marginals_follow_the_codebook():
    tables, _ = synthetic.generate(synthetic.SyntheticConfig(seed=1))
    survey = pd.DataFrame(tables["survey"])
    assert len(survey) == 1500
    assert abs(len(tables["conversations"]) - 8011) < 500
    assert abs(len(tables["utterances"]) - 68371) < 4000
    age = survey["age"].value_counts(normalize=True)
    assert abs(age["25-34 years old"] - 454 / 1500) < 0.04
    scores = pd.Series([u["score"] for u in tables["utterances"]])
    assert 58 < scores.mean() < 72


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    cfg = synthetic.SyntheticConfig(seed=5, num_users=40)
    synthetic.write_synthetic_prism(tmp_path / "a", cfg)
    synthetic.write_synthetic_prism(tmp_path / "b", cfg)
    synthetic.write_synthetic_prism(tmp_path / "c", synthetic.SyntheticConfig(seed=6, num_users=40))
    for name in ("survey.jsonl", "conversations.jsonl", "utterances.jsonl", "truth.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "utterances.jsonl").read_bytes() != (tmp_path / "c" / "utterances.jsonl").read_bytes()
    truth = json.loads((tmp_path / "a" / "truth.json").read_text())
    assert truth["note"].startswith("SYNTHETIC")
    assert truth["ordered_logit_beta"]["stated_prefs_safety"] < 0


def test_planted_taste_makes_group_a_choose_its_style_more_consistently(rows):
    survey = {r["user_id"]: r["age"] for r in rows["survey"]}
    utterances = pd.DataFrame(rows["utterances"])
    later = utterances[(utterances["turn"] >= 1) & utterances["if_chosen"]].copy()
    later["casual"] = later["model_response"].str.startswith(("Hey!", "Oh nice"))
    later["group_a"] = later["user_id"].map(survey).isin(synthetic.PlantedTaste().group_a_levels)
    casual_share = later.groupby("group_a")["casual"].mean()
    assert casual_share[True] > 0.75 and casual_share[False] < 0.45
