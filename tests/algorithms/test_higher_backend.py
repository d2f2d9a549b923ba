"""inner_backend="higher" gives the same updates and evaluation as the functional backend."""

from __future__ import annotations

import pytest
import torch
from conftest import classification_batch, mlp, sinusoid_batch

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


def test_torch_optimizer_runs_any_torch_optim_class_with_higher():
    batch = sinusoid_batch(2)
    model = lm.MAML(
        mlp(), inner_optimizer=TorchOptimizer("torch.optim.RMSprop", lr=0.01, kwargs={"alpha": 0.9}), inner_backend="higher", vectorize=False
    )
    updates = model.client_updates(batch)
    assert all(torch.isfinite(u).all() for u in updates.values())
    curves = model.adaptation_curves(batch)
    assert curves["loss"].shape == (2, 2)


def test_torch_optimizer_requires_higher_backend():
    with pytest.raises(ValueError, match="only works with inner_backend='higher'"):
        lm.MAML(mlp(), inner_optimizer=TorchOptimizer("torch.optim.SGD", lr=0.1))
    with pytest.raises(ValueError, match="`optimizer`.*'torch.optim.NoSuchThing'"):
        TorchOptimizer("torch.optim.NoSuchThing")
