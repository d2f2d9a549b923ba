"""Refused at setup or on the first batch, before anything trains: precision, world size, a batch
that does not fit the net, a task that does not fit the data, no-op aggregators, Reptile without steps."""

from __future__ import annotations

import pytest
import torch
from conftest import FIT_WITHOUT_VALIDATION, classification_batch, loader, mlp, quiet_trainer, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.algorithms.setup_checks import BatchProbe, SetupError, check_batch_fits_net, check_precision, check_world_size
from lightning_metafed.data import TensorClients
from lightning_metafed.inner import SGD

pytestmark = FIT_WITHOUT_VALIDATION


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_untouched(model, before):
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_half_true_precisions_are_refused_at_setup_with_the_reason(precision):
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.01))
    before = snapshot(model)
    reason = "eps=1e-8" if precision == "16-true" else "8-bit mantissa"
    with pytest.raises(SetupError, match=rf"Expected `precision` .* got '{precision}': .*{reason}.*Use '16-mixed' or 'bf16-mixed'"):
        quiet_trainer(max_steps=1, precision=precision).fit(model, loader(sinusoid_batch(3, dtype=torch.float32)))
    assert model.global_step == 0
    assert_untouched(model, before)


def test_mixed_and_full_precisions_pass_the_check():
    for precision in ("32-true", "64-true", "16-mixed", "bf16-mixed", "32", "bf16-mixed"):
        check_precision(precision)


def test_world_size_check_names_both_numbers():
    check_world_size(2, 2)
    check_world_size(1, 1)
    with pytest.raises(SetupError, match=r"`clients_per_round` >= the number of DDP processes \(3.*got 2: .*at most 2 devices"):
        check_world_size(2, 3)


def test_features_of_another_dtype_than_the_net_are_named_on_the_first_batch():
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.01))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"net's dtype \['torch.float32'\], got torch.float64"):
        quiet_trainer(max_steps=1).fit(model, loader(sinusoid_batch(3)))  # float64 data
    assert_untouched(model, before)


def test_regression_output_that_does_not_match_the_targets_is_named():
    model = lm.MAML(mlp(out=3), inner_optimizer=SGD(lr=0.01))
    with pytest.raises(ValueError, match=r"one value per regression target: .* to \(5, 3\), but the targets have shape \(5, 1\)"):
        quiet_trainer(max_steps=1).fit(model, loader(sinusoid_batch(3)))


def test_labels_beyond_the_net_outputs_and_float_labels_are_named():
    batch = classification_batch(3, classes=3)
    model = lm.MAML(mlp(4, 8, 2), inner_optimizer=SGD(lr=0.1), task="classification")  # 2 outputs, 3 classes
    with pytest.raises(ValueError, match=r"class labels in \[0, 2\) \(the net has 2 outputs\), got labels from 0 to 2"):
        quiet_trainer(max_steps=1).fit(model, loader(batch))
    floats = classification_batch(3)
    floats = lm.TaskBatch(floats.support_x, floats.support_y.double() + 0.5, floats.query_x, floats.query_y.double())
    model = lm.MAML(mlp(4, 8, 3), inner_optimizer=SGD(lr=0.1), task="classification")
    with pytest.raises(ValueError, match=r"integer class labels for task='classification', got torch.float64 .* \(e.g. 0.5\)"):
        quiet_trainer(max_steps=1).fit(model, loader(floats))


def test_evaluation_batches_are_checked_too():
    model = lm.MAML(mlp().float(), inner_optimizer=SGD(lr=0.01))
    with pytest.raises(ValueError, match="net's dtype"):
        quiet_trainer(limit_val_batches=1.0).validate(model, loader(sinusoid_batch(3)))


def test_a_custom_loss_skips_the_target_checks_but_not_the_dtype_check():
    class SumLoss(lm.MAML):
        def compute_loss(self, pred, target, mask=None):
            return (pred.sum(-1) - target.reshape(pred.shape[0], -1).sum(-1)).pow(2).mean()

    model = SumLoss(mlp(out=3), inner_optimizer=SGD(lr=0.01), fast_path=False)
    quiet_trainer(max_steps=1).fit(model, loader(sinusoid_batch(3)))
    assert model.global_step == 1


def test_class_labels_with_a_regression_task_are_refused_at_setup():
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)) for _ in range(8)]
    data = TensorClients(clients, num_classes=3, clients_per_round=2, support_size=3, query_size=3, client_split=(0.5, 0.25, 0.25))
    model = lm.MAML(mlp(4, 8, 1), inner_optimizer=SGD(lr=0.01))
    with pytest.raises(SetupError, match=r"task='classification' for data with class labels .*num_classes=3"):
        quiet_trainer(max_steps=1).fit(model, datamodule=data)
    assert model.global_step == 0


def test_an_aggregator_that_is_a_plain_mean_for_the_round_size_warns_at_setup():
    g = torch.Generator().manual_seed(0)
    clients = [(torch.randn(12, 1, generator=g, dtype=torch.float64), torch.randn(12, 1, generator=g, dtype=torch.float64)) for _ in range(8)]
    data = TensorClients(clients, clients_per_round=4, support_size=3, query_size=3, client_split=(0.5, 0.25, 0.25))
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.01), aggregator=lm.TrimmedMean(trim=0.1))
    with pytest.warns(UserWarning, match=r"TrimmedMean\(trim=0.1\) trims .* = 0 clients per side in a round of 4 clients"):
        quiet_trainer(max_steps=1).fit(model, datamodule=data)


def test_reptile_without_inner_steps_and_fedavg_with_them_are_refused():
    with pytest.raises(ValueError, match=r"`inner_steps` >= 1 for Reptile: its upload θ − θ_K is zero"):
        lm.Reptile(mlp(), inner_steps=0)
    with pytest.raises(ValueError, match=r"`inner_steps` is not used: expected it unset \(None or 0\), got 7"):
        lm.FedAvg(mlp(), inner_steps=7)


def test_padded_labels_and_placeholder_query_labels_are_not_refused():
    batch = classification_batch(3, classes=3)
    support_y = batch.support_y.clone()
    support_y[:, -1] = -100  # padding, masked out
    mask = torch.ones(support_y.shape, dtype=torch.bool)
    mask[:, -1] = False
    padded = lm.TaskBatch(batch.support_x, support_y, batch.query_x, batch.query_y, support_mask=mask)
    model = lm.MAML(mlp(4, 8, 3), inner_optimizer=SGD(lr=0.1), task="classification")
    quiet_trainer(max_steps=1).fit(model, loader(padded))
    assert model.global_step == 1
    placeholders = lm.TaskBatch(batch.support_x, batch.support_y, batch.query_x, torch.full_like(batch.query_y, -1))
    predictions = quiet_trainer().predict(model, loader(placeholders))
    assert len(predictions) == 1


def test_half_precision_features_pass_under_mixed_precision():
    batch = sinusoid_batch(3).to(dtype=torch.bfloat16)
    net = mlp().float()
    autocast = BatchProbe(dtype=False, context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    check_batch_fits_net(net, batch, "regression", autocast)
    with pytest.raises(ValueError, match=r"net's dtype \['torch.float32'\], got torch.bfloat16"):
        check_batch_fits_net(net, batch, "regression", BatchProbe())


def test_the_probe_leaves_the_net_in_its_mode_and_names_a_net_that_cannot_run():
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1)).double()
    net.train()
    check_batch_fits_net(net, sinusoid_batch(2), "regression")
    assert net.training
    with pytest.raises(ValueError, match=r"The net cannot run on a client's support features \(shape \(5, 3\)"):
        check_batch_fits_net(net, _wide(), "regression")


def _wide():
    b = sinusoid_batch(2)
    x = b.support_x.expand(-1, -1, 3).contiguous()
    return lm.TaskBatch(x, b.support_y, b.query_x.expand(-1, -1, 3).contiguous(), b.query_y)
