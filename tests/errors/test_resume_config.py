"""Python API: a resumed fit whose configuration differs from its checkpoint never mixes silently."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, loader, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.inner import SGD
from lightning_metafed.resume import config_differences, plain

# A plain list of batches is not a resumable loader; which batches the resumed rounds see does not matter here.
pytestmark = [FIT_WITHOUT_VALIDATION, pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")]
BATCHES = [sinusoid_batch(3, seed=s) for s in range(4)]


def model(lr: float = 1e-3, inner_steps: int = 1, optimizer=torch.optim.Adam):
    return lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), inner_steps=inner_steps, server_optimizer=functools.partial(optimizer, lr=lr))


@pytest.fixture
def checkpoint(tmp_path):
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(model(), loader(*BATCHES))
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    return path


def resume(m, path, *callbacks):
    trainer = quiet_trainer(max_steps=4, callbacks=list(callbacks))
    trainer.fit(m, loader(*BATCHES), ckpt_path=str(path))
    return trainer


def test_default_stops_and_lists_the_differences(checkpoint):
    with pytest.raises(ValueError, match=r"(?s)differs from the checkpoint.*model.inner_steps: checkpoint 1, this run 2.*server_optimizer.lr: checkpoint 0.001, this run 0.01"):
        resume(model(lr=0.01, inner_steps=2), checkpoint)


def test_same_configuration_resumes_silently(checkpoint):
    trainer = resume(model(), checkpoint)
    assert trainer.global_step == 4


def test_prefer_config_uses_the_new_lr_and_keeps_the_moments(checkpoint):
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]
    m = model(lr=0.01)
    trainer = quiet_trainer(max_steps=2, callbacks=[lm.ResumeCheck(prefer="config")])  # no round left: state as restored
    trainer.fit(m, loader(*BATCHES), ckpt_path=str(checkpoint))
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == 0.01
    first = next(iter(m.parameters()))
    torch.testing.assert_close(optimizer.state[first]["exp_avg"], saved["state"][0]["exp_avg"])


def test_prefer_config_with_another_optimizer_class_starts_its_state_afresh(checkpoint):
    m = model(lr=0.1, optimizer=torch.optim.SGD)
    with pytest.warns(UserWarning, match="different server optimizer class"):
        trainer = resume(m, checkpoint, lm.ResumeCheck(prefer="config"))
    assert trainer.global_step == 4 and isinstance(trainer.optimizers[0], torch.optim.SGD)


def test_prefer_checkpoint_keeps_the_saved_optimizer_but_cannot_rebuild_a_module(checkpoint):
    trainer = quiet_trainer(max_steps=2, callbacks=[lm.ResumeCheck(prefer="checkpoint")])
    trainer.fit(model(lr=0.01), loader(*BATCHES), ckpt_path=str(checkpoint))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.001
    with pytest.raises(ValueError, match=r"(?s)cannot rebuild them here.*model.inner_steps"):
        resume(model(inner_steps=2), checkpoint, lm.ResumeCheck(prefer="checkpoint"))


def test_prefer_is_validated():
    with pytest.raises(ValueError, match=r"Expected `prefer` \(`--resume_with`\) to be 'error', 'config' or 'checkpoint', got 'new'"):
        lm.ResumeCheck(prefer="new")


def test_objects_and_cli_dicts_compare_alike_and_new_defaults_are_not_differences():
    cli = {"class_path": "lightning_metafed.inner.SGD", "init_args": {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}}
    assert plain(SGD(lr=0.01)) == plain(cli)
    assert config_differences("model", {"a": (1, 2)}, {"a": [1, 2], "new": "raise"}, {"new": "raise"}) == []
    assert config_differences("model", {"a": 1}, {"a": 1, "new": "skip"}, {"new": "raise"}) == [
        "model.new: checkpoint '<not set>', this run 'skip'"
    ]


def scheduled(lr: float = 1e-3):
    return lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), server_optimizer=functools.partial(torch.optim.Adam, lr=lr),
                   server_lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))


def test_a_scheduled_lr_is_not_a_difference_and_config_rescales_the_schedule(tmp_path):
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(scheduled(), loader(*BATCHES))
    path = tmp_path / "scheduled.ckpt"
    trainer.save_checkpoint(path)
    assert resume(scheduled(), path).global_step == 4  # unchanged config: the decayed lr is not a difference
    with pytest.raises(ValueError, match=r"server_optimizer.lr: checkpoint 0.001, this run 0.002"):
        resume(scheduled(lr=2e-3), path)
    again = quiet_trainer(max_steps=2, callbacks=[lm.ResumeCheck(prefer="config")])
    again.fit(scheduled(lr=2e-3), loader(*BATCHES), ckpt_path=str(path))
    assert again.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-3 * 0.25)  # two decays from the new base


def test_objects_compare_by_their_constructor_arguments():
    cli = {"class_path": "lightning_metafed.Mean", "init_args": {"weighted": True}}
    assert plain(lm.Mean()) == plain(cli)
    assert plain(lm.aggregators.Bucketing(lm.CoordinateMedian(), 2)) == {"class": "Bucketing", "aggregator": {"class": "CoordinateMedian"}, "bucket_size": 2}
