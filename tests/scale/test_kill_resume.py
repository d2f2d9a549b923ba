"""A fit killed with SIGKILL mid-epoch resumes from its last checkpoint and ends where an
uninterrupted fit ends; every checkpoint left behind loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# pytest puts this directory (no __init__.py) on sys.path, so the fit script imports as a module.
from kill_resume_run import CKPT_EVERY, EPOCHS, ROUNDS_PER_EPOCH, latest_checkpoint

SCRIPT = Path(__file__).resolve().with_name("kill_resume_run.py")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
KILL_FROM = 17  # kill at the first step >= this (epoch 1) that is neither a checkpoint step nor an epoch end


def run(out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), str(out), *args]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=ENV, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=False)


def progress(out: Path) -> int | None:
    try:
        return int((out / "progress").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def kill_mid_epoch(out: Path, *args: str) -> int:
    """Start a slowed-down fit and SIGKILL it mid-epoch, past a checkpoint; the step it reached."""
    # The child's output goes to a file, not a pipe: a full pipe would stall it. Every run works in
    # tmp_path, so nothing it might write to its working directory lands in the checkout.
    with open(out.parent / f"{out.name}.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--sleep", "0.15", *args], stdout=log, stderr=log,
                                env=ENV, cwd=out.parent)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                step = progress(out)
                # The run sleeps right after publishing `step`: a step that saves no checkpoint and does
                # not end an epoch means it is mid-epoch, with no checkpoint write in flight.
                mid_epoch = step is not None and step >= KILL_FROM and step % CKPT_EVERY and step % ROUNDS_PER_EPOCH
                if mid_epoch and (out / "ckpts" / "last.ckpt").exists():
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"the fit ended (rc={proc.returncode}) before it could be killed: {log.read()[-3000:]}")
                time.sleep(0.01)
            else:
                pytest.fail(f"no mid-epoch step >= {KILL_FROM} within 90 s (progress: {progress(out)})")
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return progress(out)


def check_checkpoints(directory: Path) -> list[str]:
    """Every checkpoint in ``directory`` loads; the only other files a kill may leave are
    AtomicCheckpointIO's hidden temporaries. Returns the checkpoint names."""
    files = os.listdir(directory)
    assert all(f.endswith(".ckpt") or (f.startswith(".") and f.endswith(".tmp")) for f in files), files
    ckpts = [f for f in files if f.endswith(".ckpt")]
    assert "last.ckpt" in ckpts
    for name in ckpts:
        assert "state_dict" in torch.load(directory / name, weights_only=False), name
    return ckpts


def test_sigkilled_fit_resumes_to_the_uninterrupted_result(tmp_path):
    straight = run(tmp_path / "straight")
    assert straight["start_step"] == 0 and straight["global_step"] == EPOCHS * ROUNDS_PER_EPOCH

    out = tmp_path / "killed"
    reached = kill_mid_epoch(out)
    assert not (out / "final.pt").exists()
    assert reached % ROUNDS_PER_EPOCH and reached < EPOCHS * ROUNDS_PER_EPOCH
    check_checkpoints(out / "ckpts")  # what the kill left behind
    resumed_from = torch.load(latest_checkpoint(out / "ckpts"), weights_only=False)["global_step"]
    # The resume really starts mid-epoch, behind the killed process, and from a checkpoint ahead of the start.
    assert 0 < resumed_from < reached and resumed_from % ROUNDS_PER_EPOCH, (resumed_from, reached)

    resumed = run(out, "--resume")
    assert resumed["start_step"] == resumed_from and resumed["global_step"] == straight["global_step"]
    assert resumed["comm"] == straight["comm"]
    assert resumed["faults"] == straight["faults"] and straight["faults"]["dropped_clients"] > 0
    assert resumed["privacy"] == straight["privacy"] == [(0.3, 4 / 32, EPOCHS * ROUNDS_PER_EPOCH)]
    assert resumed["state"].keys() == straight["state"].keys()
    for name, value in straight["state"].items():
        torch.testing.assert_close(resumed["state"][name], value, atol=1e-6, rtol=0, msg=name)

    ckpts = check_checkpoints(out / "ckpts")
    assert len(ckpts) == EPOCHS * ROUNDS_PER_EPOCH // CKPT_EVERY + 1  # every step checkpoint, and last.ckpt


def test_sigkilled_fit_with_spilled_client_state_resumes_to_the_uninterrupted_rows(tmp_path):
    """FedPer's heads (a store holding 3 rows in memory, the rest in a scratch file) come back from
    the last checkpoint exactly: the kill leaves no half-written state behind."""
    straight = run(tmp_path / "straight", "--algorithm", "fedper")
    out = tmp_path / "killed"
    kill_mid_epoch(out, "--algorithm", "fedper")
    check_checkpoints(out / "ckpts")
    resumed = run(out, "--resume", "--algorithm", "fedper")
    assert resumed["start_step"] > 0 and resumed["global_step"] == straight["global_step"]
    assert resumed["comm"] == straight["comm"] and resumed["faults"] == straight["faults"]
    assert len(straight["rows"]) > 3 and resumed["rows"].keys() == straight["rows"].keys()
    for client, row in straight["rows"].items():
        for name, value in row.items():
            torch.testing.assert_close(resumed["rows"][client][name], value, atol=1e-6, rtol=0, msg=f"{client} {name}")
    for name, value in straight["state"].items():
        torch.testing.assert_close(resumed["state"][name], value, atol=1e-6, rtol=0, msg=name)
