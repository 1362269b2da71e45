"""What a table and a write-up rest on: runs of other settings or data left out by reason, the write-up saying where
today's settings differ from its runs', and a partial grid written beside the last complete write-up."""

import re

import dagster as dg
import pytest
from builders import dagster_definitions, experiment, materialize_partition, upstream_of_runs

from prism_assets import keys, partitions

SMALL = {"max_steps": 4, "logging_steps": 2}
TABLE = [keys.CORRESPONDENCE_TABLE]
BOTH = [keys.CORRESPONDENCE_TABLE, keys.RESEARCH_REPORT]


def _v3(**settings):
    return experiment("v3", "v3", spec={"random_splits": 2}, **{**SMALL, **settings})


def _runs(assets, resources, instance, cells, seed=0):
    for cell in cells:
        assert materialize_partition(assets, resources, instance, "v3", cell, seed).success


def _left_out(result) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == keys.CORRESPONDENCE_TABLE]
    return event.materialization.metadata["v3__runs_left_out"].value


@pytest.mark.slow
def test_runs_of_other_settings_or_other_data_are_left_out_baseline_included(tmp_path):
    cells = ["baseline", "S1_age.A", "S1_age.B"]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(partitions.SEED, ["0"])
        old, resources = dagster_definitions(tmp_path, [_v3()], warm=True)
        dg.materialize(upstream_of_runs(old), instance=instance, resources=resources)
        _runs(old, resources, instance, cells)
        dg.materialize(old, selection=BOTH, instance=instance, resources=resources)
        old_report = (tmp_path / "reports" / "report.partial.md").read_text()

        # DPO_LEARNING_RATE changed, then only the write-up rebuilt: it shows the runs' own 0.001 and says so
        new, resources = dagster_definitions(tmp_path, [_v3(learning_rate=2e-3)], warm=True)
        dg.materialize(new, selection=[keys.RESEARCH_REPORT], instance=instance, resources=resources)
        report = (tmp_path / "reports" / "report.partial.md").read_text()
        assert re.search(r"\| learning_rate +\| 0\.001 +\|", report) and "0.002" not in report
        assert "These runs' DPO settings are not the code location's today" in report
        assert "not the code location's today" not in old_report
        # the table rebuilt under the new settings leaves every old run out, naming why
        _runs(new, resources, instance, ["baseline"])
        table = dg.materialize(new, selection=TABLE, instance=instance, resources=resources)
        assert _left_out(table) == {"trained under other DPO settings": ["S1_age.A seed 0", "S1_age.B seed 0"]}

        # another synthetic PRISM (another data version): the old baseline is left out with the split runs
        other, resources = dagster_definitions(tmp_path, [_v3(learning_rate=2e-3)], warm=True, seed=4)
        dg.materialize(upstream_of_runs(other), instance=instance, resources=resources)
        _runs(other, resources, instance, ["S8_region.A", "S8_region.B"])
        table = dg.materialize(other, selection=TABLE, instance=instance, resources=resources)
        left_out = _left_out(table)
        assert left_out["trained on other data (another version of the pairs)"] == ["baseline seed 0"]
        assert set(left_out["trained on other users than the group now holds"]) == {
            "S1_age.A seed 0",
            "S1_age.B seed 0",
        }


@pytest.mark.slow
def test_a_partial_grid_is_written_beside_the_last_complete_write_up(tmp_path):
    """A complete grid (one seed) writes report.md; a seed added for one cell makes the grid partial: the write-up
    goes to report.partial.md, says so and names the missing runs, and report.md stays as it was."""
    v3 = _v3()
    assets, resources = dagster_definitions(tmp_path, [v3], warm=True)
    reports = tmp_path / "reports"
    with dg.instance_for_test() as instance:
        dg.materialize(upstream_of_runs(assets), instance=instance, resources=resources)
        instance.add_dynamic_partitions(partitions.SEED, ["0", "1"])
        _runs(assets, resources, instance, instance.get_dynamic_partitions(partitions.cells_name("v3")))
        complete = dg.materialize(assets, selection=BOTH, instance=instance, resources=resources)
        table = complete.output_for_node("correspondence_table")
        assert bool(table["basis"]["complete"].iloc[0]) and (reports / "report.md").exists()
        written = (reports / "report.md").read_text()
        assert "partial" not in written.split("## Data")[0] and not (reports / "report.partial.md").exists()

        _runs(assets, resources, instance, ["S1_age.A"], seed=1)
        partial = dg.materialize(assets, selection=BOTH, instance=instance, resources=resources)
        table = partial.output_for_node("correspondence_table")["table"]
    assert set(table.loc[~table["random"] & (table["metric"] == "mean_heldout_acc_tail"), "verdict"]) == {
        "partial grid: 0 of 8 splits, 0 of 2 random splits (null not calibrated)"
    }
    assert (reports / "report.md").read_text() == written  # the last complete write-up, untouched
    beside = (reports / "report.partial.md").read_text()
    assert beside.startswith("# Do groups") and "**A partial grid: no verdicts.**" in beside
    assert "Missing runs (failed, or not yet run): baseline seed 1, S1_age.B seed 1" in beside
    assert "(partial grid)" in (reports / "report.partial.html").read_text()
