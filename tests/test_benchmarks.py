"""The DPO throughput benchmark runs end to end in its --tiny CPU mode (its numbers are never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dpo_throughput_tiny_prints_every_variant(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/dpo_throughput.py", "--tiny", "--steps", "4", "--warm", "2",
                           "--packed", "2", "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| stock", "| trl+refs", "| project", "| stock ×2 packed", "| project ×2 packed",
        "| project, held-out every 25", "| project, held-out every 100",
        "| project ×2 packed, held-out every 25", "| project ×2 packed, held-out every 100"]
    assert "project/stock per run:" in done.stdout and "grid of 85 runs × 2000 steps, training only" in done.stdout
    assert "pairs at a run's start: tokenized" in done.stdout
