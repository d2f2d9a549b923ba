"""The server step under mixed precision and with frozen parameters, on both round paths."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, loader, mlp, quiet_trainer, sinusoid_batch
from lightning.pytorch.plugins.precision import MixedPrecision

import lightning_metafed as lm
from lightning_metafed.inner import SGD

SERVER_SGD_1 = functools.partial(torch.optim.SGD, lr=1.0)  # θ ← θ − aggregate


def one_round(fast_path: bool, **trainer_kwargs) -> dict[str, torch.Tensor]:
    batch = sinusoid_batch(4).to(dtype=torch.float32)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), fast_path=fast_path, server_optimizer=SERVER_SGD_1)
    quiet_trainer(max_steps=1, **trainer_kwargs).fit(model, loader(batch))
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("fast_path", [True, False])
def test_16_mixed_moves_the_parameters_by_the_aggregate_not_by_it_over_the_loss_scale(fast_path):
    """A GradScaler divides .grad by its scale in the step: the server step must write the scaled aggregate."""
    start = {k: p.detach() for k, p in lm.MAML(mlp().float()).named_parameters()}
    full = one_round(fast_path)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    mixed = one_round(fast_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    for name, value in full.items():
        moved = (value - start[name]).abs().max()
        assert moved > 0.1, name  # the round changes the parameters noticeably
        # fp16 autocast rounds the clients' math; a missing or double loss scale would be off by 2**16
        torch.testing.assert_close(mixed[name] - start[name], value - start[name], atol=0.01 * float(moved), rtol=0.01, msg=name)


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("fast_path", [True, False])
def test_frozen_parameters_stay_and_the_rest_train_alike_on_both_paths(fast_path):
    batch = sinusoid_batch(4)
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), fast_path=fast_path, server_optimizer=SERVER_SGD_1)
    model.net[0].requires_grad_(False)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    aggregate = model.run_round(batch).aggregate
    quiet_trainer(max_steps=1).fit(model, loader(batch))
    reference = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), fast_path=False).client_updates(batch)
    for name, p in model.named_parameters():
        if name.startswith("net.0."):
            torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)
        else:
            want = (reference[name] * batch.weight.view(-1, *[1] * (reference[name].dim() - 1))).sum(0) / batch.weight.sum()
            torch.testing.assert_close(aggregate[name], want, msg=name)
            torch.testing.assert_close(p.detach(), before[name] - want, msg=name)
