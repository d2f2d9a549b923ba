"""validate/test/predict under a default Trainer (inference mode) and their values."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import classification_batch, client_task, loader, mlp, quiet_trainer, sinusoid_batch
from torch import nn

import lightning_metafed as lm
from lightning_metafed.functional import adapt, cross_entropy_loss
from lightning_metafed.inner import SGD, Adam


def manual_metrics(model, batch, steps):
    """Reference: adapt each client with the functional core, score its query set."""
    losses, accs = [], []
    for i in range(batch.num_clients):
        task = client_task(batch, i)
        params = {k: v.detach() for k, v in model.net.named_parameters()}
        adapted = adapt(
            model.functional_loss,
            params,
            task.support_x,
            task.support_y,
            optimizer=model.inner_optimizer,
            steps=steps,
            **model.adaptation_kwargs(model.meta_parameters(detach=True)),
        )
        logits = torch.func.functional_call(model.net, adapted, (task.query_x,))
        losses.append(cross_entropy_loss(logits, task.query_y))
        accs.append((logits.argmax(-1) == task.query_y).double().mean())
    return torch.stack(losses).mean(), torch.stack(accs).mean()


@pytest.mark.parametrize("cls", [lm.MAML, lm.MetaSGD, lm.ANIL, lm.Reptile, lm.PerFedAvg, lm.FedAvg])
def test_validate_and_test_report_four_metrics_with_default_trainer(cls):
    batch = classification_batch(5)
    kwargs = dict(inner_optimizer=SGD(lr=0.5), eval_inner_steps=3, task="classification")
    model = cls(mlp(4, 8, 3), **kwargs)
    t = quiet_trainer(limit_val_batches=1.0)  # Lightning's default inference_mode=True is kept
    assert t.validate_loop.inference_mode and t.test_loop.inference_mode
    val = t.validate(model, loader(batch), verbose=False)[0]
    test = t.test(model, loader(batch), verbose=False)[0]
    assert {"val/loss_pre", "val/loss_post", "val/acc_pre", "val/acc_post"} <= set(val)
    assert {"test/loss_pre", "test/loss_post", "test/acc_pre", "test/acc_post"} <= set(test)
    assert {f"test/acc_step{k}" for k in range(4)} <= set(test)  # the adaptation curve, returned by test
    loss_pre, acc_pre = manual_metrics(model, batch, 0)
    loss_post, acc_post = manual_metrics(model, batch, 3)
    assert val["val/loss_pre"] == pytest.approx(float(loss_pre), rel=1e-6)
    assert val["val/loss_post"] == pytest.approx(float(loss_post), rel=1e-6)
    assert val["val/acc_pre"] == pytest.approx(float(acc_pre), abs=1e-6)
    assert val["val/acc_post"] == pytest.approx(float(acc_post), abs=1e-6)
    assert test["test/loss_post"] == pytest.approx(val["val/loss_post"], rel=1e-6)
    assert val["val/loss_post"] < val["val/loss_pre"]  # adaptation on support helps on query here


def test_adaptation_never_sees_query_data():
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=0.1), eval_inner_steps=2)
    batch = sinusoid_batch(3)
    curves = model.adaptation_curves(batch)
    changed = lm.TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y * 7 + 3)
    adapted_a = model.personalize(batch)
    adapted_b = model.personalize(changed)
    for key in adapted_a:
        torch.testing.assert_close(adapted_a[key], adapted_b[key])
    assert curves["loss"].shape == (3, 3)


def test_predict_returns_personalized_query_predictions():
    model = lm.MetaSGD(mlp(), inner_optimizer=Adam(lr=0.05), eval_inner_steps=2)
    batch = sinusoid_batch(3, query=4)
    preds = quiet_trainer().predict(model, loader(batch))[0]
    assert preds.shape == (3, 4, 1)
    for i in range(3):
        task = client_task(batch, i)
        adapted = adapt(
            model.functional_loss,
            {k: v.detach() for k, v in model.net.named_parameters()},
            task.support_x,
            task.support_y,
            optimizer=model.inner_optimizer,
            steps=2,
            lr={n: model.inner_lrs[n.replace(".", "__")].detach() for n, _ in model.net.named_parameters()},
        )
        torch.testing.assert_close(preds[i], torch.func.functional_call(model.net, adapted, (task.query_x,)))
    unadapted = model.net(batch.query_x[0])
    assert not torch.allclose(preds[0], unadapted)


def test_fit_with_validation_improves_sinusoid_post_adaptation_loss():
    torch.manual_seed(0)
    train = [sinusoid_batch(16, support=10, query=10, seed=s, dtype=torch.float32) for s in range(60)]
    val = [sinusoid_batch(32, support=10, query=10, seed=1000, dtype=torch.float32)]
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    model = lm.MAML(
        net,
        inner_optimizer=SGD(lr=0.01),
        inner_steps=1,
        eval_inner_steps=5,
        server_optimizer=functools.partial(torch.optim.Adam, lr=0.01),
    )
    t = quiet_trainer(max_epochs=2, limit_val_batches=1.0)
    before = t.validate(model, loader(*val), verbose=False)[0]
    t.fit(model, loader(*train), loader(*val))
    after = t.validate(model, loader(*val), verbose=False)[0]
    assert after["val/loss_post"] < 0.8 * before["val/loss_post"], (before, after)
    assert after["val/loss_post"] < after["val/loss_pre"]


@pytest.mark.parametrize(
    "cls", [lm.MAML, lm.Reptile, lm.FedAvg, functools.partial(lm.FedAvg, local_batch_size=3)], ids=["maml", "reptile", "fedavg", "fedavg_minibatch"]
)
def test_padded_clients_evaluate_and_train_like_unpadded_ones(cls):
    """Clients of different sizes share a batch through masks; padding changes nothing."""
    from lightning_metafed.data import stack_tasks

    g = torch.Generator().manual_seed(3)
    tasks = []
    for s, q in [(3, 5), (6, 2), (4, 4)]:
        x = torch.randn(s + q, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (s + q,), generator=g)
        tasks.append((x[:s], y[:s], x[s:], y[s:]))
    padded = stack_tasks(tasks, [1.0, 2.0, 3.0], [0, 1, 2])
    assert padded.support_mask is not None and padded.query_mask is not None
    model = cls(mlp(4, 6, 3), inner_optimizer=SGD(lr=0.3), eval_inner_steps=2, task="classification")
    curves = model.adaptation_curves(padded)
    updates = model.client_updates(padded)
    for i, task in enumerate(tasks):
        single = stack_tasks([task], [1.0], [i])
        assert single.support_mask is None
        one = model.adaptation_curves(single)
        for key in curves:
            torch.testing.assert_close(curves[key][i], one[key][0])
        one_update = model.client_updates(single)
        for key in updates:
            torch.testing.assert_close(updates[key][i], one_update[key][0])


def test_diverging_adaptation_warns_instead_of_silent_nan():
    model = lm.MAML(mlp(), inner_optimizer=SGD(lr=1e6), eval_inner_steps=30)
    with pytest.warns(UserWarning, match=r"adaptation diverged .* for 3 of 3 clients"):
        metrics = quiet_trainer(limit_val_batches=1.0).validate(model, loader(sinusoid_batch(3)), verbose=False)[0]
    assert metrics["val/loss_post"] != metrics["val/loss_post"]  # NaN, reported loudly above
