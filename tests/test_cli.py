"""`python -m prism_assets run`, the README's main job, on a small synthetic PRISM with one seed."""

from pathlib import Path

import dagster as dg
import pytest


@pytest.mark.slow
def test_main_job_materializes_everything_into_the_instance(main_job, monkeypatch):
    env, stdout = main_job
    # v3's 41 partitions (8 splits and 12 random ones), then v2's 37: its baseline, S1_age, S2_personalisation,
    # S3_safety, S6_region and random splits are v3's runs (the same users), adopted
    assert "[78/78] group_dpo_run" in stdout and "78 DPO partitions, 45 trained here, 33 shared" in stdout
    assert "0 failed" in stdout
    assert "S8_region" in stdout and "S5_behavioral" in stdout and "INCONCLUSIVE" in stdout  # one seed: no p
    assert "splits shared by two experiments" in stdout and "S6_region" in stdout
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert len(runs) == 1 + 78 + 1 and all(r.is_success for r in runs)  # data+stats, 78 partitions, table
    assert instance.get_dynamic_partitions("seed") == ["0"]
    assert (
        len(instance.get_dynamic_partitions("v3_cell")) == 41 and len(instance.get_dynamic_partitions("v2_cell")) == 37
    )
    assert (Path(env["PRISM_STORAGE"]) / "reports" / "v2" / "learning_curves.png").exists()
    assert (Path(env["PRISM_STORAGE"]) / "reports" / "v3" / "null.png").exists()
    assert (Path(env["PRISM_STORAGE"]) / "reports" / "comparison.png").exists()
    # The write-up, for both experiments, where the job said it is.
    [printed] = [line for line in stdout.splitlines() if line.startswith("the write-up: ")]
    html = Path(printed.removeprefix("the write-up: ").split(" ")[0])
    assert html == (Path(env["PRISM_STORAGE"]) / "reports" / "report.html").resolve() and html.exists()
    markdown = html.with_name("report.md").read_text()
    assert "## Experiment v3" in markdown and "## Experiment v2" in markdown and "## Observations" in markdown
