"""The benchmark scripts run (tiny sizes; no timing is asserted) and their correctness checks pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("round_speed.py", ["--clients", "4", "--repeats", "1"], "higher/ours"),
        ("evaluation.py", ["--clients", "24", "--steps", "2"], "speed-up"),
        ("trainer_overhead.py", ["--rounds", "4", "--clients", "4"], "ratio"),
        ("robustness.py", ["--rounds", "2", "--seeds", "1", "--aggregators", "mean", "bulyan(4)", "bucketing(2)+cclip(1)"], "bulyan(4)"),
        ("adaptive_clipping.py", ["--seeds", "1", "--rounds", "3", "--clients", "200", "--fixed", "0.3", "--workers", "1"], "adaptive γ=0.1"),
        ("data_speed.py", ["--clients", "10000", "--repeats", "1"], "ratio"),
        ("data_pipeline.py", ["--clients", "8", "--compute-clients", "8", "--fit-clients", "8", "--fit-rounds", "2",
                              "--fit-repeats", "1", "--repeats", "1", "--tensor-clients", "1000", "--threads", "1"], "fit/bare"),
        ("versus_revision.py", ["--rev", "HEAD", "--clients", "4", "--repeats", "1"], "new/old"),
    ],
)
def test_benchmark_script_runs(script, args, expect):
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300, cwd=BENCH)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout
    if script == "round_speed.py":
        max_grad_diff = float(result.stdout.strip().splitlines()[-1].split("|")[-1])
        assert max_grad_diff < 1e-5  # every implementation computes the same meta-gradient
    if script == "versus_revision.py":
        assert float(result.stdout.strip().splitlines()[-1].split("|")[-1]) < 1e-6  # both versions aggregate alike
