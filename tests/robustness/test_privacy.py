"""Client-level DP: clipping and noise scale by hand, ε against Opacus's accountant called directly."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, loader, mlp, quiet_trainer, sinusoid_batch, stacked
from opacus.accountants import PRVAccountant, RDPAccountant

import lightning_metafed as lm
from lightning_metafed.aggregators import TrimmedMean
from lightning_metafed.data import SinusoidClients
from lightning_metafed.inner import SGD
from lightning_metafed.privacy import ClientDP


def test_clipping_by_hand_and_zero_noise_gives_the_clipped_sum_over_sampled_clients():
    dp = ClientDP(clip_norm=1.0, noise_multiplier=0.0)
    # norms over all parameters: 5 → scaled by 1/5; 0.5 → kept; the third client was sampled but dropped
    updates = {"a": stacked([3.0], [0.3]), "b": stacked([4.0, 0.0], [0.4, 0.0])}
    out, norms = dp.aggregate(updates, sampled=3, seed=0, round_idx=0)
    torch.testing.assert_close(norms, stacked(5.0, 0.5))
    torch.testing.assert_close(out["a"], stacked((0.6 + 0.3) / 3))
    torch.testing.assert_close(out["b"], stacked((0.8 + 0.4) / 3, 0.0))


def test_noise_has_standard_deviation_sigma_times_clip_over_the_sampled_count():
    dp = ClientDP(clip_norm=0.5, noise_multiplier=2.0)
    zeros = {"w": torch.zeros(4, 200_000, dtype=torch.float64)}
    out, _ = dp.aggregate(zeros, sampled=4, seed=3, round_idx=7)
    expected = 2.0 * 0.5 / 4  # σC on the sum, divided by the sampled clients
    assert out["w"].std().item() == pytest.approx(expected, rel=0.01)
    assert abs(out["w"].mean().item()) < 4 * expected / 200_000**0.5
    # the noise is a pure function of (seed, round): reproducible, and different across rounds
    again, _ = dp.aggregate(zeros, sampled=4, seed=3, round_idx=7)
    other, _ = dp.aggregate(zeros, sampled=4, seed=3, round_idx=8)
    torch.testing.assert_close(again["w"], out["w"])
    assert not torch.allclose(other["w"], out["w"])


def test_a_round_under_dp_without_noise_or_clipping_is_the_unweighted_mean():
    batch = sinusoid_batch(4)
    private = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), privacy=ClientDP(clip_norm=1e6, noise_multiplier=0.0, sample_rate=0.1))
    plain = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), aggregator=lm.Mean(weighted=False))
    got, _ = private.round_gradients(batch)
    want, _ = plain.round_gradients(batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


@pytest.mark.parametrize("kind, reference", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_the_opacus_accountant_called_directly(kind, reference, tmp_path):
    data = SinusoidClients(num_clients=50, clients_per_round=5, support_size=5, query_size=5, rounds_per_epoch=6, seed=0)
    dp = ClientDP(clip_norm=1.0, noise_multiplier=1.1, delta=1e-4, accountant=kind, seed=0)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=dp)
    logger = pl.loggers.CSVLogger(tmp_path)
    quiet_trainer(max_epochs=1, logger=logger, log_every_n_steps=1).fit(model, datamodule=data)
    q = 5 / len(data.population("train"))  # clients per round over train clients (40 of 50)
    assert q == pytest.approx(5 / 40)
    accountant = reference()
    for _ in range(6):
        accountant.step(noise_multiplier=1.1, sample_rate=q)
    expected = accountant.get_epsilon(delta=1e-4)
    assert model.privacy_spent() == pytest.approx(expected, rel=1e-9)
    logged = [row for row in (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()]
    header = logged[0].split(",")
    column = header.index("privacy/epsilon")
    last = [line.split(",")[column] for line in logged[1:] if line.split(",")[column]][-1]
    assert float(last) == pytest.approx(expected, rel=1e-6)


def test_accountant_and_noise_seed_survive_a_checkpoint(tmp_path):
    data = SinusoidClients(num_clients=50, clients_per_round=5, support_size=5, query_size=5, rounds_per_epoch=3, seed=0)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=ClientDP(noise_multiplier=1.0, seed=5))
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    path = tmp_path / "dp.ckpt"
    trainer.save_checkpoint(path)
    restored = lm.MAML.load_from_checkpoint(path, net=mlp().float())
    assert restored.ledgers.privacy.accountant.history == model.ledgers.privacy.accountant.history == [(1.0, 5 / 40, 3)]
    assert restored.privacy_spent() == pytest.approx(model.privacy_spent())


@FIT_WITHOUT_VALIDATION
def test_dp_errors_are_clear_before_training():
    with pytest.raises(ValueError, match="`aggregator` must be the default Mean"):
        lm.MAML(mlp(), privacy=ClientDP(), aggregator=TrimmedMean(0.1))
    with pytest.raises(ValueError, match="`delta` in \\(0, 1\\), got 1.5"):
        ClientDP(delta=1.5)
    with pytest.raises(ValueError, match="`clip_norm`"):
        ClientDP(clip_norm=-1.0)
    with pytest.raises(ValueError, match="`accountant` to be one of"):
        ClientDP(accountant="moments")
    model = lm.MAML(mlp(), privacy=ClientDP())
    with pytest.raises(ValueError, match="ClientDP\\(sample_rate=...\\)"):
        quiet_trainer(max_steps=1).fit(model, loader(sinusoid_batch(3)))
    sized = SinusoidClients(num_clients=20, clients_per_round=2, client_sampling="size", support_size=5, query_size=5)
    with pytest.raises(ValueError, match="uniform client sampling"):
        quiet_trainer(max_steps=1).fit(lm.MAML(mlp().float(), privacy=ClientDP()), datamodule=sized)


def test_a_drawn_noise_seed_is_never_written_to_a_checkpoint(tmp_path):
    data = SinusoidClients(num_clients=50, clients_per_round=5, support_size=5, query_size=5, rounds_per_epoch=2, seed=0)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=ClientDP(noise_multiplier=1.0))  # seed=None
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "dp.ckpt")
    checkpoint = torch.load(tmp_path / "dp.ckpt", weights_only=False)
    assert model.ledgers.privacy.noise_seed is not None and str(model.ledgers.privacy.noise_seed) not in repr(checkpoint)  # the noise cannot be regenerated
    assert checkpoint["metafed_privacy"]["accountant"]["history"] == [(1.0, 5 / 40, 2)]


def test_testing_an_earlier_checkpoint_does_not_roll_back_privacy_spent_or_counters(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = SinusoidClients(num_clients=50, clients_per_round=5, support_size=5, query_size=5, rounds_per_epoch=6, seed=0)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=ClientDP(noise_multiplier=1.0, seed=1))
    every2 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[every2])
    trainer.fit(model, datamodule=data)
    spent, comm = model.privacy_spent(), dict(model.communication)
    trainer.test(model, datamodule=data, ckpt_path=str(tmp_path / "step=2.ckpt"), verbose=False)
    assert model.ledgers.privacy.accountant.history == [(1.0, 5 / 40, 6)] and model.privacy_spent() == spent
    assert model.communication == comm and comm["rounds"] == 6
    restored = lm.MAML.load_from_checkpoint(tmp_path / "step=2.ckpt", net=mlp().float())  # a fresh module restores
    assert restored.ledgers.privacy.accountant.history == [(1.0, 5 / 40, 2)] and restored.communication["rounds"] == 2


def test_without_noise_epsilon_is_infinite_for_both_accountants():
    for kind in ("rdp", "prv"):
        data = SinusoidClients(num_clients=50, clients_per_round=5, support_size=5, query_size=5, rounds_per_epoch=2, seed=0)
        model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=ClientDP(noise_multiplier=0.0, accountant=kind))
        quiet_trainer(max_epochs=1).fit(model, datamodule=data)  # the fit-end summary computes ε too
        assert model.privacy_spent() == float("inf"), kind
