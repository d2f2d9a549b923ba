"""No run ends with NaN meta-parameters: the server step is checked, restored and blamed correctly."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, loader, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.inner import SGD
from lightning_metafed.round import NonFiniteRoundError, server_step

pytestmark = FIT_WITHOUT_VALIDATION


def half_batch(m: int = 4):
    return sinusoid_batch(m, dtype=torch.float16)


def test_fp16_adam_step_is_restored_and_blamed_on_eps():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float16))
    optimizer = torch.optim.Adam([w], lr=1e-3)  # eps=1e-8 is 0 in float16: a zero gradient gives 0 / 0
    with pytest.raises(NonFiniteRoundError, match=r"Round 7: .* eps=1e-08 rounds to 0 in torch.float16") as info:
        server_step(optimizer, {"w": w}, {"w": torch.tensor([0.0, 1e-3], dtype=torch.float16)}, round_idx=7)
    assert info.value.stage == "server step" and "restored" in str(info.value)
    assert w.detach().tolist() == [1.0, -2.0] and optimizer.state_dict()["state"] == {} and w.grad is None


def test_restore_brings_back_exactly_the_parameters_and_state_before_the_step():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([w], lr=10.0, momentum=0.9)
    server_step(optimizer, {"w": w}, {"w": torch.tensor([1.0, 1.0])})
    before = w.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[w].items()}
    with pytest.raises(NonFiniteRoundError, match="server optimizer's step overflowed"):
        server_step(optimizer, {"w": w}, {"w": torch.tensor([3e38, 1.0])})  # finite, but lr × it overflows
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)
    for key, value in optimizer.state[w].items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def fp16_model(**kwargs):
    net = mlp().half()
    return lm.MAML(net, inner_optimizer=SGD(lr=0.01), server_optimizer=functools.partial(torch.optim.Adam, lr=1e-3), **kwargs)


def test_a_float16_net_never_ends_a_fit_with_nan_parameters():
    """A one-round fit used to return normally with NaN parameters; now the step is refused by name."""
    model = fp16_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(NonFiniteRoundError, match=r"Round 0: the aggregated update was finite .* eps=1e-08 rounds to 0"):
        quiet_trainer(max_steps=3).fit(model, loader(*[half_batch() for _ in range(3)]))
    for k, v in model.named_parameters():  # restored to before round 0's step
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)


def test_skip_option_keeps_training_with_finite_parameters_and_optimizer_state():
    model = fp16_model(on_nonfinite="skip")
    trainer = quiet_trainer(max_steps=3)
    with pytest.warns(UserWarning, match="Skipping the round"):
        trainer.fit(model, loader(*[half_batch() for _ in range(3)]))
    assert model.global_step == 3
    assert all(torch.isfinite(v).all() for v in model.parameters())
    assert model.fault_counts["nonfinite_rounds"] >= 1
    # the optimizer the Trainer steps and checkpoints (not only Lightning's wrapper) was restored too
    state = [v for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in state)


def test_nonfinite_uploads_are_blamed_on_the_clients_and_can_be_skipped():
    batch = sinusoid_batch(3)
    batch.support_y[:, 0, 0] = float("inf")
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), on_nonfinite="skip")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.warns(UserWarning, match="every one of the 3 client uploads holds NaN/inf.*Skipping the round"):
        quiet_trainer(max_steps=2).fit(model, loader(batch, sinusoid_batch(3, seed=1)))
    assert model.global_step == 2 and model.fault_counts["nonfinite_rounds"] == 1
    assert any(not torch.equal(before[k], v.detach()) for k, v in model.named_parameters())  # round 1 trained
    raising = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01))
    with pytest.raises(NonFiniteRoundError) as info:
        quiet_trainer(max_steps=1).fit(raising, loader(batch))
    assert info.value.stage == "uploads"


def test_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match="Expected `on_nonfinite` to be 'raise' or 'skip', got 'ignore'"):
        lm.MAML(mlp(), on_nonfinite="ignore")


def test_a_skipped_round_steps_the_scheduler_and_spends_privacy():
    from lightning_metafed.round import RoundLedgers

    ledgers = RoundLedgers(None, True, lm.ClientDP(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.1))
    assert ledgers.record_nonfinite(None) == 1 and len(ledgers.privacy.accountant.history) == 1
    batch = sinusoid_batch(3)
    batch.support_y[:, 0, 0] = float("nan")
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), on_nonfinite="skip",
                    server_lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    trainer = quiet_trainer(max_steps=2)
    with pytest.warns(UserWarning, match="Skipping the round"):
        trainer.fit(model, loader(batch, batch))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)


def test_an_empty_step_under_16_mixed_counts_without_crashing():
    from lightning.pytorch.plugins.precision import MixedPrecision

    batch = sinusoid_batch(3).to(dtype=torch.float32)
    batch.support_y[:, 0, 0] = float("inf")
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.01), on_nonfinite="skip")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.warns(UserWarning, match="Skipping the round"):
        quiet_trainer(max_steps=1, plugins=[plugin]).fit(model, loader(batch))
    assert model.global_step == 1
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)
