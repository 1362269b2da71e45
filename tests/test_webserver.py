"""A real dagster-webserver on 127.0.0.1 serves the code location and lists its assets over GraphQL."""

import shutil
from pathlib import Path

from webserver import serve, wait_for_assets

REPO = Path(__file__).resolve().parents[1]
GROUPS = {
    "raw_prism": "data",
    "within_model_pairs": "data",
    "ordered_logit_fit": "statistics",
    "significant_splits": "statistics",
    "reference_logps": "dpo",
    "group_dpo_run": "dpo",
    "correspondence_table": "report",
}


def test_webserver_lists_every_asset_in_its_group(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with serve(REPO, {"DAGSTER_HOME": str(home), "PRISM_STORAGE": str(tmp_path / "storage")}) as url:
        nodes = wait_for_assets(url)
    found = {node["assetKey"]["path"][-1]: node["groupName"] for node in nodes}
    assert found == GROUPS
