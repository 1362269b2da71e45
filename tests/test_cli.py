"""`python -m prism_assets run`, the README's main job, on a small synthetic PRISM with one seed."""

from pathlib import Path

import dagster as dg
import pytest


@pytest.mark.slow
def test_main_job_materializes_everything_into_the_instance(main_job, monkeypatch):
    env, stdout = main_job
    # v3's 17 partitions, then v2's 13: its baseline, S1_age and S6_region are v3's runs, adopted
    assert "[30/30] group_dpo_run" in stdout and "30 DPO partitions, 25 trained here, 5 shared" in stdout
    assert "0 failed" in stdout
    assert "S8_region" in stdout and "S5_behavioral" in stdout and "INCONCLUSIVE" in stdout  # one seed: no CI
    assert "splits shared by two experiments" in stdout and "S6_region" in stdout
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert len(runs) == 1 + 30 + 1 and all(r.is_success for r in runs)  # data+stats, 30 partitions, table
    assert instance.get_dynamic_partitions("seed") == ["0"]
    assert (
        len(instance.get_dynamic_partitions("v3_cell")) == 17 and len(instance.get_dynamic_partitions("v2_cell")) == 13
    )
    assert (Path(env["PRISM_STORAGE"]) / "reports" / "v2" / "learning_curves.png").exists()
    assert (Path(env["PRISM_STORAGE"]) / "reports" / "comparison.png").exists()
