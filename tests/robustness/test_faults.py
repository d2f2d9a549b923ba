"""Dropout, per-client step budgets (vmap masking == loop == stopping early), Byzantine uploads,
non-finite rejection."""

from __future__ import annotations

import functools
from dataclasses import replace

import lightning.pytorch as pl
import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, console_text, loader, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.aggregators import CoordinateMedian
from lightning_metafed.data import SinusoidClients
from lightning_metafed.faults import ClientFaults
from lightning_metafed.inner import SGD, Adam

SERVER_SGD_1 = functools.partial(torch.optim.SGD, lr=1.0)


# name -> (builder taking the full step count, the argument it sets)
BUDGETED = {
    "maml": lambda n, **kw: lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=n, **kw),
    "maml_adam": lambda n, **kw: lm.MAML(mlp(), inner_optimizer=Adam(lr=0.01), inner_steps=n, **kw),
    "fomaml": lambda n, **kw: lm.MAML(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=n, first_order=True, **kw),
    "metasgd": lambda n, **kw: lm.MetaSGD(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=n, **kw),
    "anil": lambda n, **kw: lm.ANIL(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=n, **kw),
    "reptile": lambda n, **kw: lm.Reptile(mlp(), inner_optimizer=SGD(lr=0.05), inner_steps=n, **kw),
    "perfedavg_fo": lambda n, **kw: lm.PerFedAvg(mlp(), inner_optimizer=SGD(lr=0.05), variant="fo", local_steps=n, **kw),
    "perfedavg_hf": lambda n, **kw: lm.PerFedAvg(mlp(), inner_optimizer=SGD(lr=0.05), variant="hf", local_steps=n, **kw),
    # full-batch local training: one local step per epoch
    "fedavg": lambda n, **kw: lm.FedAvg(mlp(), inner_optimizer=SGD(lr=0.05), local_epochs=n, **kw),
}


@pytest.mark.parametrize("name", sorted(BUDGETED))
def test_step_budgets_under_vmap_equal_the_loop_and_stopping_early(name):
    """Masked steps (vmap) == exact per-client step counts (loop) == a model configured with that count."""
    budgets = torch.tensor([3, 1, 0, 2, 3]) if not name.startswith(("perfedavg", "fedavg")) else torch.tensor([3, 1, 1, 2, 3])
    batch = replace(sinusoid_batch(5), num_steps=budgets)
    vec = BUDGETED[name](3).client_updates(batch)
    loop = BUDGETED[name](3, vectorize=False).client_updates(batch)
    for i, steps in enumerate(budgets.tolist()):
        if name == "reptile" and steps == 0:  # Reptile(inner_steps=0) is refused: its upload θ − θ is zero
            reference = {k: torch.zeros_like(v[i : i + 1]) for k, v in vec.items()}
        else:
            reference = BUDGETED[name](steps).client_updates(replace(batch[i], num_steps=None))
        for key in vec:
            torch.testing.assert_close(loop[key][i], reference[key][0], msg=f"loop {key} client {i}")
            torch.testing.assert_close(vec[key][i], reference[key][0], msg=f"vmap {key} client {i}")


def test_round_with_step_choices_is_identical_vectorized_and_looped():
    faults = ClientFaults(step_choices=[0, 1, 2, 3], step_probs=[0.1, 0.2, 0.3, 0.4], seed=4)
    batch = sinusoid_batch(6)
    vec, _ = BUDGETED["maml"](3, faults=faults).round_gradients(batch)
    loop, _ = BUDGETED["maml"](3, faults=faults, vectorize=False).round_gradients(batch)
    full, _ = BUDGETED["maml"](3).round_gradients(batch)
    for key in vec:
        torch.testing.assert_close(vec[key], loop[key])
    assert any(not torch.allclose(vec[k], full[k]) for k in vec)  # the budgets did change the round
    budgets = faults.num_steps(0, 6)
    assert budgets.tolist() == faults.num_steps(0, 6).tolist() and set(budgets.tolist()) <= {0, 1, 2, 3}


def test_step_choices_above_the_configured_steps_are_rejected_by_name():
    model = BUDGETED["maml"](2, faults=ClientFaults(step_choices=[1, 5]))
    with pytest.raises(ValueError, match="`faults.step_choices` value <= `inner_steps` = 2"):
        model.round_gradients(sinusoid_batch(3))
    pfa = BUDGETED["perfedavg_fo"](1, faults=ClientFaults(step_choices=[2]))
    with pytest.raises(ValueError, match="`local_steps` = 1"):
        pfa.round_gradients(sinusoid_batch(3))


def test_dropped_clients_contribute_nothing_and_upload_nothing():
    faults = ClientFaults(dropout=0.5, seed=1)
    batch = sinusoid_batch(8)
    dropped = faults.dropped(0, 8)
    assert 0 < int(dropped.sum()) < 8  # this seed drops some but not all
    model = BUDGETED["maml"](1, faults=faults)
    got, _ = model.round_gradients(batch)
    want, _ = BUDGETED["maml"](1).round_gradients(batch[~dropped])
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    per_client = model.ledgers.communication.last["download_bytes_per_client"]
    assert model.communication["download_bytes"] == 8 * per_client
    assert model.communication["upload_bytes"] == int((~dropped).sum()) * per_client


def test_fit_with_dropout_completes_and_counts(tmp_path):
    data = SinusoidClients(num_clients=30, clients_per_round=4, support_size=5, query_size=5, rounds_per_epoch=10, seed=0)
    faults = ClientFaults(dropout=0.4, seed=2)
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.05), faults=faults)
    trainer = quiet_trainer(max_epochs=1, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(model, datamodule=data)
    expected = sum(int(faults.dropped(r, 4).sum()) for r in range(10))
    skipped = sum(bool(faults.dropped(r, 4).all()) for r in range(10))
    assert trainer.global_step == 10
    assert model.fault_counts["dropped_clients"] == expected > 0
    assert model.fault_counts["skipped_rounds"] == skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    metrics = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()
    assert "faults/dropped_total" in metrics


@FIT_WITHOUT_VALIDATION
def test_a_round_without_survivors_skips_the_server_step(capsys, caplog):
    faults = ClientFaults(dropout=0.99, seed=0)
    assert all(faults.dropped(r, 3).all() for r in range(3))  # every client of rounds 0-2 drops out
    model = BUDGETED["maml"](1, faults=faults, server_optimizer=torch.optim.Adam)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = quiet_trainer(max_steps=3)
    with caplog.at_level("INFO"):
        trainer.fit(model, loader(*[sinusoid_batch(3)] * 3))
    assert trainer.global_step == 3  # the rounds still count
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), before[k])
    assert len(trainer.optimizers[0].state) == 0  # Adam never stepped: no moments, no step count
    assert model.fault_counts["skipped_rounds"] == 3 and model.communication["upload_bytes"] == 0
    assert "all 3 sampled clients dropped out; server step skipped" in console_text(capsys, caplog)


@FIT_WITHOUT_VALIDATION
@pytest.mark.parametrize("fast_path", [True, False])
def test_a_nan_client_is_rejected_counted_and_logged(fast_path, tmp_path):
    batch = sinusoid_batch(4)
    batch.support_y[1, 0, 0] = float("nan")
    model = BUDGETED["maml"](1, fast_path=fast_path, server_optimizer=SERVER_SGD_1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    keep = torch.tensor([True, False, True, True])
    clean, _ = BUDGETED["maml"](1).round_gradients(batch[keep])
    trainer = quiet_trainer(max_steps=1, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    with pytest.warns(UserWarning, match="rejected 1 of 4 client uploads holding NaN/inf"):
        trainer.fit(model, loader(batch))
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), before[k] - clean[k])  # θ − weighted mean of the 3 finite clients
    assert model.fault_counts["rejected_uploads"] == 1
    metrics = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("robust/rejected_total")
    assert float(metrics[1].split(",")[column]) == 1.0


def test_a_round_where_every_upload_is_nan_still_raises():
    batch = sinusoid_batch(3)
    batch.support_y[:, 0, 0] = float("nan")
    model = BUDGETED["maml"](1, fast_path=False)
    with pytest.raises(FloatingPointError, match="every one of the 3 client uploads holds NaN/inf"):
        model.round_gradients(batch)


def test_byzantine_attacks_replace_only_the_bad_clients_uploads():
    updates = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]])}
    bad = torch.tensor([False, True, False])
    flip = ClientFaults(byzantine_fraction=0.5, byzantine_attack="sign_flip", byzantine_scale=3.0).attack(updates, bad, 0)
    torch.testing.assert_close(flip["w"], torch.tensor([[1.0, 2.0], [-9.0, -12.0], [-1.0, 0.5]]))
    scaled = ClientFaults(byzantine_fraction=0.5, byzantine_attack="scaled", byzantine_scale=3.0).attack(updates, bad, 0)
    torch.testing.assert_close(scaled["w"][1], torch.tensor([9.0, 12.0]))
    noisy = ClientFaults(byzantine_fraction=0.5, byzantine_attack="random", byzantine_scale=2.0).attack(
        {"w": torch.ones(3, 100_000)}, bad, 0
    )
    assert noisy["w"][1].std().item() == pytest.approx(2.0, rel=0.02)  # scale × RMS(Δ) = 2 × 1
    torch.testing.assert_close(noisy["w"][0], torch.ones(100_000))


def test_byzantine_identity_is_fixed_per_client_and_close_to_the_fraction():
    faults = ClientFaults(byzantine_fraction=0.2, seed=0)
    ids = torch.arange(5000)
    bad = faults.byzantine(0, ids, 5000)
    assert abs(bad.float().mean().item() - 0.2) < 0.02
    torch.testing.assert_close(faults.byzantine(17, ids[100:200], 100), bad[100:200])  # same clients every round


def test_byzantine_round_equals_the_attacked_uploads_aggregated():
    faults = ClientFaults(byzantine_fraction=0.3, byzantine_attack="sign_flip", byzantine_scale=5.0, seed=0)
    batch = replace(sinusoid_batch(6), client_id=torch.arange(6))
    bad = faults.byzantine(0, batch.client_id, 6)
    assert 0 < int(bad.sum()) < 6
    model = BUDGETED["maml"](1, faults=faults, aggregator=CoordinateMedian())
    got, _ = model.round_gradients(batch)
    honest = BUDGETED["maml"](1).client_updates(batch)
    attacked = {k: torch.where(bad.view(-1, *[1] * (u.dim() - 1)), -5.0 * u, u) for k, u in honest.items()}
    want = CoordinateMedian()(attacked)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    assert model.run_round(batch).counts.byzantine == int(bad.sum())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dropout=1.0), "`dropout` in \\[0, 1\\), got 1.0"),
        (dict(byzantine_fraction=-0.1), "`byzantine_fraction`"),
        (dict(byzantine_attack="lie"), "`byzantine_attack` to be one of"),
        (dict(step_choices=[]), "`step_choices` to hold at least one"),
        (dict(step_choices=[1, -2]), "`step_choices` to be an integer >= 0, got -2"),
        (dict(step_choices=[1, 2], step_probs=[1.0]), "`step_probs` to hold 2"),
        (dict(step_probs=[1.0]), "`step_probs` needs `step_choices`"),
        (dict(byzantine_scale=0), "`byzantine_scale`"),
    ],
)
def test_fault_arguments_are_checked_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClientFaults(**kwargs)
