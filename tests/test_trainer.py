"""The job-side DPO trainer on the tiny model: complete outputs, determinism, real parameter updates."""

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from builders import run_job

from prism_assets.training.metrics import summarize_curve
from prism_assets.training.run_folder import heldout_users
from prism_assets.training.settings import RunConfig
from prism_assets.training.tiny_model import build_tiny_qwen2, fingerprint
from prism_assets.training.trainer import HeldoutEvaluator


def _train(tmp_path, name, model, pairs, **overrides):
    """The trainer's output directory after a run with these settings."""
    out = tmp_path / name
    run_job(
        tmp_path,
        name,
        base_model=str(model),
        pairs_path=str(pairs),
        output_dir=str(out),
        seed=0,
        **{"max_steps": 6, "logging_steps": 2, "learning_rate": 1e-3, "max_length": 128, "eval_steps": None}
        | {"heldout_share": 0.2, "curve_heldout_pairs": 16}
        | overrides,
    )
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, small_pairs_path):
    tmp_path = tmp_path_factory.mktemp("trainer")
    return tmp_path, _train(tmp_path, "a", tiny_model_dir, small_pairs_path)


def test_trainer_writes_complete_consistent_outputs(first_run):
    _, out = first_run
    curve = pd.read_parquet(out / "curve.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    ran = json.loads((out / "run.json").read_text())
    assert list(curve["step"]) == [2, 4, 6]
    assert {"loss", "margin", "pref_acc", "heldout_acc", "heldout_margin"} <= set(curve.columns)
    assert curve["heldout_acc"].between(0, 1).all()
    summary = summarize_curve(curve, max_steps=6)
    assert all(metrics[k] == v for k, v in summary.items())
    assert ran["seed"] == 0 and ran["device"] == "cpu"
    pairs = pd.read_parquet(ran["pairs_path"])
    fold = heldout_users(pairs["user_id"], 0.2, 0)
    assert ran["num_evaluated_pairs"] == metrics["num_heldout_pairs"] == fold.sum()  # every pair of the fold's users
    assert metrics["num_heldout_users"] == pairs.loc[fold, "user_id"].nunique()
    assert metrics["num_train_pairs"] == 6 * 8  # only the pairs 6 steps of batch 8 consume are drawn
    # every held-out pair at the step the primary metric reads (the last evaluated), 16 of them at the others
    results = pd.read_parquet(out / "heldout.parquet")
    assert results.groupby("step").size().to_dict() == {2: 16, 4: 16, 6: int(fold.sum())}
    assert set(results.loc[results["step"] == 6, "pair_id"]) == set(pairs.loc[fold, "pair_id"])
    last = results[results["step"] == 6]
    assert (last["margin"] > 0).mean() == pytest.approx(curve["heldout_acc"].iloc[-1])
    expected = 0.1 * (last["policy_logratio"] - last["reference_logratio"])
    assert last["margin"].to_numpy() == pytest.approx(expected, rel=1e-4, abs=1e-5)  # float32 arithmetic
    assert len(metrics["data_version"]) == 24
    assert metrics["attention_kernel"].startswith("cpu float32 (4 heads, 2 kv, dim 16): sdpa per sequence")  # reported
    assert not list(out.glob(".*.tmp"))


def test_same_seed_same_numbers(first_run, tiny_model_dir, small_pairs_path):
    tmp_path, out = first_run
    again = _train(tmp_path, "b", tiny_model_dir, small_pairs_path)
    assert pd.read_parquet(out / "curve.parquet").equals(pd.read_parquet(again / "curve.parquet"))
    assert (
        json.loads((out / "metrics.json").read_text())["data_version"]
        == json.loads((again / "metrics.json").read_text())["data_version"]
    )


def test_parameters_change_at_the_original_learning_rate(first_run, tiny_model_dir, small_pairs_path):
    tmp_path, _ = first_run
    out = _train(tmp_path, "lr", tiny_model_dir, small_pairs_path, learning_rate=5e-6, max_steps=4)
    metrics = json.loads((out / "metrics.json").read_text())
    # Adam moves each parameter by ≈ lr per step: 4 steps × 5e-6 over ~1e5 parameters ≈ 6e-3 in L2.
    assert 1e-3 < metrics["param_delta_l2"] < 1e-1


def test_each_seed_holds_out_its_own_users_whatever_the_subset(small_pairs_path):
    pairs = pd.read_parquet(small_pairs_path)
    users = pairs["user_id"].drop_duplicates()
    folds = [set(users[heldout_users(users, 0.2, seed).to_numpy()]) for seed in range(5)]
    # five seeds at a share of 0.2 hold out five disjoint sets of users that together are all of them
    assert all(not folds[i] & folds[j] for i in range(5) for j in range(i + 1, 5))
    assert set().union(*folds) == set(users) and all(0.1 < len(f) / len(users) < 0.3 for f in folds)
    assert set(users[heldout_users(users, 0.2, 5).to_numpy()]) == folds[0]  # then the folds come round again
    half = users.iloc[: len(users) // 2]
    assert set(half[heldout_users(half, 0.2, 1).to_numpy()]) == folds[1] & set(half)  # a user's fold is its own


def test_unknown_or_missing_config_keys_are_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"base_model": "x", "pairs_path": "p", "output_dir": "o", "sed": 1}))
    with pytest.raises(ValueError, match=r"c.json: RunConfig: missing key 'seed'; unknown key 'sed'"):
        RunConfig.from_json(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"base_model": "x", "pairs_path": "p", "output_dir": "o"}))
    with pytest.raises(ValueError, match=r"d.json: RunConfig: missing key 'seed'"):
        RunConfig.from_json(tmp_path / "d.json")


def test_tiny_model_builds_deterministically_and_loads_as_qwen2(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert fingerprint(build_tiny_qwen2(tmp_path / "again")) == fingerprint(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hey! Honestly?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nHey! Honestly?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("Kind regards, café")["input_ids"]) == "Kind regards, café"
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.model_type == "qwen2"


def test_heldout_evaluated_every_eval_steps_and_at_the_last_logged_step(first_run, tiny_model_dir, small_pairs_path):
    tmp_path, out = first_run
    sparse = pd.read_parquet(
        _train(tmp_path, "eval", tiny_model_dir, small_pairs_path, eval_steps=4) / "curve.parquet"
    )
    dense = pd.read_parquet(out / "curve.parquet")  # the same run evaluated at every logged step (2, 4, 6)
    assert list(sparse["step"]) == [2, 4, 6]
    assert list(sparse.dropna(subset=["heldout_acc"])["step"]) == [4, 6]  # every 4 steps, and the last
    # Evaluating less often changes nothing else: the same training steps, the same held-out values where evaluated.
    evaluated = sparse["heldout_acc"].notna()
    pd.testing.assert_frame_equal(sparse[evaluated], dense[evaluated])
    heldout = [*HeldoutEvaluator.COLUMNS, "heldout_evaluated"]
    pd.testing.assert_frame_equal(sparse.drop(columns=heldout), dense.drop(columns=heldout))
    assert sparse.loc[~evaluated, list(HeldoutEvaluator.COLUMNS)].isna().all().all()
    assert list(sparse["heldout_evaluated"]) == [False, True, True] and dense["heldout_evaluated"].all()


def test_a_run_resumed_from_a_checkpoint_ends_as_the_uninterrupted_one(first_run, tiny_model_dir, small_pairs_path):
    tmp_path, _ = first_run
    settings = dict(max_steps=8, eval_steps=4, checkpoint_steps=2, keep_checkpoints=True)
    out = _train(tmp_path, "resume", tiny_model_dir, small_pairs_path, **settings)
    uninterrupted = pd.read_parquet(out / "curve.parquet")
    assert sorted(p.name for p in (out / "trainer").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    # As if the node had died: step 6's state only partly on disk, and an attempt's step 8 begun and never finished.
    state = out / "trainer" / "checkpoint-6" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (out / "trainer" / "checkpoint-8").mkdir()
    for name in ("curve.parquet", "metrics.json"):
        (out / name).unlink()
    _train(tmp_path, "resume", tiny_model_dir, small_pairs_path, **settings)
    ran = json.loads((out / "run.json").read_text())
    assert ran["unreadable_checkpoints"] == ["checkpoint-6"] and ran["resumed_at_step"] == 4
    pd.testing.assert_frame_equal(pd.read_parquet(out / "curve.parquet"), uninterrupted)
    # The two newest whole checkpoints are kept; the unfinished one does not push out the older whole one.
    assert sorted(p.name for p in (out / "trainer").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]

    # Resuming under settings that change the run's course is refused, naming them; where checkpoints go is not.
    (out / "metrics.json").unlink()
    config = json.loads((tmp_path / "resume.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**config, "beta": 0.2, "seed": 1, "checkpoint_steps": 4}))
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets.training.trainer", "--config", str(tmp_path / "other.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert (
        "checkpoint-6 was written by a run with other settings: beta 0.1 (now 0.2), seed 0 (now 1); delete"
        in done.stderr
    )


@pytest.mark.parametrize(("minutes", "kept"), [(1e-9, ["checkpoint-2", "checkpoint-4"]), (60, [])])
def test_checkpoints_every_checkpoint_minutes_but_not_at_the_last_step(
    first_run, tiny_model_dir, small_pairs_path, minutes, kept
):
    tmp_path, out = first_run
    run = _train(
        tmp_path,
        f"minutes{minutes}",
        tiny_model_dir,
        small_pairs_path,
        checkpoint_minutes=minutes,
        keep_checkpoints=True,
    )
    assert sorted(p.name for p in (run / "trainer").glob("checkpoint-*")) == kept  # the last 2 kept; none at step 6
    assert pd.read_parquet(run / "curve.parquet").equals(pd.read_parquet(out / "curve.parquet"))


def test_gradient_checkpointing_trains_the_same_run(first_run, tiny_model_dir, small_pairs_path):
    tmp_path, out = first_run
    checkpointed = _train(tmp_path, "gc", tiny_model_dir, small_pairs_path, gradient_checkpointing=True)
    columns = ["loss", "margin", "pref_acc", "grad_norm", "heldout_acc", "heldout_margin"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(checkpointed / "curve.parquet")[columns],
        pd.read_parquet(out / "curve.parquet")[columns],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_trainer_trains_the_cpu_run_in_bf16_and_resumes(first_run, tiny_model_dir, small_pairs_path):
    tmp_path, out = first_run
    settings = dict(device="cuda", checkpoint_steps=2, keep_checkpoints=True)
    run = _train(tmp_path, "cuda", tiny_model_dir, small_pairs_path, **settings)
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "run.json").read_text())["device"] == "cuda"
    assert "cuda:0 bfloat16 (4 heads, 2 kv, dim 16): flash varlen" in metrics["attention_kernel"], metrics[
        "attention_kernel"
    ]
    assert 0 < metrics["peak_gpu_memory_gb"] < 2
    # The CPU run in fp32 and this one in bf16 autocast (flash attention, fused AdamW): the same training, up to bf16.
    curve, cpu_curve = pd.read_parquet(run / "curve.parquet"), pd.read_parquet(out / "curve.parquet")
    assert list(curve["step"]) == list(cpu_curve["step"])
    columns = ["loss", "margin", "reward_chosen", "reward_rejected", "heldout_margin", "learning_rate"]
    pd.testing.assert_frame_equal(curve[columns], cpu_curve[columns], rtol=5e-2, atol=2e-2)
    # Resumed on the device from the checkpoint at step 2 (the one at 4 lost): the curve of the whole run again.
    shutil.rmtree(run / "trainer" / "checkpoint-4")
    for name in ("curve.parquet", "metrics.json"):
        (run / name).unlink()
    _train(tmp_path, "cuda", tiny_model_dir, small_pairs_path, **settings)
    assert json.loads((run / "run.json").read_text())["resumed_at_step"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(run / "curve.parquet"), curve, rtol=1e-2, atol=1e-3)


def test_the_trainer_refuses_code_other_than_the_asset_recorded(tmp_path, tiny_model_dir, small_pairs_path):
    from prism_assets import versions

    config = {
        "base_model": str(tiny_model_dir),
        "pairs_path": str(small_pairs_path),
        "output_dir": str(tmp_path),
        "seed": 0,
        "code_version": "000000000000",
    }
    (tmp_path / "c.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets.training.trainer", "--config", str(tmp_path / "c.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = versions.source_version("prism_assets.training.trainer")
    assert done.returncode == 1
    assert (
        f"stale code: prism_assets.training.trainer here is version {found}, the asset that launched this job "
        "recorded 000000000000" in done.stderr
    )
    assert not (tmp_path / "run.json").exists()
