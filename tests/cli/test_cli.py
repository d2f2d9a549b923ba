"""The `metafed` command: configs, fit → test round trip, TensorBoard tags, resume, precision, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_metafed.checkpoint import AtomicCheckpointIO
from lightning_metafed.cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "smoke.yaml")
SMOKE = ROOT / "configs" / "smoke.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def metafed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed console script (the real entry point)."""
    exe = Path(sys.executable).parent / "metafed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_configs_directory_has_one_config_per_algorithm_and_dataset():
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert names == {
        "sinusoid/maml.yaml",
        "sinusoid/fomaml.yaml",
        "sinusoid/metasgd.yaml",
        "sinusoid/reptile.yaml",
        "synthetic/perfedavg_fo.yaml",
        "synthetic/perfedavg_hf.yaml",
        "synthetic/fedavg.yaml",
        "synthetic/fedper.yaml",
        "synthetic/fedrep.yaml",
        "synthetic/ditto.yaml",
        "synthetic/apfl.yaml",
        "synthetic/scaffold.yaml",
        "synthetic/maml.yaml",
        "synthetic/maml_faults.yaml",
        "synthetic/maml_dp.yaml",
        "synthetic/maml_dp_adaptive.yaml",
        "digits/maml.yaml",
        "digits/anil.yaml",
        "digits/fedavg.yaml",
        "digits/fedavg_topk.yaml",
        "digits/fedrep.yaml",
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_prints_and_fits_a_few_rounds(config, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_metafed." in printed and "data:" in printed
    cli = build_cli(["fit", "--config", str(config), "--config", str(SMOKE), f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert cli.trainer.global_step == 3
    metrics = cli.trainer.callback_metrics
    assert "test/loss_post" in metrics and math.isfinite(float(metrics["test/loss_post"]))
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").exists()
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # checkpoints are never half-written


@pytest.mark.parametrize("config", ["sinusoid/maml.yaml", "digits/anil.yaml"])
def test_console_script_fit_then_test_round_trip(config, tmp_path):
    fit = metafed("fit", "--config", str(ROOT / "configs" / config), "--config", str(SMOKE), *QUIET, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "test/loss_post" in fit.stdout
    assert "Logs and checkpoints:" in fit.stdout + fit.stderr and "tensorboard --logdir" in fit.stdout + fit.stderr
    log_dir = tmp_path / "lightning_logs" / "version_0"
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.exists() and (log_dir / "config.yaml").exists() and (log_dir / "hparams.yaml").exists()
    test = metafed("test", "--config", str(log_dir / "config.yaml"), "--ckpt_path", str(last), *QUIET, cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/loss_post" in test.stdout and "test/loss_pre" in test.stdout


def test_tensorboard_event_files_hold_round_and_evaluation_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = build_cli(
        ["fit", "--config", str(ROOT / "configs/digits/maml.yaml"), "--config", str(SMOKE), f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/meta_loss",
        "train/update_norm",
        "train/server_lr",
        "train/loss_support_pre",
        "train/loss_support_post",
        "train/loss_query_pre",
        "train/loss_query_post",
        "val/loss_pre",
        "val/loss_post",
        "val/acc_pre",
        "val/acc_post",
        "test/acc_post",
    }
    assert expected <= tags, expected - tags
    hparams = (Path(cli.trainer.log_dir) / "hparams.yaml").read_text()
    assert "inner_steps: 2" in hparams and "clients_per_round: 8" in hparams


def _state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return ckpt["state_dict"], ckpt["optimizer_states"][0], ckpt["global_step"]


# The run is resumed mid-epoch on purpose, and the test checks what Lightning's warning about that fears: the
# resumed run reaches the uninterrupted parameters (rounds are a function of the step, not of loader state).
# It logs into a new version directory, so Lightning also notes that the checkpoint directory moved.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended:UserWarning")
@pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")
def test_interrupted_fit_resumed_with_ckpt_path_equals_uninterrupted_fit(tmp_path):
    base = ["--config", str(ROOT / "configs/sinusoid/metasgd.yaml"), "--data.rounds_per_epoch=4", "--trainer.limit_val_batches=1",
            "--trainer.max_epochs=-1", "--test_after_fit=false", "--checkpoint.every_n_train_steps=3",
            "--trainer.log_every_n_steps=1", *QUIET]
    straight = build_cli(["fit", *base, "--trainer.max_steps=10", f"--trainer.default_root_dir={tmp_path / 'a'}"])
    first = build_cli(["fit", *base, "--trainer.max_steps=6", f"--trainer.default_root_dir={tmp_path / 'b'}"])
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert _state(last)[2] == 6  # stopped mid-epoch (epochs of 4 rounds)
    resumed = build_cli(["fit", *base, "--trainer.max_steps=10", f"--trainer.default_root_dir={tmp_path / 'b'}", f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == 10
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    opt_a, opt_b = straight.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for key in opt_a["state"]:
        torch.testing.assert_close(opt_a["state"][key]["exp_avg_sq"], opt_b["state"][key]["exp_avg_sq"], atol=1e-9, rtol=0)


def test_bf16_mixed_second_order_maml_fit_has_finite_loss(tmp_path):
    cli = build_cli(
        ["fit", "--config", str(ROOT / "configs/sinusoid/maml.yaml"), "--config", str(SMOKE), "--trainer.precision=bf16-mixed",
         "--model.init_args.inner_steps=2", "--test_after_fit=false", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    assert cli.trainer.precision == "bf16-mixed" and cli.model.first_order is False
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/meta_loss"])) and math.isfinite(float(metrics["val/loss_post"]))
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_checkpointing_can_be_switched_off_from_the_command_line(tmp_path):
    cli = build_cli(
        ["fit", "--config", str(ROOT / "configs/sinusoid/maml.yaml"), "--config", str(SMOKE), "--trainer.enable_checkpointing=false",
         "--test_after_fit=false", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    assert cli.trainer.global_step == 3 and cli.trainer.checkpoint_callback is None
    assert not list(Path(tmp_path).rglob("*.ckpt"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.init_args.no_such_knob=3"], "no_such_knob"),
        (["--model.init_args.inner_steps=abc"], "inner_steps"),
        (["--model=lightning_metafed.NoSuchAlgorithm"], "NoSuchAlgorithm"),
        (["--data.init_args.protocol=everywhere"], "protocol"),
    ],
)
def test_bad_cli_input_exits_nonzero_with_a_parser_message(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(ROOT / "configs/sinusoid/maml.yaml"), *extra, f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_console_script_bad_input_has_no_traceback(tmp_path):
    result = metafed("fit", "--config", str(ROOT / "configs/sinusoid/maml.yaml"), "--model.init_args.inner_steps=-3", cwd=tmp_path)
    assert result.returncode != 0
    assert "inner_steps" in result.stderr


def test_short_class_names_and_net_class_path_from_the_command_line(tmp_path):
    cli = build_cli(
        ["fit", "--model=MAML", "--model.net=lightning_metafed.nets.MLP", "--model.net.hidden=[8]", "--data=SinusoidClients",
         "--data.num_clients=100", "--data.clients_per_round=4", "--data.rounds_per_epoch=2", "--trainer.max_epochs=1",
         "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--test_after_fit=false",
         f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    assert type(cli.model).__name__ == "MAML" and cli.model.net[0].out_features == 8
    assert type(cli.datamodule).__name__ == "SinusoidClients" and cli.trainer.global_step == 2
