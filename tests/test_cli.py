"""`python -m prism_assets run`, the README's main job, on a small synthetic PRISM with one seed."""

from pathlib import Path

import dagster as dg
import pytest


@pytest.mark.slow
def test_main_job_materializes_everything_into_the_instance(main_job, monkeypatch):
    env, stdout = main_job
    assert "[17/17] group_dpo_run" in stdout and "0 DPO partitions failed" in stdout
    assert "S8_region" in stdout and "INCONCLUSIVE" in stdout  # one seed: no CI, by the rule
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert len(runs) == 1 + 17 + 1 and all(r.is_success for r in runs)  # data+stats, 17 partitions, table
    assert instance.get_dynamic_partitions("seed") == ["0"]
    assert len(instance.get_dynamic_partitions("cell")) == 17
    assert (Path(env["PRISM_STORAGE"]) / "reports" / "learning_curves.png").exists()
