"""`python -m prism_assets run`, the README's main job, on a small synthetic PRISM with one seed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_materializes_everything_into_the_instance(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PRISM_STORAGE": str(tmp_path / "storage"),
           "PRISM_SYNTHETIC_USERS": "300", "PRISM_SYNTHETIC_SEED": "3"}
    done = subprocess.run([sys.executable, "-m", "prism_assets", "run", "--seeds", "1", "--preset", "v3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[17/17] group_dpo_run" in done.stdout and "0 DPO partitions failed" in done.stdout
    assert "S8_region" in done.stdout and "INCONCLUSIVE" in done.stdout  # one seed: no CI, by the rule
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert len(runs) == 1 + 17 + 1 and all(r.is_success for r in runs)  # data+stats, 17 partitions, table
    assert instance.get_dynamic_partitions("seed") == ["0"]
    assert len(instance.get_dynamic_partitions("cell")) == 17
    assert (tmp_path / "storage" / "reports" / "learning_curves.png").exists()
