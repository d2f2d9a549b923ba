"""Adaptive clipping (Andrew et al., 2021) in a Lightning fit: the clip-norm sequence replayed by
hand, the same ε as fixed clipping, exact resume, and errors before training."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import mlp, quiet_trainer

import lightning_metafed as lm
from lightning_metafed.data import SinusoidClients
from lightning_metafed.data.seeding import CLIP_COUNT, generator
from lightning_metafed.functional.aggregate import update_norms
from lightning_metafed.inner import SGD
from lightning_metafed.privacy import ClientDP


def data(rounds: int) -> SinusoidClients:
    return SinusoidClients(num_clients=50, clients_per_round=5, support_size=5, query_size=5, rounds_per_epoch=rounds, seed=0)


def adaptive(**overrides) -> ClientDP:
    args = dict(clip_norm=0.05, noise_multiplier=1.0, target_quantile=0.5, clip_lr=0.5, seed=3, count_stddev=1.0)
    return ClientDP(**{**args, **overrides})


def logged(path, column: str) -> list[float]:
    lines = path.read_text().splitlines()
    index = lines[0].split(",").index(column)
    return [float(row.split(",")[index]) for row in lines[1:] if row.split(",")[index]]


def test_clip_norm_sequence_of_a_fit_equals_the_papers_update_replayed_by_hand(tmp_path):
    """Server lr 0 keeps the parameters fixed, so every round's uploads can be recomputed: each
    round's next clip norm is C·exp(−η(b̃ − γ)), b̃ = clamp((Σ_i (1[‖Δ_i‖ <= C] − ½) + N(0, σ_b²)) / m + ½),
    σ_b = 1."""
    rounds = 8
    dp = adaptive(clip_norm=0.2, clip_lr=1.0)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=dp, server_optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    dm = data(rounds)
    logger = pl.loggers.CSVLogger(tmp_path)
    quiet_trainer(max_epochs=1, logger=logger, log_every_n_steps=1).fit(model, datamodule=dm)

    reference, fresh = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05)), data(rounds)
    fresh.setup("fit")
    c, expected, unclipped_counts = 0.2, [], []
    for r, batch in enumerate(fresh.train_dataloader()):  # the same rounds as the fit's first epoch
        norms = update_norms(reference.client_updates(batch))
        unclipped = int((norms <= c).sum())
        noise = 1.0 * float(torch.randn((), generator=generator(3, CLIP_COUNT, r), dtype=torch.float64))
        fraction = min(1.0, max(0.0, (unclipped - 5 / 2 + noise) / 5 + 0.5))  # centred count, clamped
        c = c * math.exp(-1.0 * (fraction - 0.5))
        expected.append(c)
        unclipped_counts.append(unclipped)
    assert len(expected) == rounds
    assert 0 in unclipped_counts and any(n > 0 for n in unclipped_counts)  # the norm grew until some clients fit under it
    got = logged(tmp_path / "lightning_logs/version_0/metrics.csv", "privacy/clip_norm")
    assert got == pytest.approx(expected, rel=1e-6)
    assert model.ledgers.privacy.clip_norm == pytest.approx(expected[-1], rel=1e-12)
    clipped = logged(tmp_path / "lightning_logs/version_0/metrics.csv", "privacy/clipped")
    assert clipped == [5 - n for n in unclipped_counts]


def test_adaptive_clipping_spends_the_privacy_of_its_noise_multiplier_and_says_so(caplog):
    """Same accountant history (and ε) as fixed clipping with the same noise multiplier; the sum's
    own noise multiplier is raised to z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)."""
    fixed = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=ClientDP(clip_norm=0.05, noise_multiplier=1.0, seed=3))
    moving = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=adaptive())
    for model in (fixed, moving):
        quiet_trainer(max_epochs=1).fit(model, datamodule=data(4))
    assert moving.ledgers.privacy.accountant.history == fixed.ledgers.privacy.accountant.history == [(1.0, 5 / 40, 4)]
    assert moving.privacy_spent() == fixed.privacy_spent()
    assert moving.privacy.sum_noise_multiplier(5) == pytest.approx((1.0 - 2.0**-2) ** -0.5)  # σ_b = 1
    assert fixed.privacy.sum_noise_multiplier(5) == 1.0
    out = caplog.text
    assert "adaptive clip norm 0.05 →" in out and "target quantile 0.5" in out


# The resumed fit needs no checkpoint callback of its own; Lightning's reminder about it is expected.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_resume_continues_the_adaptive_clip_norm_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def model():
        return lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=adaptive(count_stddev=2.0))

    straight = model()
    quiet_trainer(max_epochs=1).fit(straight, datamodule=data(6))
    every3 = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    first = model()
    quiet_trainer(max_steps=3, enable_checkpointing=True, callbacks=[every3]).fit(first, datamodule=data(6))
    saved = torch.load(tmp_path / "step=3.ckpt", weights_only=False)["metafed_privacy"]
    assert saved["clip_norm"] == first.ledgers.privacy.clip_norm != 0.05
    resumed = model()
    quiet_trainer(max_epochs=1).fit(resumed, datamodule=data(6), ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert resumed.ledgers.privacy.clip_norm == straight.ledgers.privacy.clip_norm
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_adaptive_clipping_errors_are_clear_before_training():
    with pytest.raises(ValueError, match="`target_quantile`.*got 1.0"):
        ClientDP(target_quantile=1.0)
    with pytest.raises(ValueError, match="`clip_lr`"):
        ClientDP(target_quantile=0.5, clip_lr=0.0)
    with pytest.raises(ValueError, match="`count_stddev`"):
        ClientDP(target_quantile=0.5, count_stddev=-1.0)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), privacy=adaptive(count_stddev=None))  # σ_b = 5/20 < z/2
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="`count_stddev` > noise_multiplier / 2 = 0.5.*got 0.25"):
        quiet_trainer(max_epochs=1).fit(model, datamodule=data(2))
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


def test_the_released_count_is_centred_so_one_client_moves_it_by_a_half():
    """b̃ = (Σ_survivors (b_i − ½) + noise) / sampled + ½: adding an unclipped client moves the
    statistic by +½ / sampled, a clipped one by −½ (the sensitivity ½ behind z_Δ's 2σ_b)."""
    dp = ClientDP(noise_multiplier=0.0, target_quantile=0.3, clip_lr=0.5)  # no noise: the exact statistic

    def fraction(unclipped: int, survivors: int, sampled: int = 10) -> float:
        return math.log(dp.next_clip_norm(1.0, unclipped, survivors, sampled, seed=0, round_idx=0)) / -0.5 + 0.3

    assert fraction(4, 6) == pytest.approx((4 - 3) / 10 + 0.5)  # 6 of 10 survived, 4 unclipped
    assert fraction(5, 7) - fraction(4, 6) == pytest.approx(0.5 / 10)  # one more, unclipped
    assert fraction(4, 7) - fraction(4, 6) == pytest.approx(-0.5 / 10)  # one more, clipped
    assert fraction(3, 10) == pytest.approx(0.3)  # nobody dropped: the plain fraction


def test_the_noisy_fraction_is_clamped_to_the_unit_interval():
    """With huge count noise b̃ hits 0 and 1: the clip norm moves by at most exp(η·γ) up and
    exp(η·(1 − γ)) down per round."""
    dp = ClientDP(noise_multiplier=1.0, target_quantile=0.2, clip_lr=0.5, count_stddev=1e6)
    ratios = torch.tensor([dp.next_clip_norm(1.0, 5, 10, 10, seed=1, round_idx=r) for r in range(200)], dtype=torch.float64)
    up, down = math.exp(0.5 * 0.2), math.exp(-0.5 * 0.8)
    assert float(ratios.max()) == pytest.approx(up) and float(ratios.min()) == pytest.approx(down)
    assert bool(((ratios == ratios.max()) | (ratios == ratios.min())).all())  # every draw is far outside [0, 1]
