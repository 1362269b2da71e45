"""A real dagster-webserver on 127.0.0.1 serves the code location and lists its assets over GraphQL."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {"raw_prism", "within_model_pairs", "ordered_logit_fit", "significant_splits"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webserver(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "PRISM_STORAGE": str(tmp_path / "storage")}
    webserver_bin = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen([str(webserver_bin), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/server_info", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    proc.kill()
                    raise RuntimeError(f"dagster-webserver did not come up: {proc.stdout.read().decode()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_webserver_lists_the_assets_over_graphql(webserver):
    deadline = time.time() + 60
    while True:  # the code location loads in the background after the server answers
        body = _graphql(webserver, "{ assetNodes { assetKey { path } groupName } }")
        nodes = body.get("data", {}).get("assetNodes") or []
        if nodes or time.time() > deadline:
            break
        time.sleep(1)
    found = {node["assetKey"]["path"][-1]: node["groupName"] for node in nodes}
    assert EXPECTED <= set(found), body
    assert found["raw_prism"] == "data" and found["ordered_logit_fit"] == "statistics"
