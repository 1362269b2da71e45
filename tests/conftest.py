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
