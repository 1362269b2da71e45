import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from prism_assets.prism import synthetic  # noqa: E402


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
    from prism_assets.prism.loading import load_prism_directory
    from prism_assets.prism.pairs import within_model_pairs

    tables = load_prism_directory(small_synthetic_dir)
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    within_model_pairs(tables.utterances, tables.conversations).pairs.to_parquet(path, index=False)
    return path
