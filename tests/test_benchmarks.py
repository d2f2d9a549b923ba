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


def test_compression_benchmark_smoke(tmp_path):
    """Three rounds of MAML on digits, uncompressed and with top-k: the table names both, the
    compressed run uploads the encoded bytes (13× fewer than float32 for this net at 5 %)."""
    out = tmp_path / "results.json"
    args = ["--smoke", "--seeds", "0", "--benchmarks", "digits_shards", "--algorithms", "maml", "--compressors", "topk",
            "--workers", "1", "--out", str(out)]
    result = subprocess.run([sys.executable, str(BENCH / "compression.py"), *args], capture_output=True, text=True, timeout=300, cwd=BENCH)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "float32 (none)" in result.stdout and "TopK(5 %) + EF" in result.stdout
    import json

    runs = {r["compressor"]: r for r in json.loads(out.read_text())["runs"]}
    # MLP 64-64-10: per parameter k = ceil(0.05 n) values (4 bytes) + int16 indices; 3 rounds of 8 clients
    encoded = sum(6 * -(-n * 5 // 100) for n in (64 * 64, 64, 64 * 10, 10))
    assert round(runs["topk"]["upload_mb"] * 1e6) == 3 * 8 * encoded
    assert round(runs["none"]["upload_mb"] * 1e6) == 3 * 8 * 4 * (64 * 64 + 64 + 64 * 10 + 10)
