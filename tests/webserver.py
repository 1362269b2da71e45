"""Start a real dagster-webserver on 127.0.0.1 for a test and query it over GraphQL."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(code_dir: Path, env: dict[str, str]):
    """dagster-webserver for code_dir's workspace.yaml with `env` (DAGSTER_HOME …); yields its URL."""
    port = free_port()
    webserver_bin = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(webserver_bin), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=code_dir,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
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
                    assert proc.stdout is not None  # stdout=subprocess.PIPE
                    raise RuntimeError(
                        f"dagster-webserver did not come up: {proc.stdout.read().decode()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        wait_for_assets(url)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"GraphQL HTTP {error.code}: {error.read().decode(errors='replace')[:3000]}") from None
    if body.get("errors"):
        raise AssertionError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def wait_for_assets(url: str, timeout_s: float = 90) -> list[dict]:
    """The code location loads in the background after the server answers: wait until it lists assets."""
    deadline = time.time() + timeout_s
    while True:
        nodes = graphql(url, "{ assetNodes { assetKey { path } groupName } }")["assetNodes"] or []
        if nodes or time.time() > deadline:
            return nodes
        time.sleep(1)


STALENESS = "{ assetNodes { assetKey { path } isPartitioned staleStatus staleCauses { reason } } }"
PARTITION_STALENESS = """query($asset: [AssetKeyInput!], $partition: String) { assetNodes(assetKeys: $asset) {
  staleStatus(partition: $partition) staleCauses(partition: $partition) { reason } } }"""


def staleness(url: str, partition: str) -> dict[str, str]:
    """Asset key (`v3/group_dpo_run`) → FRESH / STALE / MISSING as the instance says; of `partition` for partitioned
    assets."""
    status = {}
    for node in graphql(url, STALENESS)["assetNodes"]:
        path = node["assetKey"]["path"]
        if node["isPartitioned"]:
            [node] = graphql(url, PARTITION_STALENESS, {"asset": [{"path": path}], "partition": partition})[
                "assetNodes"
            ]
        status["/".join(path)] = node["staleStatus"]
    return status
