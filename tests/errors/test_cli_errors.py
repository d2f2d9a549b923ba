"""The `metafed` console script on bad input: one paragraph on stderr, exit status 2, nothing trained
or written; evaluation without a checkpoint refused; a resume with a changed config lists every
difference and lets `--resume_with` decide."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ["--config", str(ROOT / "configs" / "sinusoid" / "maml.yaml"), "--config", str(ROOT / "configs" / "smoke.yaml")]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def metafed(*args: str, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "metafed"
    env = {k: v for k, v in os.environ.items() if k != "METAFED_DEBUG"}
    env["PYTHONWARNINGS"] = "ignore"
    if debug:
        env["METAFED_DEBUG"] = "1"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("metafed: error:")]


def versions(cwd: Path) -> list[str]:
    logs = cwd / "lightning_logs"
    return sorted(p.name for p in logs.iterdir()) if logs.exists() else []


def test_a_bad_value_is_one_paragraph_and_the_traceback_is_behind_debug(tmp_path):
    result = metafed("fit", *BASE, "--model.init_args.inner_steps", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result) == ["metafed: error: ValueError: Expected `inner_steps` to be an integer >= 0, got -1"]
    assert "Traceback" not in result.stderr and "--debug" in result.stderr
    assert versions(tmp_path) == []
    debug = metafed("fit", *BASE, "--model.init_args.inner_steps", "-1", cwd=tmp_path, debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "got -1" in debug.stderr


def test_evaluating_without_a_checkpoint_is_refused_unless_asked_for(tmp_path):
    for command in ("test", "validate"):
        result = metafed(command, *BASE, *QUIET, cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = error_lines(result)
        assert f"`metafed {command}` needs `--ckpt_path`" in line and "freshly initialised model" in line
    assert versions(tmp_path) == []
    allowed = metafed("test", *BASE, *QUIET, "--allow_untrained", "true", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


def test_ddp_with_fewer_clients_than_processes_is_one_message_at_setup(tmp_path):
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = metafed("fit", *BASE, *QUIET, *ddp, "--data.init_args.clients_per_round", "1", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "`clients_per_round` >= the number of DDP processes (2" in line and "got 1" in line
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One short fit whose last.ckpt the resume tests start from."""
    cwd = tmp_path_factory.mktemp("trained")
    result = metafed("fit", *BASE, *QUIET, "--test_after_fit", "false", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def ckpt(cwd: Path) -> str:
    return str(cwd / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")


def test_a_truncated_checkpoint_is_named(trained, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(Path(ckpt(trained)).read_bytes()[:5000])
    result = metafed("test", *BASE, *QUIET, "--ckpt_path", str(broken), cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert str(broken) in line and "truncated or not a checkpoint file" in line


CHANGED = [
    "--model.init_args.server_optimizer.init_args.lr", "0.01", "--data.init_args.clients_per_round", "5",
    "--model.init_args.inner_steps", "2",
]


def resume(cwd: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return metafed("fit", *BASE, *QUIET, "--trainer.max_epochs", "2", "--test_after_fit", "false",
                   f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", ckpt(cwd), *extra, cwd=tmp_path)


def test_resume_with_a_changed_config_lists_every_difference_before_anything_runs(trained, tmp_path):
    result = resume(trained, tmp_path, *CHANGED)
    assert result.returncode == 2
    assert "data.clients_per_round: checkpoint 25, this run 5" in result.stderr
    assert "server_optimizer.lr: checkpoint 0.001, this run 0.01" in result.stderr
    assert "model.inner_steps: checkpoint 1, this run 2" in result.stderr
    assert "--resume_with config" in result.stderr
    assert versions(tmp_path) == []


def last_of(root: Path) -> dict:
    (path,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_with_config_takes_the_new_values_and_keeps_the_optimizer_state(trained, tmp_path):
    result = resume(trained, tmp_path, *CHANGED, "--resume_with", "config")
    assert result.returncode == 0, result.stderr[-3000:]
    after = last_of(tmp_path)
    assert after["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01
    assert after["datamodule_hyper_parameters"]["clients_per_round"] == 5 and after["hyper_parameters"]["inner_steps"] == 2
    before = torch.load(ckpt(trained), map_location="cpu", weights_only=False)
    assert int(after["optimizer_states"][0]["state"][0]["step"]) > int(before["optimizer_states"][0]["state"][0]["step"])


def test_resume_with_checkpoint_runs_and_records_the_checkpoint_values(trained, tmp_path):
    result = resume(trained, tmp_path, *CHANGED, "--resume_with", "checkpoint")
    assert result.returncode == 0, result.stderr[-3000:]
    (config_path,) = tmp_path.glob("lightning_logs/version_*/config.yaml")
    config = yaml.safe_load(config_path.read_text())
    assert config["data"]["init_args"]["clients_per_round"] == 25 and config["model"]["init_args"]["inner_steps"] == 1
    assert config["model"]["init_args"]["server_optimizer"]["init_args"]["lr"] == 0.001
    assert last_of(tmp_path)["optimizer_states"][0]["param_groups"][0]["lr"] == 0.001


def test_a_changed_server_optimizer_class_is_reported_not_a_key_error(trained, tmp_path):
    sgd = ["--model.init_args.server_optimizer", "torch.optim.SGD", "--model.init_args.server_optimizer.init_args.lr", "0.1"]
    result = resume(trained, tmp_path, *sgd)
    assert result.returncode == 2 and "KeyError" not in result.stderr
    assert "server_optimizer: checkpoint torch.optim.adam.Adam, this run torch.optim.sgd.SGD" in result.stderr
    shutil.rmtree(tmp_path / "lightning_logs", ignore_errors=True)
    fresh = resume(trained, tmp_path, *sgd, "--resume_with", "config")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "momentum" in last_of(tmp_path)["optimizer_states"][0]["param_groups"][0]
