"""The benchmark scripts run on tiny models and end with their JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_merged_vs_original_tiny():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "bench/merged_vs_original.py", "--model", "tiny", "--reps", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {"model", "plan", "prefill_speedup", "decode_speedup", "ideal", "prefill_ms", "decode_ms"} <= set(
        summary
    )
    assert {"threads", "reps"} <= set(summary)
    assert (
        summary["model"] == "tiny"
        and summary["reps"] == 2
        and summary["ideal"] == pytest.approx(8 / 6, abs=1e-4)
    )
    assert set(summary["prefill_ms"]) == set(summary["decode_ms"]) == {"original", "merged"}
    assert summary["prefill_speedup"] > 0 and summary["decode_speedup"] > 0
    assert sum(line.startswith("rep ") for line in lines) == 2
