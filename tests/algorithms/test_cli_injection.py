"""LightningCLI sees every constructor knob and can inject `net` and config objects by class_path."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import lightning_metafed as lm
from lightning_metafed.inner import Adam


def test_lightning_cli_builds_module_with_class_path_objects():
    cli = LightningCLI(
        lm.MetaFedModule,
        subclass_mode_model=True,
        run=False,
        args=[
            "--model=lightning_metafed.MetaSGD",
            "--model.net=torch.nn.Linear",
            "--model.net.in_features=3",
            "--model.net.out_features=2",
            "--model.inner_optimizer=lightning_metafed.inner.Adam",
            "--model.inner_optimizer.lr=0.05",
            "--model.inner_steps=2",
            "--model.lr_granularity=tensor",
            "--model.server_optimizer=torch.optim.SGD",
            "--model.server_optimizer.lr=1.0",
            "--model.aggregator=lightning_metafed.Mean",
            "--model.aggregator.weighted=false",
            "--trainer.logger=false",
            "--seed_everything=0",
        ],
    )
    model = cli.model
    assert isinstance(model, lm.MetaSGD)
    assert isinstance(model.net, torch.nn.Linear) and model.net.in_features == 3
    assert isinstance(model.inner_optimizer, Adam) and model.inner_optimizer.lr == 0.05
    assert model.inner_steps == 2 and model.inner_lrs["weight"].shape == ()
    assert model.aggregator.weighted is False
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 1.0


def test_lightning_cli_rejects_a_bad_value_before_training():
    with pytest.raises(SystemExit):
        LightningCLI(
            lm.MetaFedModule,
            subclass_mode_model=True,
            run=False,
            args=["--model=lightning_metafed.PerFedAvg", "--model.net=torch.nn.Linear", "--model.net.in_features=1",
                  "--model.net.out_features=1", "--model.variant=so", "--trainer.logger=false"],
        )
