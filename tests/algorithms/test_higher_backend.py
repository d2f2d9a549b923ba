"""inner_backend="higher" gives the same updates and evaluation as the functional backend."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import autograd_grad, classification_batch, client_task, finite_difference_grad, mlp, sinusoid_batch

import lightning_metafed as lm
from lightning_metafed.inner import SGD, Adam, TorchOptimizer

pytest.importorskip("higher")


@pytest.mark.parametrize("first_order", [False, True])
# higher 0.2.1's Adam adds `eps` before the bias correction (the formula torch.optim.Adam used before
# torch 1.5); ours follows today's torch.optim.Adam. A negligible eps makes the two formulas coincide.
@pytest.mark.parametrize(
    "inner", [SGD(lr=0.05), SGD(lr=0.05, momentum=0.9), Adam(lr=0.02, eps=1e-14)], ids=["sgd", "momentum", "adam"]
)
@pytest.mark.parametrize("cls", [lm.MAML, lm.ANIL])
def test_higher_backend_equals_func_backend(cls, inner, first_order):
    batch = sinusoid_batch(3)
    func = cls(mlp(), inner_optimizer=inner, inner_steps=3, first_order=first_order)
    with pytest.warns(UserWarning, match="runs clients in a Python loop"):
        hig = cls(mlp(), inner_optimizer=inner, inner_steps=3, first_order=first_order, inner_backend="higher")
    u_func, u_hig = func.client_updates(batch), hig.client_updates(batch)
    for key in u_func:
        torch.testing.assert_close(u_func[key], u_hig[key])
    c_func, c_hig = func.adaptation_curves(batch), hig.adaptation_curves(batch)
    torch.testing.assert_close(c_func["loss"], c_hig["loss"])
    p_func, p_hig = func.personalize(batch), hig.personalize(batch)
    for key in p_func:
        torch.testing.assert_close(p_func[key], p_hig[key])


def test_higher_fast_path_equals_explicit_updates():
    batch = classification_batch(3)
    model = lm.MAML(mlp(4, 6, 3), task="classification", inner_optimizer=SGD(lr=0.3), inner_steps=2, inner_backend="higher", vectorize=False)
    updates = model.client_updates(batch)
    w = batch.weight / batch.weight.sum()
    losses, _ = model.map_clients(model.client_objective, (model.meta_parameters(),), batch.tasks())
    (w * losses).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.einsum("m,m...->...", w, updates[name]))


def rmsprop_reference(net, params, task, steps, **kwargs):
    """A plain ``torch.optim.RMSprop`` loop on the support set of ``task``, starting from ``params``, on a
    copy of ``net``: the adapted parameters and the query MSE before and after every step."""
    clone = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(params[name])
    optimizer = torch.optim.RMSprop(clone.parameters(), **kwargs)
    query_losses = []
    for step in range(steps + 1):
        with torch.no_grad():
            query_losses.append(((clone(task.query_x) - task.query_y) ** 2).mean())
        if step < steps:
            optimizer.zero_grad()
            ((clone(task.support_x) - task.support_y) ** 2).mean().backward()
            optimizer.step()
    return {n: p.detach() for n, p in clone.named_parameters()}, torch.stack(query_losses)


# higher warns on every differentiable RMSprop that its meta-gradients may be wrong (at a zero running
# average); this test checks them itself, against finite differences of a plain torch.optim loop.
@pytest.mark.filterwarnings("ignore:Differentiable RMSprop suffers from gradient correctness issues:UserWarning")
@pytest.mark.parametrize("first_order", [False, True])
def test_torch_optimizer_runs_any_torch_optim_class_with_higher(first_order):
    batch = sinusoid_batch(2)
    rmsprop = dict(lr=0.01, alpha=0.9)
    model = lm.MAML(
        mlp(), inner_optimizer=TorchOptimizer("torch.optim.RMSprop", lr=0.01, kwargs={"alpha": 0.9}), inner_steps=3,
        eval_inner_steps=3, first_order=first_order, inner_backend="higher", vectorize=False,
    )
    updates = model.client_updates(batch)
    assert all(torch.isfinite(u).all() for u in updates.values())
    curves = model.adaptation_curves(batch)
    assert curves["loss"].shape == (2, 4)
    personalized = model.personalize(batch)
    theta = {n: p.detach() for n, p in model.net.named_parameters()}
    for i in range(batch.num_clients):
        task = client_task(batch, i)
        adapted, query_losses = rmsprop_reference(model.net, theta, task, 3, **rmsprop)
        torch.testing.assert_close({n: personalized[n][i] for n in adapted}, adapted)
        torch.testing.assert_close(curves["loss"][i], query_losses)
        if first_order:  # FOMAML: the query gradient at the adapted parameters
            expected = autograd_grad(model.net, adapted, task.query_x, task.query_y)
        else:  # MAML: the gradient of the query loss after the plain RMSprop loop, by finite differences
            expected = finite_difference_grad(lambda p: rmsprop_reference(model.net, p, task, 3, **rmsprop)[1][-1], theta)
        torch.testing.assert_close({n: updates["net." + n][i] for n in expected}, expected, rtol=1e-5, atol=1e-8)


def test_torch_optimizer_requires_higher_backend():
    with pytest.raises(ValueError, match="only works with inner_backend='higher'"):
        lm.MAML(mlp(), inner_optimizer=TorchOptimizer("torch.optim.SGD", lr=0.1))
    with pytest.raises(ValueError, match="`optimizer`.*'torch.optim.NoSuchThing'"):
        TorchOptimizer("torch.optim.NoSuchThing")
