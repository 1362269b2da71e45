"""A real dagster-webserver on 127.0.0.1 serves the code location and lists its assets over GraphQL."""

import shutil
from pathlib import Path

from conftest import shipped_asset_keys
from webserver import serve, wait_for_assets

REPO = Path(__file__).resolve().parents[1]
SHARED_GROUPS = {
    "raw_prism": "data",
    "within_model_pairs": "data",
    "correspondence_table": "report",
    "research_report": "report",
}


def test_webserver_lists_every_asset_in_its_group(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    with serve(REPO, {"DAGSTER_HOME": str(home), "PRISM_STORAGE": str(tmp_path / "storage")}) as url:
        nodes = wait_for_assets(url)
    found = {"/".join(node["assetKey"]["path"]): node["groupName"] for node in nodes}
    # each experiment's assets in its own group; one reference per base model, shared
    expected = {
        key: SHARED_GROUPS.get(key) or ("dpo" if key.startswith("reference_logps/") else key.split("/")[0])
        for key in shipped_asset_keys()
    }
    assert found == expected
