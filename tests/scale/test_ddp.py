"""Two-process DDP on CPU gives the same meta-parameters and test metrics as one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_metafed.faults import ClientFaults

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(devices: int, out: Path, path: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(out), path], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("path", ["fast", "explicit", "robust", "private", "compressed"])
def test_two_process_ddp_matches_one_process(path, tmp_path):
    single = run(1, tmp_path / "one.pt", path)
    double = run(2, tmp_path / "two.pt", path)
    for name, value in single["state"].items():
        torch.testing.assert_close(double["state"][name], value, atol=1e-5, rtol=1e-5, msg=name)
    for key, value in single["test"].items():  # held-out metrics: every client counted exactly once
        assert double["test"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert double["comm"] == single["comm"]
    assert double["faults"] == single["faults"]
    if path == "compressed":  # every process compressed every client alike and kept the same residuals
        assert single["residuals"] and double["residuals"].keys() == single["residuals"].keys()
        for client, row in single["residuals"].items():
            for name, value in row.items():
                torch.testing.assert_close(double["residuals"][client][name], value, atol=1e-5, rtol=1e-5)
        assert single["comm"]["upload_bytes"] < single["comm"]["download_bytes"] / 2  # encoded uploads
    if path in ("robust", "private"):
        assert single["faults"]["dropped_clients"] > 0 and single["faults"]["byzantine_uploads"] > 0
        # some round keeps fewer clients than processes: every process then computes all of them
        faults = ClientFaults(dropout=0.5, seed=1)
        assert min(int((~faults.dropped(r, 5)).sum()) for r in range(6)) < 2
    rows = list(csv.DictReader(open(Path(double["log_dir"]) / "test_clients.csv")))
    assert len(rows) == 5 and len({r["client_id"] for r in rows}) == 5


def test_console_script_runs_two_process_ddp_and_exits_cleanly(tmp_path):
    root = Path(__file__).resolve().parents[2]
    exe = Path(sys.executable).parent / "metafed"
    result = subprocess.run(
        [str(exe), "fit", "--config", str(root / "configs/synthetic/maml.yaml"), "--config", str(root / "configs/smoke.yaml"),
         "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shown = result.stdout + result.stderr  # the summaries go through rank_zero_info (logging, on stderr)
    assert "test: personalization on" in shown and "Logs and checkpoints:" in shown
