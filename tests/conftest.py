import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO / "benchmarks"))  # trl_reference: TRL's DPOTrainer configured as the step

from prism_assets.dataset import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def small_synthetic_dir(tmp_path_factory) -> Path:
    """A synthetic PRISM of 300 users, written once per test session."""
    directory = tmp_path_factory.mktemp("synthetic_prism")
    synthetic.write_synthetic_prism(directory, synthetic.SyntheticConfig(seed=3, num_users=300))
    return directory


@pytest.fixture(scope="session")
def full_synthetic_dir(tmp_path_factory) -> Path:
    """The full-size synthetic PRISM (1,500 users), written once per test session."""
    directory = tmp_path_factory.mktemp("synthetic_prism_full")
    synthetic.write_synthetic_prism(directory, synthetic.SyntheticConfig(seed=0))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from prism_assets.training.tiny_model import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def small_pairs_path(small_synthetic_dir, tmp_path_factory) -> Path:
    """within_model_pairs of the 300-user synthetic PRISM, as parquet."""
    from prism_assets.dataset.loading import load_prism_directory
    from prism_assets.dataset.pairs import within_model_pairs

    tables = load_prism_directory(small_synthetic_dir)
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    within_model_pairs(tables.utterances, tables.conversations).pairs.to_parquet(path, index=False)
    return path


def shipped_asset_keys() -> list[str]:
    """The asset keys of the shipped experiments (v3, v2) on the tiny model, as the UI names them."""
    from builders import experiment

    from prism_assets import keys

    reference = keys.reference_logps(experiment().settings).to_user_string()
    per_experiment = [f"{e}/{name}" for name in ("ordered_logit_fit", "significant_splits") for e in ("v3", "v2")]
    runs = ["v3/group_dpo_run", "v2/group_dpo_run"]
    reports = ["correspondence_table", "research_report"]
    return ["raw_prism", "within_model_pairs", reference, *per_experiment, *runs, *reports]


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """The README's main job (`python -m prism_assets run`), small: 300 synthetic users, v3 and v2, one seed.

    Yields (environment the job ran with, its stdout); DAGSTER_HOME and PRISM_STORAGE in that environment
    hold the instance and the outputs, for tests that read them back (through the webserver, a browser …).
    """
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("main_job")
    home = root / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        "DAGSTER_HOME": str(home),
        "PRISM_STORAGE": str(root / "storage"),
        "PRISM_SYNTHETIC_USERS": "300",
        "PRISM_SYNTHETIC_SEED": "3",
    }
    done = subprocess.run(
        [sys.executable, "-m", "prism_assets", "run", "--seeds", "1"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return env, done.stdout
